"""A per-sandbox exec deny list, enforced in the kernel before the new image runs.

:class:`ExecGuard` loads ``bpf/prevent.bpf.c`` (programs on the execve and
execveat syscall tracepoints).  For a task in one of its sandboxes, an exec is
denied when the basename of the file is a denied name, its path starts with a
denied prefix, or the first KiB of argv holds a denied pattern.  An enforcing
sandbox's denied exec gets SIGKILL at the syscall's entry (the caller dies,
the new image never runs); an observing one only reports it.  Every denied
exec is reported as a :class:`DeniedExec`.

Limits (the kernel sees the exec before the kernel resolves it):

- names and prefixes match the path as given, joined to the cwd (or
  execveat's dirfd) when relative; ``..`` and symlinks are not resolved, so a
  path prefix is a tripwire, not a boundary (``/tmp/ok/../evil/x``, or a link
  to a denied file, passes it);
- strings in user memory that is not resident at the syscall (a tracepoint
  cannot take page faults) are not seen: such a name or argv matches nothing;
- argv is searched in its first 1 KiB (and first 64 entries); a pattern in a
  config file or the environment is not seen; a renamed binary passes the
  name list: the network guard and the detectors are the other layers.

Map layouts mirror ``bpf/prevent.h``.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import CorralError, HostError
from corral.sensor.guard import U32, CgroupGuard
from corral.sensor.libbpf import BpfObject, Link
from corral.sensor.ringbuf import RingBuffer

DEFAULT_OBJECT = Path(__file__).parent.parent / "_bpf" / "prevent.bpf.o"

# Limits of the kernel's layouts (bpf/prevent.h).
NAME_MAX = 31      # PREVENT_NAME_LEN 32, with the NUL
PREFIX_MAX = 252   # PREVENT_PREFIX_LEN: an LPM trie key holds 256 data bytes, 4 are the sandbox id
ARGV_PATTERNS = 8  # PREVENT_ARGV_MAX
ARGV_PATTERN_MAX = 32  # PREVENT_ARGV_PAT
ARGV_SEARCHED = 1024   # PREVENT_ARGV_LEN

#: How long a record may wait in the ring before read() looks: the kernel
#: batches wake-ups (WAKEUP_BYTES in prevent.bpf.c).
POLL_SLICE_S = 0.02


class DenyKind(enum.IntEnum):
    NAME = 1  # basename of the file executed
    PATH = 2  # path prefix
    ARGV = 3  # substring of argv


@dataclass(frozen=True)
class ExecDenyList:
    """What a sandbox may not exec: basenames, path prefixes, argv substrings."""

    names: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()


# Miners and tunnels (ways out that the egress allow list does not see coming).
DEFAULT_EXEC_DENY = ExecDenyList(
    names=("xmrig", "xmr-stak", "t-rex", "lolminer", "nbminer", "cpuminer", "minerd", "ethminer",
           "ngrok", "cloudflared", "chisel", "frpc", "bore"),
    argv=("stratum+tcp", "stratum+ssl", "stratum2+tcp", "--donate-level"),
)


@dataclass(frozen=True)
class DeniedExec:
    """One exec that matched a deny entry; ``enforced``: it was killed (SIGKILL)."""

    ts_ns: int         # CLOCK_BOOTTIME
    cgroup_id: int
    sandbox_id: int
    pid: int           # of the caller: the exec never ran
    tid: int
    uid: int
    comm: str          # the caller's
    filename: str      # as passed to execve()
    path: str          # resolved against the cwd or dirfd; "" if it could not be
    kind: DenyKind
    rule_index: int    # which entry of that kind, in the order they were added
    rule: str          # that entry ("" if the sandbox was removed since)
    enforced: bool


# struct prevent_sandbox: mode, argv_count, argv_len[8], argv[8][32]
_SANDBOX = struct.Struct(f"=II{ARGV_PATTERNS}s{ARGV_PATTERNS * ARGV_PATTERN_MAX}s")
_NAME_KEY = struct.Struct(f"=I{NAME_MAX + 1}s")            # struct deny_name_key
_PATH_KEY = struct.Struct(f"=II{PREFIX_MAX}s")              # struct deny_path_key
_PATH_FIXED_BITS = 32
# struct denied_exec
_RECORD = struct.Struct("=QQIIIIIIII16s256s256s")
_PROGRAMS = {"tp/syscalls/sys_enter_execve", "tp/syscalls/sys_enter_execveat"}


def object_path() -> Path:
    return Path(os.environ.get("CORRAL_PREVENT_OBJECT", DEFAULT_OBJECT))


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _encode(what: str, text: str) -> bytes:
    raw = text.encode()
    if not raw or b"\0" in raw:
        raise CorralError(f"exec deny {what} {text!r} must be non-empty and hold no NUL byte")
    return raw


@dataclass
class _Sandbox:
    enforce: bool
    rules: dict[DenyKind, list[str]] = field(default_factory=lambda: {k: [] for k in DenyKind})


class ExecGuard(CgroupGuard):
    """The exec guard of one corral process and the deny lists of its sandboxes.

    Cgroups not bound to one of this guard's sandboxes are never touched, so
    several guards can be loaded at once.  Methods may be called from several
    threads.
    """

    WHAT = "exec guard"

    def __init__(self, path: Path | None = None) -> None:
        self._sandboxes: dict[int, _Sandbox] = {}
        self._ring: RingBuffer | None = None
        path = path or object_path()

        def attach(obj: BpfObject) -> list[Link]:
            programs = [p for p in obj.programs() if p.section in _PROGRAMS]
            if {p.section for p in programs} != _PROGRAMS:
                raise HostError(f"{path} lacks some of {sorted(_PROGRAMS)}: run `make setup`")
            return [prog.attach() for prog in programs]

        super().__init__(path, attach)
        events = self._maps["events"]
        try:
            self._ring = RingBuffer(events.fd, events.max_entries)
        except BaseException:
            self.close()
            raise
        self._config = self._maps["sandboxes"]
        self._names = self._maps["deny_names"]
        self._paths = self._maps["deny_paths"]
        self._dropped = self._maps["dropped"]

    def _release(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._sandboxes.clear()

    @contextlib.contextmanager
    def _open(self, sandbox_id: int | None = None) -> Iterator[_Sandbox | None]:
        """Hold the lock while maps are used; check the guard is open and the sandbox known."""
        with self._lock:
            self._check_closed()
            sandbox = None
            if sandbox_id is not None:
                sandbox = self._sandboxes.get(sandbox_id)
                if sandbox is None:
                    raise CorralError(f"sandbox {sandbox_id} is not known to the exec guard: "
                                      "call add_sandbox() first")
            yield sandbox

    def _write_config(self, sandbox_id: int, sandbox: _Sandbox) -> None:
        """The kernel's per-sandbox entry: the mode and the argv patterns."""
        pats = [p.encode() for p in sandbox.rules[DenyKind.ARGV]]
        value = _SANDBOX.pack(int(sandbox.enforce), len(pats), bytes(len(p) for p in pats),
                              b"".join(p.ljust(ARGV_PATTERN_MAX, b"\0") for p in pats))
        self._update(self._config, U32.pack(sandbox_id), value, "sandbox")

    # -- sandboxes and their cgroups ----------------------------------------

    def add_sandbox(self, sandbox_id: int, enforce: bool, cgroup_ids: Iterable[int] = ()) -> None:
        """Start guarding a sandbox with an empty deny list (see :meth:`deny`)."""
        self._check_id(sandbox_id)
        with self._open():
            if sandbox_id in self._sandboxes:
                raise CorralError(f"sandbox {sandbox_id} is already guarded: remove_sandbox() it first")
            sandbox = _Sandbox(enforce)
            self._write_config(sandbox_id, sandbox)
            self._sandboxes[sandbox_id] = sandbox
            for cgroup_id in cgroup_ids:
                self.bind_cgroup(cgroup_id, sandbox_id)

    def set_enforce(self, sandbox_id: int, enforce: bool) -> None:
        """Switch between killing denied execs (True) and only reporting them."""
        with self._open(sandbox_id) as sandbox:
            assert sandbox is not None
            sandbox.enforce = enforce
            self._write_config(sandbox_id, sandbox)

    def remove_sandbox(self, sandbox_id: int) -> None:
        """Forget the sandbox: its cgroups, deny entries and mode.  A no-op for an unknown one."""
        with self._open():
            self._unbind_sandbox(sandbox_id)
            for table, size in ((self._names, _NAME_KEY.size), (self._paths, _PATH_KEY.size)):
                offset = 0 if table is self._names else 4  # sandbox_id in the key
                for key in [k for k in table.keys(size) if U32.unpack_from(k, offset)[0] == sandbox_id]:
                    table.delete(key)
            self._config.delete(U32.pack(sandbox_id))
            self._sandboxes.pop(sandbox_id, None)

    # -- deny entries --------------------------------------------------------

    def deny_name(self, sandbox_id: int, name: str) -> None:
        """Deny executing a file with this basename (exact, case-sensitive), wherever it is."""
        raw = _encode("name", name)
        if b"/" in raw:
            raise CorralError(f"exec deny name {name!r} holds a '/': names are basenames; "
                              "use deny_path() for paths")
        if len(raw) > NAME_MAX:
            raise CorralError(f"exec deny name {name!r} is {len(raw)} bytes: at most {NAME_MAX} "
                              "(PREVENT_NAME_LEN in bpf/prevent.h)")
        with self._open(sandbox_id) as sandbox:
            assert sandbox is not None
            names = sandbox.rules[DenyKind.NAME]
            if name in names:
                return
            self._update(self._names, _NAME_KEY.pack(sandbox_id, raw), U32.pack(len(names)), "name")
            names.append(name)

    def deny_path(self, sandbox_id: int, prefix: str) -> None:
        """Deny executing any file whose absolute path starts with ``prefix`` (bytewise:
        ``/tmp/evil/`` for a directory; ``/tmp/evil`` also covers ``/tmp/evil2``)."""
        raw = _encode("path", prefix)
        if not raw.startswith(b"/"):
            raise CorralError(f"exec deny path {prefix!r} must be absolute")
        if len(raw) > PREFIX_MAX:
            raise CorralError(f"exec deny path {prefix!r} is {len(raw)} bytes: at most {PREFIX_MAX} "
                              "(PREVENT_PREFIX_LEN in bpf/prevent.h)")
        with self._open(sandbox_id) as sandbox:
            assert sandbox is not None
            paths = sandbox.rules[DenyKind.PATH]
            if prefix in paths:
                return
            key = _PATH_KEY.pack(_PATH_FIXED_BITS + 8 * len(raw), sandbox_id, raw)
            self._update(self._paths, key, U32.pack(len(paths)), "path")
            paths.append(prefix)

    def deny_argv(self, sandbox_id: int, pattern: str) -> None:
        """Deny any exec whose argv (its first KiB) contains ``pattern`` within one argument."""
        raw = _encode("argv pattern", pattern)
        if len(raw) > ARGV_PATTERN_MAX:
            raise CorralError(f"exec deny argv pattern {pattern!r} is {len(raw)} bytes: at most "
                              f"{ARGV_PATTERN_MAX} (PREVENT_ARGV_PAT in bpf/prevent.h)")
        with self._open(sandbox_id) as sandbox:
            assert sandbox is not None
            patterns = sandbox.rules[DenyKind.ARGV]
            if pattern in patterns:
                return
            if len(patterns) >= ARGV_PATTERNS:
                raise CorralError(f"sandbox {sandbox_id} already has {ARGV_PATTERNS} exec deny argv "
                                  f"patterns, the most there may be (PREVENT_ARGV_MAX in bpf/prevent.h); "
                                  f"cannot add {pattern!r}")
            patterns.append(pattern)
            try:
                self._write_config(sandbox_id, sandbox)
            except BaseException:
                patterns.pop()
                raise

    def deny(self, sandbox_id: int, deny_list: ExecDenyList) -> None:
        """Add every entry of a list (e.g. :data:`DEFAULT_EXEC_DENY`)."""
        for name in deny_list.names:
            self.deny_name(sandbox_id, name)
        for prefix in deny_list.paths:
            self.deny_path(sandbox_id, prefix)
        for pattern in deny_list.argv:
            self.deny_argv(sandbox_id, pattern)

    def rules(self, sandbox_id: int) -> ExecDenyList:
        """The sandbox's entries, in the order they were added (their indexes)."""
        with self._open(sandbox_id) as sandbox:
            assert sandbox is not None
            r = sandbox.rules
            return ExecDenyList(tuple(r[DenyKind.NAME]), tuple(r[DenyKind.PATH]), tuple(r[DenyKind.ARGV]))

    # -- reports -------------------------------------------------------------

    def read(self, timeout: float = 0.0) -> list[DeniedExec]:
        """Denied execs reported so far, waiting up to ``timeout`` seconds for the first."""
        out: list[DeniedExec] = []

        def decode(view: memoryview, off: int, size: int) -> None:
            (ts, cgroup_id, sandbox_id, pid, tid, uid, kind, index, enforced, _pad,
             comm, filename, path) = _RECORD.unpack_from(view, off)
            sandbox = self._sandboxes.get(sandbox_id)
            rules = sandbox.rules.get(DenyKind(kind), []) if sandbox else []
            out.append(DeniedExec(ts, cgroup_id, sandbox_id, pid, tid, uid, _cstr(comm), _cstr(filename),
                                  _cstr(path), DenyKind(kind), index,
                                  rules[index] if index < len(rules) else "", bool(enforced)))

        deadline = time.monotonic() + timeout
        while True:
            # The lock is held for one poll slice at a time, so that deny_*() calls from
            # other threads wait no longer than that; the kernel wakes us only per batch.
            with self._open():
                ring = self._ring
                assert ring is not None
                if ring.pending() or time.monotonic() >= deadline:
                    # One record type: every record goes to the fallback decoder, which collects it.
                    ring.read({}, 0, decode)
                    break
                ring.wait(min(deadline - time.monotonic(), POLL_SLICE_S))
        return out

    @property
    def dropped(self) -> int:
        """Reports lost because the ring was full (the execs were still denied)."""
        with self._open():
            return self._dropped.sum_per_cpu()


__all__ = ["DEFAULT_EXEC_DENY", "DeniedExec", "DenyKind", "ExecDenyList", "ExecGuard"]
