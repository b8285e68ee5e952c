"""Can this host run the sensor?  Each check fails with one line naming the fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from corral.errors import HostError
from corral.events import wall_time_ns

TRACEFS = Path("/sys/kernel/tracing")
BPFFS = Path("/sys/fs/bpf")
BTF = Path("/sys/kernel/btf/vmlinux")
CAP_PERFMON, CAP_BPF, CAP_SYS_ADMIN = 38, 39, 21


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount this process sees."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((parts[1].replace("\\040", " "), parts[2]))
    return out


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _effective_caps()
    needed = (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)
    if all(caps >> cap & 1 for cap in needed):
        return
    raise HostError("the sensor needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN): run it with sudo")


def check_btf() -> None:
    if not BTF.exists():
        raise HostError(
            f"this kernel has no BTF ({BTF} is missing): corral's CO-RE programs need a kernel "
            "built with CONFIG_DEBUG_INFO_BTF=y (the default on current distributions)")


def _ensure_mounted(path: Path, fstype: str, probe: Path) -> None:
    if any(mp == str(path) and t == fstype for mp, t in _mounts()) or probe.exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", fstype, fstype, str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise HostError(f"{fstype} is not mounted at {path} and mounting it failed "
                        f"({res.stderr.strip() or 'mount exited ' + str(res.returncode)}): "
                        f"run `mount -t {fstype} {fstype} {path}` as root")


def ensure_tracefs() -> None:
    _ensure_mounted(TRACEFS, "tracefs", TRACEFS / "events")


def ensure_bpffs() -> None:
    _ensure_mounted(BPFFS, "bpf", Path("/nonexistent"))


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted (pure v2, or hybrid's unified)."""
    for mountpoint, fstype in _mounts():
        if fstype == "cgroup2" and mountpoint in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            return Path(mountpoint)
    for mountpoint, fstype in _mounts():
        if fstype == "cgroup2":
            return Path(mountpoint)
    raise HostError("no cgroup v2 hierarchy is mounted: corral scopes its programs by cgroup v2 id; "
                    "mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (in our pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it is just not ours to signal
    return True


#: one clock tick (USER_HZ), the unit of /proc/PID/stat's times
TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name, from the state on (man 5 proc's field
    N is item N - 3: ppid [1], utime [11], stime [12], starttime [19]); None when the process is
    gone or unreadable.  (The name may hold spaces and parentheses: the fields start after the
    last ')'.)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].split()


def owner_alive(pid: int, made_ns: int) -> bool:
    """Whether the process that made something at `made_ns` (wall clock) is still alive: a process
    with this pid exists, and it had started by then (to a clock tick, and two for the clocks'
    reads).  A later process given the same pid number (pids wrap around on a busy host) is not
    the owner, so what the dead owner left is reaped."""
    fields = proc_stat(pid)
    if fields is None:
        return pid_alive(pid)  # gone, or not ours to read (then only the pid can tell)
    return wall_time_ns(int(fields[19]) * TICK_NS) <= made_ns + 2 * TICK_NS


def left_by_dead_owner(path: Path, pid: int) -> bool:
    """Whether `path`, made by process `pid`, outlived it: owner_alive() from the path's times (the
    earlier of its change and modification times, which only grow after it was made).  False
    when the path is gone: nothing is left to reap."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return not owner_alive(pid, min(st.st_ctime_ns, st.st_mtime_ns))


def tracepoint_exists(category: str, name: str) -> bool:
    return (TRACEFS / "events" / category / name).is_dir()


def preflight() -> None:
    """Every check the sensor needs before it loads, in the order a user fixes them."""
    check_privileges()
    check_btf()
    ensure_tracefs()
    ensure_bpffs()
    cgroup2_root()
