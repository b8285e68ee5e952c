"""A sandbox's cgroups: limits, one child per step, freeze, kill, usage, cleanup.

Every sandbox lives at ``corral/<name>`` of the cgroup v2 hierarchy (where BPF attaches and ids come
from).  Each resource controller is driven where the host has it: in that same v2 directory on pure v2
hosts, or in a v1 hierarchy (``/sys/fs/cgroup/<ctrl>/corral/<name>``) on hybrid hosts, where v2 has no
controllers.  Limits are set on the sandbox directory so that every step below it shares them.
Processes only ever go into step leaves (v2 forbids processes in a directory that has controllers
enabled for its children).  The freezer is the exception: v2's (cgroup.freeze, not a controller)
wherever the kernel has it, v1's only on older kernels (SandboxCgroup.freeze says why).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import re
import secrets
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from corral.errors import CorralError
from corral.sensor.cgroups import CORRAL, cgroup_id, hold_corral_cgroup, reap_stale_holders, remove_if_empty
from corral.sensor.host import cgroup2_root, left_by_dead_owner

_BASE = CORRAL
_V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")
_V2_CONTROLLERS = ("cpu", "memory", "pids")
_CPU_PERIOD_US = 100_000
_TIMEOUT_S = 5.0
_POLL_S = 0.01
_STALE_NAME = re.compile(r"sb-(\d+)-.+")
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: limit counters: (name in events(), controller, v1 file, v2 file, key in the file)
_COUNTERS = (("oom_kill", "memory", "memory.oom_control", "memory.events", "oom_kill"),
             ("pids_max", "pids", "pids.events", "pids.events", "max"))


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


def _read_small(path: str) -> bytes | None:
    """A small cgroup file's bytes (one read: the kernel makes these few lines whole on the first),
    or None if it is not there (removed meanwhile, or not on this kernel).  Plain os calls: a third
    of the cost of Path.read_text, for files read often."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _read_int(path: str) -> int | None:
    """A cgroup file holding one number; None if missing or not a number ("max")."""
    data = _read_small(path)
    try:
        return int(data) if data is not None else None
    except ValueError:
        return None


def _read_key(path: str, key: bytes) -> int | None:
    """The value of `key` in a flat-keyed cgroup file ("key value" lines): 0 if the key is not in
    it, None if the file is not there."""
    data = _read_small(path)
    if data is None:
        return None
    for line in data.splitlines():
        name, _, value = line.partition(b" ")
        if name == key:
            return int(value)
    return 0


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


def _not_frozen(cgroup: Path) -> str:
    """The processes under a freezing cgroup that are not frozen yet, with where they wait: what
    a freeze that timed out was waiting for."""
    found = []
    for pid in sorted({pid for cg in _subtree(cgroup) for pid in _procs(cg)}):
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "running"
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if wchan not in ("__refrigerator", "do_freezer_trap"):  # where v1's and v2's freezers park them
            found.append(f"{pid} ({name}) at {wchan}")
    return ", ".join(found) or "none left"


def _set_freezer(cgroup: Path, frozen: bool, write: Callable[[bool], None], reached: Callable[[bool], bool]) -> None:
    """Freeze or thaw, and wait until the kernel says it is done.  A freeze that does not finish
    is undone before the error: a half-frozen sandbox would hold whatever it had frozen, and its
    killed processes (a frozen process acts on SIGKILL only once thawed), with nobody to thaw it."""
    write(frozen)
    try:
        _wait_for(lambda: reached(frozen), "freeze" if frozen else "thaw", cgroup,
                  "a process in uninterruptible sleep (e.g. on a hung network filesystem) can block it")
    except CorralError as e:
        waiting = _not_frozen(cgroup)
        if frozen:
            write(False)
            raise CorralError(f"{e} (undone: thawed); not frozen: {waiting}") from None
        raise CorralError(f"{e}; not thawed: {waiting}") from None


def _v2_frozen(cgroup: Path) -> bool:
    try:
        return _read_kv(cgroup / "cgroup.events").get("frozen") == 1
    except FileNotFoundError:  # a cgroup that is gone freezes nothing
        return False


