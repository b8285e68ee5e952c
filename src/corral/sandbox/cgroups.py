"""A sandbox's cgroups: limits, one child per step, freeze, kill, usage, cleanup.

Every sandbox lives at ``corral/<name>`` of the cgroup v2 hierarchy (where BPF attaches and ids come
from).  Each resource controller is driven where the host has it: in that same v2 directory on pure v2
hosts, or in a v1 hierarchy (``/sys/fs/cgroup/<ctrl>/corral/<name>``) on hybrid hosts, where v2 has no
controllers.  Limits are set on the sandbox directory so that every step below it shares them.
Processes only ever go into step leaves (v2 forbids processes in a directory that has controllers
enabled for its children).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from corral.errors import CorralError
from corral.sensor.cgroups import CORRAL, cgroup_id, hold_corral_cgroup, reap_stale_holders, remove_if_empty
from corral.sensor.host import cgroup2_root, pid_alive

_BASE = CORRAL
_V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")
_V2_CONTROLLERS = ("cpu", "memory", "pids")
_CPU_PERIOD_US = 100_000
_TIMEOUT_S = 5.0
_POLL_S = 0.01
_STALE_NAME = re.compile(r"sb-(\d+)-.+")
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class Limits:
    """Limits shared by all of a sandbox's steps; None leaves that resource unlimited."""

    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None

    def __post_init__(self) -> None:
        # The kernel refuses a CFS quota under 1 ms per period.
        if self.cpus is not None and not self.cpus * _CPU_PERIOD_US >= 1000:
            raise ValueError(f"cpus must be at least 0.01, not {self.cpus}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"memory limit must be a positive number of bytes, not {self.memory_bytes}")
        if self.pids is not None and self.pids <= 0:
            raise ValueError(f"pids limit must be a positive number of processes, not {self.pids}")


def parse_size(text: str) -> int:
    """Bytes in a size such as "512M", "1G", "1.5g", "64KiB" or "1048576" (units are powers of 1024)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size: write a number of bytes, optionally followed by "
                         "K, M, G or T (powers of 1024), e.g. 512M or 1.5G")
    return int(Decimal(m[1]) * _UNITS[(m[2] or "").lower()])


def sandbox_name(owner_pid: int | None = None) -> str:
    """A fresh sandbox name that records its owner, so `reap_stale` can tell when the owner is gone."""
    pid = os.getpid() if owner_pid is None else owner_pid
    return f"sb-{pid}-{secrets.token_hex(4)}"


# ---------------------------------------------------------------------------- host layout


def _v1_mounts() -> dict[str, Path]:
    """Mount point of each v1 controller corral uses (cpu and cpuacct may share one mount)."""
    found: dict[str, Path] = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mountpoint, fstype, options, *_ = line.split()
            if fstype != "cgroup":
                continue
            for ctrl in options.split(","):
                if ctrl in _V1_CONTROLLERS:
                    found.setdefault(ctrl, Path(mountpoint.replace("\\040", " ")))
    return found


# ---------------------------------------------------------------------------- small file helpers


def _fix_for(err: OSError) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return "run corral as root"
    if err.errno == errno.EEXIST:
        return "it already exists: use a fresh name"
    if err.errno == errno.EROFS:
        return "the cgroup filesystem is read-only; in a container, give it a writable cgroup namespace"
    return "check that the cgroup still exists and the host's kernel supports this setting"


def _write(file: Path, value: str, fixes: dict[int, str] | None = None) -> None:
    """Write a cgroup file; ``fixes`` maps an errno to advice more specific than `_fix_for`'s."""
    try:
        file.write_text(value)
    except OSError as e:
        fix = (fixes or {}).get(e.errno or 0) or _fix_for(e)
        raise CorralError(f"cannot write {value!r} to {file}: {e.strerror}; {fix}") from None


def _mkdir(path: Path, exist_ok: bool = False) -> None:
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as e:
        raise CorralError(f"cannot create cgroup {path}: {e.strerror}; {_fix_for(e)}") from None


def _read_kv(file: Path) -> dict[str, int]:
    """The "key value" lines of a cgroup stat or events file."""
    out = {}
    for line in file.read_text().splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):  # a non-numeric line carries no counter
            out[key] = int(value)
    return out


