"""The process table: pid -> what the process is, kept from the event stream.

Seeded from /proc when the monitor starts, then maintained from fork, exec
and exit events, so an event is joined to the process as it was when the
event happened (not as /proc shows it later, when it may be gone or reused).
Exited processes are kept for a short while: events emitted just before an
exit are often read just after it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from corral import events as ev

EXITED_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    ppid: int
    comm: str
    exe: str
    argv: tuple[str, ...]
    cwd: str
    uid: int
    exited: bool = False

    @property
    def name(self) -> str:
        """The executable's base name (what rules call proc.name)."""
        return os.path.basename(self.exe) if self.exe else self.comm

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv) if self.argv else self.comm


def _read_proc(pid: int) -> Process | None:
    base = Path(f"/proc/{pid}")
    try:
        status = (base / "status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        argv = tuple(a.decode(errors="replace") for a in (base / "cmdline").read_bytes().split(b"\0") if a)
        try:
            exe = os.readlink(base / "exe")
        except OSError:
            exe = ""  # kernel threads, or another user's process without ptrace access
        try:
            cwd = os.readlink(base / "cwd")
        except OSError:
            cwd = ""
        return Process(pid=pid, ppid=int(fields.get("PPid", "0")), comm=fields.get("Name", "").strip(),
                       exe=exe, argv=argv, cwd=cwd, uid=int(fields.get("Uid", "0").split()[0]))
    except (OSError, ValueError):
        return None


class ProcessTable:
    def __init__(self, seed: bool = True) -> None:
        self._procs: dict[int, Process] = {}
        self._exited: deque[tuple[float, int]] = deque()
        if seed:
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    proc = _read_proc(int(entry))
                    if proc is not None:
                        self._procs[proc.pid] = proc

    def __len__(self) -> int:
        return len(self._procs)

    def get(self, pid: int) -> Process | None:
        """The process, from the table or (first sight) from /proc."""
        proc = self._procs.get(pid)
        if proc is None and pid > 0:
            proc = _read_proc(pid)
            if proc is not None:
                self._procs[pid] = proc
        return proc

    def ancestors(self, pid: int, depth: int = 8) -> list[Process]:
        """Parent, grandparent, ... (nearest first), stopping at pid 1 or a loop."""
        out: list[Process] = []
        seen = {pid}
        proc = self.get(pid)
        while proc is not None and len(out) < depth and proc.ppid > 0 and proc.ppid not in seen:
            seen.add(proc.ppid)
            proc = self.get(proc.ppid)
            if proc is not None:
                out.append(proc)
        return out

    def update(self, event: ev.Event) -> None:
        """Apply a fork, exec or exit event; other events change nothing."""
        if isinstance(event, ev.ForkEvent):
            parent = self.get(event.pid)
            if parent is not None:
                self._procs[event.child_pid] = replace(parent, pid=event.child_pid, ppid=event.pid)
            else:
                self._procs[event.child_pid] = Process(event.child_pid, event.pid, event.comm, "", (), "",
                                                       event.uid)
        elif isinstance(event, ev.ExecEvent):
            argv = tuple(event.argv)
            # a new object, so earlier events keep the image they were made by
            self._procs[event.pid] = Process(pid=event.pid, ppid=event.ppid, comm=event.comm,
                                             exe=event.filename, argv=argv, cwd=event.cwd, uid=event.uid)
        elif isinstance(event, ev.ExitEvent):
            proc = self._procs.get(event.pid)
            if proc is not None:
                self._procs[event.pid] = replace(proc, exited=True)
                self._exited.append((time.monotonic(), event.pid))
        self._forget_exited()

    def _forget_exited(self) -> None:
        cutoff = time.monotonic() - EXITED_GRACE_S
        while self._exited and self._exited[0][0] < cutoff:
            _, pid = self._exited.popleft()
            proc = self._procs.get(pid)
            if proc is not None and proc.exited:
                del self._procs[pid]