def _freeze_v2(cgroup: Path, frozen: bool) -> None:
    _set_freezer(cgroup, frozen, lambda f: _write(cgroup / "cgroup.freeze", "1" if f else "0"),
                 lambda f: _v2_frozen(cgroup) == f)


def _v1_state(cgroup: Path) -> str:
    """THAWED, FREEZING (some process is not frozen yet) or FROZEN."""
    try:
        return (cgroup / "freezer.state").read_text().strip()
    except FileNotFoundError:
        return "THAWED"


def _v1_frozen(cgroup: Path) -> bool:
    return _v1_state(cgroup) == "FROZEN"


def _freeze_v1(cgroup: Path, frozen: bool) -> None:
    # Thawing waits for THAWED, not merely "not FROZEN": FREEZING is neither.
    _set_freezer(cgroup, frozen, lambda f: _write(cgroup / "freezer.state", "FROZEN" if f else "THAWED"),
                 lambda f: _v1_state(cgroup) == ("FROZEN" if f else "THAWED"))


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
        # The v2 cgroup last, unlike procs_files(): joining it is what makes the sensor watch the
        # child, and what corral's own child does before that (dropping its groups, opening the v1
        # cgroup.procs files, which are under a watched prefix) is then not reported.  Its first
        # event is the exec, so the process table learns it from that event and not by reading
        # /proc (a few file reads per step, slow while hundreds of steps start at once).
        first, *v1 = [str(p) for p in self.procs_files()]
        paths = [*v1, first]

        def join() -> None:  # between fork and exec: plain os calls only
            os.setgroups([])
            pid = str(os.getpid()).encode()
            for path in paths:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)

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
        # A freeze action (pipeline thread) can meet a release (the user's thread): each waits for
        # the state it wrote, so one at a time, or each would wait out the other's.
        self._freezer = threading.Lock()
        # controller -> this sandbox's directory in the v1 hierarchy carrying it (hybrid hosts only)
        self._v1 = {ctrl: mount / _BASE / name for ctrl, mount in _v1_mounts().items()}
        # step leaf -> its v1 limit counters once it is empty for good (None while it may still count):
        # v1 counts per step, and a sandbox of a long episode has many steps, most of them over
        self._leaves: dict[str, dict[str, int] | None] = {}
        self._leaves_lock = threading.Lock()

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
        with self._leaves_lock:
            self._leaves[leaf] = None
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

    # v2's freezer (cgroup.freeze, kernel 5.2+) wherever the sandbox's v2 directory has it, also
    # on hosts that mount v1's: v1's cannot freeze a shell that waits in vfork() for its child
    # (here about 1 in 100 freezes of a shell pipeline never finished), v2's counts it frozen.
    # v1's freezer is the fallback for kernels without cgroup.freeze.
    def _v1_freezer(self) -> Path | None:
        if "freezer" in self._v1 and not (self.path / "cgroup.freeze").exists():
            return self._v1["freezer"]
        return None

    def freeze(self) -> None:
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> None:
        with self._freezer:
            v1 = self._v1_freezer()
            if v1 is not None:
                _freeze_v1(v1, frozen)
            else:
                _freeze_v2(self.path, frozen)

    @property
    def frozen(self) -> bool:
        v1 = self._v1_freezer()
        return _v1_frozen(v1) if v1 is not None else _v2_frozen(self.path)

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
            # Thawed whether frozen here, by a freeze action, or half-way: a process frozen by v1's
            # freezer acts on its SIGKILL only once thawed, and an emptied sandbox is left thawed
            # (v2's reports "not frozen" while its frozen processes exit, so asking first misleads).
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
        # (Read with plain os calls on prepared paths: the pipeline calls this for many sandboxes.)
        counts: dict[str, int] = {}
        in_v1: list[tuple[str, Path, str, bytes]] = []
        for name, ctrl, v1_file, v2_file, key in _COUNTERS:
            if ctrl not in self._v1:  # v2 counts the whole subtree in the sandbox's own file
                found = _read_key(f"{self.path}/{v2_file}", key.encode())
                if found is not None:
                    counts[name] = found
            elif os.path.exists(f"{self._v1[ctrl]}/{v1_file}"):
                counts[name] = 0
                in_v1.append((name, self._v1[ctrl], v1_file, key.encode()))
        if in_v1:
            # v1 counts an event only in the cgroup it happened in: add up the steps (processes only
            # ever go into step leaves).  What a step counted is final once it is empty for good, and
            # its files are then not read again.
            with self._leaves_lock:
                leaves = list(self._leaves.items())
            for leaf, final in leaves:
                if final is None:
                    final = self._final_v1_counts(leaf)
                for name, d, v1_file, want in in_v1:
                    counts[name] += final[name] if final is not None else _read_key(f"{d}/{leaf}/{v1_file}", want) or 0
        return counts

    def _final_v1_counts(self, leaf: str) -> dict[str, int] | None:
        """The v1 limit counters of a step that has had processes and has none left (so for good:
        nothing moves a process back into a step), else None.  The v1 pids controller tells:
        pids.current 0 and pids.peak not (a step made but not joined yet is empty too; joining
        starts with the v1 hierarchies)."""
        pids = self._v1.get("pids")
        if pids is None:
            return None  # no way to tell: such a step is read every time
        if _read_int(f"{pids}/{leaf}/pids.current") != 0 or not _read_int(f"{pids}/{leaf}/pids.peak"):
            return None  # running, not started, removed meanwhile, or a kernel without pids.peak
        final = {name: _read_key(f"{self._v1[ctrl]}/{leaf}/{v1_file}", key.encode()) or 0
                 for name, ctrl, v1_file, _v2_file, key in _COUNTERS if ctrl in self._v1}
        with self._leaves_lock:
            if leaf in self._leaves:
                self._leaves[leaf] = final
        return final

    def pids_limit(self) -> int | None:
        """The sandbox's pids.max, or None when it has none (or the host has no pids controller)."""
        return _read_int(f"{self._v1.get('pids', self.path)}/pids.max")  # ("max": None)

    def pids_peak(self) -> int | None:
        """The most tasks the sandbox has had at once, or None where the kernel keeps no pids.peak."""
        return _read_int(f"{self._v1.get('pids', self.path)}/pids.peak")

    def pids_current(self) -> int:
        """Tasks (threads included) in the sandbox now, as its pids controller counts them; 0 if none."""
        return _read_int(f"{self._v1.get('pids', self.path)}/pids.current") or 0

    def notifying_counters(self) -> dict[str, Path]:
        """Controller -> the file holding its limit counter, for each counter whose file the kernel
        notifies (inotify IN_MODIFY) when it changes: cgroup v2's memory.events and pids.events.
        cgroup v1's pids.events and memory.oom_control never notify."""
        files = {"memory": self.path / "memory.events", "pids": self.path / "pids.events"}
        return {ctrl: f for ctrl, f in files.items() if ctrl not in self._v1 and f.exists()}

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
        if m and any(left_by_dead_owner(base / name, int(m[1])) for base in bases if (base / name).exists()):
            SandboxCgroup._existing(name).destroy()
            reaped.append(name)
    reap_stale_holders()
    _remove_empty_bases()
    return reaped