def _procs(cgroup: Path) -> list[int]:
    try:
        return [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
    except FileNotFoundError:  # removed meanwhile: nothing left in it
        return []


def _subtree(cgroup: Path) -> list[Path]:
    """A cgroup and every cgroup below it, children before parents (the order rmdir needs)."""
    return [Path(d) for d, _subdirs, _files in os.walk(cgroup, topdown=False)]


def _wait_for(done: Callable[[], bool], what: str, cgroup: Path, hint: str) -> None:
    """Poll ``done()`` until true or `_TIMEOUT_S` passes, then fail naming the cgroup."""
    deadline = time.monotonic() + _TIMEOUT_S
    while not done():
        if time.monotonic() > deadline:
            raise CorralError(f"{cgroup} did not {what} within {_TIMEOUT_S:g} s; {hint}")
        time.sleep(_POLL_S)


def _rmdir(cgroup: Path) -> None:
    """Remove an empty cgroup; gone already is fine.  A just-killed process can keep its cgroup busy
    for a moment after it vanished from cgroup.procs, so EBUSY is retried briefly."""
    deadline = time.monotonic() + _TIMEOUT_S
    while True:
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CorralError(f"cannot remove cgroup {cgroup}: {e.strerror}; "
                                  f"see what is still in it with `cat {cgroup}/cgroup.procs`") from None
            time.sleep(_POLL_S)


# ---------------------------------------------------------------------------- freezers


_FREEZE_HINT = ("a process in uninterruptible sleep (e.g. on a hung network filesystem) can block it; "
                "see `grep State /proc/*/status` for its processes")


def _v2_frozen(cgroup: Path) -> bool:
    try:
        return _read_kv(cgroup / "cgroup.events").get("frozen") == 1
    except FileNotFoundError:  # a cgroup that is gone freezes nothing
        return False


def _freeze_v2(cgroup: Path, frozen: bool) -> None:
    _write(cgroup / "cgroup.freeze", "1" if frozen else "0")
    _wait_for(lambda: _v2_frozen(cgroup) == frozen, "freeze" if frozen else "thaw", cgroup, _FREEZE_HINT)


def _v1_frozen(cgroup: Path) -> bool:
    try:
        return (cgroup / "freezer.state").read_text().strip() == "FROZEN"
    except FileNotFoundError:
        return False


def _freeze_v1(cgroup: Path, frozen: bool) -> None:
    # While freezing, the state reads FREEZING: wait for FROZEN, or for THAWED when thawing.
    state = "FROZEN" if frozen else "THAWED"
    _write(cgroup / "freezer.state", state)
    _wait_for(lambda: (cgroup / "freezer.state").read_text().strip() == state,
              "freeze" if frozen else "thaw", cgroup, _FREEZE_HINT)


# ---------------------------------------------------------------------------- cgroups


class StepCgroup:
    """The leaf cgroup(s) of one step: where that step's processes, and only they, are put."""

    def __init__(self, step: int, path: Path, v1_dirs: list[Path]) -> None:
        self.step = step
        self.path = path
        self.id = cgroup_id(path)
        self._v1_dirs = v1_dirs

    def procs_files(self) -> list[Path]:
        """The cgroup.procs files a new process must write its pid to, v2 first (its id is what the
        sensor scopes by).  Plain paths, so a preexec_fn can write them without calling into corral."""
        return [self.path / "cgroup.procs", *(d / "cgroup.procs" for d in self._v1_dirs)]

    def add(self, pid: int) -> None:
        for file in self.procs_files():
            _write(file, str(pid))

    def joiner(self) -> Callable[[], None]:
        """A preexec_fn: moves the child into this step (every hierarchy) and drops
        root's supplementary groups, before anything of the sandbox runs."""
        paths = [str(p) for p in self.procs_files()]

        def join() -> None:  # between fork and exec: plain os calls only
            pid = str(os.getpid()).encode()
            for path in paths:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            os.setgroups([])

        return join

    def pids(self) -> list[int]:
        return _procs(self.path)


class SandboxCgroup:
    """One sandbox's cgroups in every hierarchy this host drives controllers from."""

    name: str
    id: int  # v2 cgroup id of `path`
    path: Path  # the v2 directory

    def __init__(self, name: str, limits: Limits) -> None:
        self._locate(name)
        # Held: another process's last sandbox closing must not remove it under us
        # (the v1 `corral` dirs have no such guard: their children are made with parents=True).
        base = hold_corral_cgroup()
        _enable_v2_controllers(base)
        for d in self._v1_dirs():
            _mkdir(d.parent, exist_ok=True)
        _mkdir(self.path)  # outside the cleanup below: a name clash must not destroy the other sandbox
        try:
            for d in self._v1_dirs():
                _mkdir(d)
            self._apply(limits)
        except BaseException:
            with contextlib.suppress(CorralError):  # report the first failure; reap_stale gets the rest
                self.destroy()
            raise
        self.id = cgroup_id(self.path)

    @classmethod
    def _existing(cls, name: str) -> SandboxCgroup:
        """A handle on a sandbox some other (dead) corral created, to destroy it."""
        sb = cls.__new__(cls)
        sb._locate(name)
        return sb

    def _locate(self, name: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ValueError(f"{name!r} is not a usable sandbox name: use letters, digits, '.', '_', '-'")
        self.name = name
        self.path = cgroup2_root() / _BASE / name
        # controller -> this sandbox's directory in the v1 hierarchy carrying it (hybrid hosts only)
        self._v1 = {ctrl: mount / _BASE / name for ctrl, mount in _v1_mounts().items()}

    def _v1_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self._v1.values()))  # cpu and cpuacct may share a hierarchy

    def _dirs(self) -> list[Path]:
        return [self.path, *self._v1_dirs()]

    def _need(self, file: Path, ctrl: str) -> Path:
        if not file.exists():
            raise CorralError(f"{file} does not exist: the {ctrl} controller is neither mounted as cgroup v1 "
                              f"nor listed in {cgroup2_root()}/cgroup.controllers; enable it in the "
                              "kernel/boot options to use this limit")
        return file

    def _apply(self, limits: Limits) -> None:
        if limits.cpus is not None:
            quota = round(limits.cpus * _CPU_PERIOD_US)
            if "cpu" in self._v1:
                d = self._v1["cpu"]
                _write(self._need(d / "cpu.cfs_period_us", "cpu"), str(_CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(quota))
            else:
                _write(self._need(self.path / "cpu.max", "cpu"), f"{quota} {_CPU_PERIOD_US}")
        if (mem := limits.memory_bytes) is not None:
            # Swap is capped too, or a memory limit only moves the sandbox's pages to swap.
            if "memory" in self._v1:
                d = self._v1["memory"]
                _write(self._need(d / "memory.limit_in_bytes", "memory"), str(mem))
                if (d / "memory.memsw.limit_in_bytes").exists():  # memory+swap, so == no swap at all
                    _write(d / "memory.memsw.limit_in_bytes", str(mem))
            else:
                _write(self._need(self.path / "memory.max", "memory"), str(mem))
                if (self.path / "memory.swap.max").exists():
                    _write(self.path / "memory.swap.max", "0")
        if limits.pids is not None:  # the same file in v1 and v2
            _write(self._need(self._v1.get("pids", self.path) / "pids.max", "pids"), str(limits.pids))

    def new_step(self, step: int) -> StepCgroup:
        leaf = f"step-{step}"
        for d in self._dirs():
            _mkdir(d / leaf)
        return StepCgroup(step, self.path / leaf, [d / leaf for d in self._v1_dirs()])

    def holds(self, pid: int) -> bool:
        """Whether process `pid` is in this sandbox (any step), from its /proc/PID/cgroup."""
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False
        return f"/corral/{self.name}/" in text or text.rstrip().endswith(f"/corral/{self.name}")

    def pids(self) -> list[int]:
        """Every process in the sandbox, in any step and any hierarchy (they should agree; a stray
        process in just one still keeps that directory from being removed)."""
        found = {pid for d in self._dirs() for cg in _subtree(d) for pid in _procs(cg)}
        return sorted(found)

    # The freezer follows the controllers' rule: v1's where the host mounts it, else v2's cgroup.freeze.
    def freeze(self) -> None:
        if "freezer" in self._v1:
            _freeze_v1(self._v1["freezer"], True)
        else:
            _freeze_v2(self.path, True)

    def thaw(self) -> None:
        if "freezer" in self._v1:
            _freeze_v1(self._v1["freezer"], False)
        else:
            _freeze_v2(self.path, False)

    @property
    def frozen(self) -> bool:
        return _v1_frozen(self._v1["freezer"]) if "freezer" in self._v1 else _v2_frozen(self.path)

    def kill_all(self) -> None:
        """SIGKILL every process in the sandbox and wait until none is left."""
        kill_file = _kill_file(self.path)
        deadline = time.monotonic() + _TIMEOUT_S
        while self.pids():
            if time.monotonic() > deadline:
                raise CorralError(f"processes of sandbox {self.path} survive SIGKILL: {self.pids()}; "
                                  "see their state in /proc/<pid>/status")
            if kill_file:
                _write(kill_file, "1")
            else:  # frozen, nothing can fork between listing and killing
                self.freeze()
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            # A v1-frozen process only acts on its SIGKILL once thawed.
            if self.frozen:
                self.thaw()
            time.sleep(_POLL_S)

    def cpu_usage_ns(self) -> int:
        """CPU time used by every process the sandbox has had, in nanoseconds."""
        if "cpuacct" in self._v1:
            return int((self._v1["cpuacct"] / "cpuacct.usage").read_text())
        return _read_kv(self.path / "cpu.stat")["usage_usec"] * 1000  # cpu.stat needs no controller

    def memory_bytes(self) -> int:
        """Memory charged to the sandbox now, page cache included."""
        if "memory" in self._v1:
            return int((self._v1["memory"] / "memory.usage_in_bytes").read_text())
        return int(self._need(self.path / "memory.current", "memory").read_text())

    def events(self) -> dict[str, int]:
        """How often the sandbox hit a limit: "oom_kill" (processes the OOM killer killed) and
        "pids_max" (forks refused), each present only where this host counts it."""
        counts = {"oom_kill": self._count("memory", "memory.oom_control", "memory.events", "oom_kill"),
                  "pids_max": self._count("pids", "pids.events", "pids.events", "max")}
        return {k: n for k, n in counts.items() if n is not None}

    def _count(self, ctrl: str, v1_file: str, v2_file: str, key: str) -> int | None:
        # v1 counts an event only in the cgroup it happened in (a step): add up the subtree.
        # v2 counts the whole subtree in the sandbox's own file.
        in_v1 = ctrl in self._v1
        files = [cg / v1_file for cg in _subtree(self._v1[ctrl])] if in_v1 else [self.path / v2_file]
        files = [f for f in files if f.exists()]
        return sum(_read_kv(f).get(key, 0) for f in files) if files else None

    def destroy(self) -> None:
        """Kill everything in the sandbox and remove its directories; safe to call again."""
        self.kill_all()
        for d in self._dirs():
            for cg in _subtree(d):
                _rmdir(cg)
        _remove_empty_bases()


def _remove_empty_bases() -> None:
    """The `corral` directory of each hierarchy goes with the last sandbox in it (v2's is kept
    while a corral process holds it: its programs are attached there)."""
    for base in [*(m / _BASE for m in set(_v1_mounts().values())), cgroup2_root() / _BASE]:
        remove_if_empty(base)


def _kill_file(cgroup: Path) -> Path | None:
    """v2's cgroup.kill (kernel >= 5.14): kills a whole subtree at once, without racing its forks."""
    file = cgroup / "cgroup.kill"
    return file if file.exists() else None


def _enable_v2_controllers(base: Path) -> None:
    """Let ``base``'s children (the sandboxes) have cpu, memory and pids files, where v2 offers them:
    each controller must be enabled in the subtree_control of every ancestor."""
    root = base.parent
    offered = set((root / "cgroup.controllers").read_text().split()) & set(_V2_CONTROLLERS)
    for d in (root, base):
        missing = offered - set((d / "cgroup.subtree_control").read_text().split())
        if missing:
            _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing)),
                   {errno.EBUSY: f"{d} must hold no processes itself (cgroup v2 allows processes only "
                                 "in leaves of cgroups with controllers enabled): move them into a child"})


def reap_stale() -> list[str]:
    """Destroy sandboxes left behind by corral runs that died: those named ``sb-<pid>-...`` whose owner
    pid is gone.  Returns the names reaped."""
    bases = [cgroup2_root() / _BASE, *(m / _BASE for m in set(_v1_mounts().values()))]
    names = set()
    for base in bases:
        with contextlib.suppress(FileNotFoundError):
            names |= {p.name for p in base.iterdir() if p.is_dir()}
    reaped = []
    for name in sorted(names):
        m = _STALE_NAME.fullmatch(name)
        if m and not pid_alive(int(m[1])):
            SandboxCgroup._existing(name).destroy()
            reaped.append(name)
    reap_stale_holders()
    _remove_empty_bases()
    return reaped
