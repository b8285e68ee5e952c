"""An evidence bundle of a frozen sandbox: what an investigator needs, taken
while nothing in it can move.

bundle.json holds the alert, the process tree (pid, parent, argv, exe, cwd,
step), every open socket with its peer, the recent events of the alert's
step, and a listing of the workspace (with sha256 of small files); binaries/
holds copies of every executable the sandbox ran from a writable place (/tmp,
/dev/shm, the workspace, its home, a memfd), named by their sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from corral import events as ev
from corral.detect.engine import Alert

WRITABLE_PREFIXES = ("/tmp/", "/dev/shm/", "/var/tmp/", "/workspace/", "/home/", "memfd:", "/proc/self/fd/")
MAX_HASHED_FILE = 16 << 20
MAX_LISTED_FILES = 5000
_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "0A": "LISTEN", "06": "TIME_WAIT", "08": "CLOSE_WAIT"}


def collect(directory: Path, alert: Alert, pids: Sequence[int], step_of: dict[int, int | None],
            recent: Iterable[ev.Event], everything: Iterable[ev.Event], workspace: Path) -> Path:
    """Write the bundle of `alert` into `directory`; returns the bundle.json path.

    `recent` are the alert step's last events; `everything` the sandbox's, in
    which executables run from writable places are looked for."""
    directory.mkdir(parents=True, exist_ok=True)
    recent = list(recent)
    bundle: dict[str, Any] = {
        "alert": alert.to_dict(),
        "processes": [_process(pid, step_of.get(pid)) for pid in pids],
        "sockets": [s for pid in pids for s in _sockets(pid)],
        "recent_events": [e.to_dict() for e in recent],
        "binaries": _copy_binaries(directory / "binaries", everything, pids),
        "workspace": _listing(workspace),
    }
    path = directory / "bundle.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(bundle, indent=1, default=str))
    tmp.replace(path)
    return path


def _process(pid: int, step: int | None) -> dict[str, Any]:
    base = Path(f"/proc/{pid}")
    info: dict[str, Any] = {"pid": pid, "step": step}
    try:
        info["argv"] = [a.decode(errors="replace") for a in (base / "cmdline").read_bytes().split(b"\0") if a]
        stat = (base / "stat").read_text()
        info["ppid"] = int(stat.rsplit(")", 1)[1].split()[1])
        info["comm"] = stat[stat.index("(") + 1:stat.rindex(")")]
    except (OSError, ValueError):
        info["gone"] = True
        return info
    for name in ("exe", "cwd"):
        try:
            info[name] = os.readlink(base / name)
        except OSError:
            info[name] = None
    return info


def _sockets(pid: int) -> list[dict[str, Any]]:
    """The process's sockets and their peers, from its own network namespace's tables."""
    inodes: dict[str, int] = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # vanished or unreadable: best effort per item
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = int(fd)
    except OSError:
        return []
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[9] in inodes:
                out.append({"pid": pid, "fd": inodes[cols[9]], "proto": proto, "local": _endpoint(cols[1]),
                            "remote": _endpoint(cols[2]), "state": _TCP_STATES.get(cols[3], cols[3])})
    return out


def _endpoint(hex_addr: str) -> str:
    addr, port = hex_addr.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = ".".join(str(b) for b in raw[::-1])
    else:  # /proc prints IPv6 as four little-endian 32-bit words
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        ip = f"[{ipaddress.IPv6Address(words)}]"
    return f"{ip}:{int(port, 16)}"


def _copy_binaries(directory: Path, events: Iterable[ev.Event], pids: Sequence[int]) -> list[dict[str, Any]]:
    """Copies of executables run from writable places, read through a live
    process's view of the sandbox's filesystem (/proc/PID/root)."""
    out, done = [], set()
    roots = [f"/proc/{pid}/root" for pid in pids]
    for event in events:
        if not isinstance(event, ev.ExecEvent | ev.MemfdExecEvent):
            continue
        name = event.filename
        if not name.startswith(WRITABLE_PREFIXES) or name in done:
            continue
        done.add(name)
        source = _readable(event.pid, name, roots)
        entry: dict[str, Any] = {"path": name, "pid": event.pid}
        if source is None:
            entry["copied"] = False
        else:
            data = source.read_bytes()[:MAX_HASHED_FILE]
            digest = hashlib.sha256(data).hexdigest()
            directory.mkdir(parents=True, exist_ok=True)
            (directory / digest).write_bytes(data)
            entry.update(copied=True, sha256=digest, size=len(data))
        out.append(entry)
    return out


def _readable(pid: int, name: str, roots: list[str]) -> Path | None:
    candidates = [Path(f"/proc/{pid}/exe")] if name.startswith(("memfd:", "/proc/self/fd/")) else []
    candidates += [Path(root + name) for root in [f"/proc/{pid}/root", *roots]]
    for path in candidates:
        with contextlib.suppress(OSError):  # vanished or unreadable: best effort per item
            if path.is_file():
                return path
    return None


def _listing(workspace: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for dirpath, _dirs, files in os.walk(workspace):
        for name in files:
            if len(out) >= MAX_LISTED_FILES:
                out.append({"truncated": True})
                return out
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):  # vanished or unreadable: best effort per item
                st = path.lstat()
                item: dict[str, Any] = {"path": str(path.relative_to(workspace)), "size": st.st_size,
                                        "mtime": st.st_mtime, "mode": oct(st.st_mode)}
                if path.is_file() and not path.is_symlink() and st.st_size <= MAX_HASHED_FILE:
                    item["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                out.append(item)
    return out