# ---------------------------------------------------------------------------- limit counters: when to look


_IN_MODIFY = 0x2
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
#: a sandbox whose task estimate comes this close to its pids limit is looked at every tick
_NEAR_MIN = 8


@dataclass
class _Limited:
    cgroup: SandboxCgroup
    wds: tuple[int, ...]  # inotify watches on its counter files that the kernel notifies
    pids_max: int | None  # its pids limit, when refused forks must be inferred (not notified)
    oom_from_exits: bool  # OOM kills not notified: inferred from SIGKILL exits
    tasks: int = 0  # estimate: pids.current when last looked, + forks - exits seen since

    @property
    def near(self) -> int:
        assert self.pids_max is not None
        return self.pids_max - max(_NEAR_MIN, self.pids_max // 4)

    @property
    def swept(self) -> bool:
        return self.pids_max is not None


class LimitWatch:
    """Which sandboxes' limit counters (SandboxCgroup.events) may have moved since the last look.

    Reading every sandbox's counters on every tick costs file reads in proportion to the number of
    sandboxes, whatever they do: at 500 idle sandboxes on cgroup v1 that was most of the pipeline
    thread's time.  Instead:

    - where the kernel notifies a counter file's changes (cgroup v2's memory.events and pids.events),
      one inotify instance says which sandbox to look at, and nothing else is needed;
    - where it does not (cgroup v1's memory.oom_control and pids.events: measured, no inotify event),
      the events the pipeline reads stand in.  An OOM kill ends a process with SIGKILL, so such an
      exit marks its sandbox (`exited`).  A fork is refused at the sandbox's pids limit only while
      it is there, and only forks bring it there: an estimate of its tasks (pids.current when last
      looked, plus forks, minus exits, since) that comes near the limit marks it, and it is then
      looked at every tick until it is below again (`forked`).  Threads make no fork events: so a
      sandbox with a pids limit is also checked once every `sweep` ticks, a slice of them at a time,
      by one read of its pids.peak, and looked at if that ever reached the limit.  Records the
      kernel dropped (`records_lost`) may have held those forks (the sweep covers them) or a SIGKILL
      exit: if the host's OOM kill count (/proc/vmstat) moved since the last such check, every
      sandbox whose OOM kills are inferred is looked at.

    Not seen on v1: a fork refused, or an OOM kill whose victim is not in the sandbox, because of a
    limit set above the sandbox (corral sets none there: its v1 directories hang off the root).
    Counters are totals, so a sandbox looked at late loses nothing: its hits are reported then.
    `forked`, `exited`, `records_lost`, `everything` and `due` are for the one thread that reads the events;
    `add` and `remove` may be called from any thread.
    """

    def __init__(self, sweep: int = 10) -> None:
        self.sweep = sweep
        self._lock = threading.Lock()
        self._limited: dict[int, _Limited] = {}
        self._wd_key: dict[int, int] = {}
        self._due: set[int] = set()
        self._rotation: deque[int] = deque()  # swept keys, next first (removed keys are skipped)
        self._swept = 0
        self._credit = 0.0
        self._fd: int | None = None
        self._inotify_failed = False
        self._host_ooms = _host_oom_kills()

    # -- any thread ------------------------------------------------------------------------------

    def add(self, key: int, cgroup: SandboxCgroup) -> None:
        self.remove(key)
        notified = self._watch(key, cgroup.notifying_counters())
        kept = cgroup.events()  # the counters this host keeps
        inferred = {ctrl for name, ctrl, *_files in _COUNTERS if name in kept and ctrl not in notified}
        limited = _Limited(cgroup, tuple(notified.values()),
                           pids_max=cgroup.pids_limit() if "pids" in inferred else None,
                           oom_from_exits="memory" in inferred, tasks=cgroup.pids_current())
        with self._lock:
            self._limited[key] = limited
            self._swept += int(limited.swept)
            if limited.swept:
                self._rotation.append(key)

    def remove(self, key: int) -> None:
        with self._lock:
            limited = self._limited.pop(key, None)
            if limited is not None:
                self._swept -= int(limited.swept)
            if len(self._rotation) > 2 * self._swept + 64:  # removed keys leave only when passed over
                self._rotation = deque(k for k in dict.fromkeys(self._rotation)
                                       if k in self._limited and self._limited[k].swept)
        if limited is not None:
            self._unwatch(limited.wds)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            self._limited.clear()
            self._wd_key.clear()
        if fd is not None:
            os.close(fd)

    # -- the thread that reads the events --------------------------------------------------------

    def forked(self, key: int) -> None:
        """A process of sandbox `key` forked."""
        limited = self._limited.get(key)
        if limited is None:
            return
        limited.tasks += 1
        if limited.pids_max is not None and limited.tasks >= limited.near:
            self._due.add(key)

    def exited(self, key: int, killed: bool) -> None:
        """A process of sandbox `key` exited; `killed`: by SIGKILL (as the OOM killer does)."""
        limited = self._limited.get(key)
        if limited is None:
            return
        limited.tasks = max(0, limited.tasks - 1)
        if killed and limited.oom_from_exits:
            self._due.add(key)

    def records_lost(self) -> None:
        """The kernel dropped event records: the forks and exits they held are unknown."""
        ooms = _host_oom_kills()
        if ooms != self._host_ooms:  # (None: no count to go by)
            self._host_ooms = ooms
            with self._lock:
                self._due.update(k for k, limited in self._limited.items() if limited.oom_from_exits)

    def everything(self) -> None:
        """Look at every sandbox next time (notifications were lost: what they said is unknown)."""
        with self._lock:
            self._due.update(self._limited)

    def due(self) -> list[int]:
        """The sandboxes to look at now (call once per tick, then look at them)."""
        self._drain()
        due, self._due = self._due, set()
        with self._lock:
            # each swept sandbox once in `sweep` calls: a share of them each time, the fraction carried
            self._credit = min(self._credit + self._swept / self.sweep, float(self._swept))
            n = math.floor(self._credit + 1e-9)
            self._credit -= n
            swept: list[tuple[int, _Limited]] = []
            while n > 0 and self._rotation:
                key = self._rotation.popleft()
                limited = self._limited.get(key)
                if limited is None or not limited.swept:
                    continue  # removed (or re-added, and queued again then)
                self._rotation.append(key)
                swept.append((key, limited))
                n -= 1
        for key, limited in swept:
            # (a refusal at its own limit needs the sandbox there at least once: pids.peak says)
            peak = limited.cgroup.pids_peak()
            if peak is None or limited.pids_max is None or peak >= limited.pids_max:
                due.add(key)
        with self._lock:
            looked = [(key, self._limited[key]) for key in due if key in self._limited]
        for key, limited in looked:
            if limited.pids_max is not None:
                # Start the estimate again from the kernel's count (threads included); still near
                # the limit, the sandbox is looked at again next tick.
                limited.tasks = limited.cgroup.pids_current()
                if limited.tasks >= limited.near:
                    self._due.add(key)
        return [key for key, _limited in looked]

    # -- inotify -----------------------------------------------------------------------------------

    def _watch(self, key: int, files: dict[str, Path]) -> dict[str, int]:
        """Controller -> inotify watch on its counter file; those that could not be watched are left
        out (and inferred from events instead)."""
        if not files or self._inotify_failed:
            return {}
        with self._lock:
            if self._fd is None:
                fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
                if fd < 0:
                    self._inotify_failed = True  # e.g. fs.inotify.max_user_instances reached
                    return {}
                self._fd = fd
            watched = {}
            for ctrl, file in files.items():
                wd = _libc.inotify_add_watch(self._fd, os.fsencode(file), _IN_MODIFY)
                if wd >= 0:
                    watched[ctrl] = wd
                    self._wd_key[wd] = key
            return watched

    def _unwatch(self, wds: tuple[int, ...]) -> None:
        with self._lock:
            for wd in wds:
                if self._wd_key.pop(wd, None) is not None and self._fd is not None:
                    _libc.inotify_rm_watch(self._fd, wd)  # EINVAL when the cgroup is gone already: fine

    def _drain(self) -> None:
        fd = self._fd
        if fd is None:
            return
        while True:
            try:
                buf = os.read(fd, 64 * 1024)
            except BlockingIOError:
                return
            except OSError:  # closed under us
                return
            offset = 0
            while offset + _INOTIFY_EVENT.size <= len(buf):
                wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(buf, offset)
                offset += _INOTIFY_EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    self.everything()
                    continue
                with self._lock:
                    key = self._wd_key.pop(wd, None) if mask & _IN_IGNORED else self._wd_key.get(wd)
                if key is not None and not mask & _IN_IGNORED:
                    self._due.add(key)


def _host_oom_kills() -> int | None:
    """Processes the OOM killer has killed on this host since boot (every memcg OOM kill included)."""
    try:
        with open("/proc/vmstat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for line in data.splitlines():
        if line.startswith(b"oom_kill "):
            return int(line[9:])
    return None


_libc = ctypes.CDLL(None, use_errno=True)
