"""The event model shared by every stage of the pipeline.

An event is a thin, read-only view over one record from the kernel
(bpf/corral.h): the record is unpacked once into a flat tuple and the typed
properties below index into it.  Strings are decoded only when asked for, so
decoding a batch costs one ``struct.unpack_from`` and one small object per
record.  ``records.py`` in the sensor owns the binary layouts.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from corral.enrich.proctable import Process

# Event type ids: enum event_type in bpf/corral.h.
EXEC, FORK, EXIT, CONNECT, SEND, BIND, LISTEN, ACCEPT, OPEN, UNLINK, RENAME = range(1, 12)
DUP_SOCKET, PTRACE, MOUNT, NS, MODULE_LOAD, BPF, MEMFD_EXEC, SETUID, CAPSET, SIGNAL = range(12, 22)
DROP = 100  # made in user space from the kernel's per-CPU drop counter
# Derived events: made in user space by detectors (corral.detect) from other events.
DNS, FLOW, SCAN, CPU_SATURATION, LONG_SESSION, CRED_THEN_EGRESS, DNS_TUNNEL, OUTLIVES_STEP = range(101, 109)
EXEC_DENIED = 109  # from the kernel's exec deny list (respond.prevent), not the sensor
LIMIT_HIT = 110  # a sandbox's cgroup refused a fork or OOM-killed a process

KIND_NAMES: dict[int, str] = {
    EXEC: "exec", FORK: "fork", EXIT: "exit", CONNECT: "connect", SEND: "send", BIND: "bind",
    LISTEN: "listen", ACCEPT: "accept", OPEN: "open", UNLINK: "unlink", RENAME: "rename",
    DUP_SOCKET: "dup_socket", PTRACE: "ptrace", MOUNT: "mount", NS: "ns",
    MODULE_LOAD: "module_load", BPF: "bpf", MEMFD_EXEC: "memfd_exec", SETUID: "setuid",
    CAPSET: "capset", SIGNAL: "signal", DROP: "drop",
    DNS: "dns", FLOW: "flow", SCAN: "scan", CPU_SATURATION: "cpu_saturation", LONG_SESSION: "long_session",
    CRED_THEN_EGRESS: "cred_then_egress", DNS_TUNNEL: "dns_tunnel", OUTLIVES_STEP: "outlives_step",
    EXEC_DENIED: "exec_denied", LIMIT_HIT: "limit_hit",
}
KIND_IDS: dict[str, int] = {name: type_id for type_id, name in KIND_NAMES.items()}
KINDS: frozenset[str] = frozenset(KIND_NAMES.values())

_CLOCK_OFFSET_NS = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def wall_time_ns(boot_ns: int) -> int:
    """A kernel CLOCK_BOOTTIME timestamp as nanoseconds since the epoch."""
    return boot_ns + _CLOCK_OFFSET_NS


_last_second: list[Any] = [None, ""]  # events come in time order: one cached second saves a strftime each


def rfc3339(wall_ns: int) -> str:
    """RFC 3339 in UTC with microseconds."""
    secs, ns = divmod(wall_ns, 1_000_000_000)
    if _last_second[0] != secs:
        _last_second[:] = [secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))]
    return f"{_last_second[1]}.{ns // 1000:06d}Z"


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class Event:
    """Fields every event has: when, who, and in which watched cgroup."""

    __slots__ = ("_t", "proc")
    _t: tuple[Any, ...]
    #: the process that did it, as the process table knew it then (set by the Monitor)
    proc: Process | None
    #: names shown by to_dict() beyond the common ones
    FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_tuple(cls, values: tuple[Any, ...]) -> Event:
        ev = object.__new__(cls)
        ev._t = values
        ev.proc = None
        return ev

    @property
    def kind(self) -> str:
        return KIND_NAMES.get(self._t[2], "unknown")

    @property
    def ts_ns(self) -> int:
        """Kernel timestamp (CLOCK_BOOTTIME, ns)."""
        return int(self._t[0])

    @property
    def cgroup_id(self) -> int:
        return int(self._t[1])

    @property
    def type(self) -> int:
        return int(self._t[2])

    @property
    def pid(self) -> int:
        """Process id (the kernel's tgid)."""
        return int(self._t[3])

    @property
    def tid(self) -> int:
        return int(self._t[4])

    @property
    def ppid(self) -> int:
        return int(self._t[5])

    @property
    def uid(self) -> int:
        return int(self._t[6])

    @property
    def sandbox_id(self) -> int:
        return int(self._t[7])

    @property
    def step_id(self) -> int:
        return int(self._t[8])

    @property
    def comm(self) -> str:
        return _cstr(self._t[9])

    @property
    def time_ns(self) -> int:
        """Wall-clock time of the event, ns since the epoch."""
        return wall_time_ns(self.ts_ns)

    def to_dict(self) -> dict[str, Any]:
        t = self._t  # read the tuple directly: this runs for every event the store records
        out: dict[str, Any] = {
            "kind": KIND_NAMES.get(t[2], "unknown"), "time": rfc3339(wall_time_ns(t[0])), "ts_ns": int(t[0]),
            "pid": int(t[3]), "tid": int(t[4]), "ppid": int(t[5]), "uid": int(t[6]),
            "comm": _cstr(t[9]), "cgroup_id": int(t[1]),
            "sandbox_id": int(t[7]), "step_id": int(t[8]),
        }
        for name in self.FIELDS:
            out[name] = getattr(self, name)
        if self.proc is not None:
            out["proc"] = {"exe": self.proc.exe, "name": self.proc.name, "cmdline": self.proc.cmdline,
                           "cwd": self.proc.cwd}
        return out

    def __repr__(self) -> str:
        body = " ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS)
        return f"<{self.kind} pid={self.pid} comm={self.comm!r} {body}>"


class ExecEvent(Event):
    __slots__ = ()
    FIELDS = ("filename", "argv", "cwd", "args_truncated", "stdio_sockets", "exe_ctime_ns")

    @property
    def flags(self) -> int:
        return int(self._t[10])

    @property
    def exe_ctime_ns(self) -> int:
        """When the executable's inode last changed (written, created, chmod-ed), ns since the epoch."""
        return int(self._t[12])

    @property
    def filename(self) -> str:
        return _cstr(self._t[13])

    @property
    def cwd(self) -> str:
        return _cstr(self._t[14])

    @property
    def argv(self) -> list[str]:
        raw: bytes = self._t[15]
        # One decode, then split: NUL is a byte of its own in UTF-8, so this equals decoding each
        # argument, at a third of the cost (exec events are what the rules look at most).
        return raw.rstrip(b"\0").decode(errors="replace").split("\0") if raw else []

    @property
    def args_truncated(self) -> bool:
        return bool(self.flags & 1)

    @property
    def stdio_sockets(self) -> list[int]:
        """Which of fds 0, 1, 2 were sockets when the new image started."""
        return [fd for fd in (0, 1, 2) if self.flags & (2 << fd)]


_FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}


class NetEvent(Event):
    """connect, send, bind, listen, accept (and dup_socket, below)."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ("family", "addr", "port", "sock_type", "protocol", "result",
                                         "fd", "local_port", "unix_path")

    @property
    def result(self) -> int:
        return int(self._t[10])

    @property
    def fd(self) -> int:
        return int(self._t[11])

    @property
    def family(self) -> str:
        fam = self._t[12]
        return _FAMILIES.get(fam) or str(fam)

    @property
    def port(self) -> int:
        return int(self._t[13])

    @property
    def sock_type(self) -> str:
        return {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}.get(self._t[14], str(self._t[14]))

    @property
    def protocol(self) -> int:
        return int(self._t[15])

    @property
    def addr(self) -> str:
        fam = self._t[12]
        if fam == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, self._t[16][:4])
        if fam == socket.AF_INET6:
            return socket.inet_ntop(socket.AF_INET6, self._t[16])  # RFC 5952 text, as ipaddress writes it
        return ""

    @property
    def local_port(self) -> int:
        return int(self._t[17])

    @property
    def unix_path(self) -> str:
        return _cstr(self._t[18])


class DupSocketEvent(NetEvent):
    """A socket duplicated onto fd 0, 1 or 2; addr/port are its peer."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ("target_fd", "source_fd", "family", "addr", "port", "sock_type",
                                         "protocol")

    @property
    def target_fd(self) -> int:
        return self.fd

    @property
    def source_fd(self) -> int:
        return self.result


FileId = tuple[int, int]
"""A file as FileEvent names it: (the kernel's device number, inode number)."""


def file_id(path: str | os.PathLike[str]) -> FileId:
    st = os.stat(path)
    # user space's dev_t encoding to the kernel's internal one (sb->s_dev)
    return (os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino


class FileEvent(Event):
    """open, unlink, rename of a watched path or inode."""

    __slots__ = ()
    FIELDS = ("path", "path2", "flags", "result", "match", "dev", "ino")

    @property
    def result(self) -> int:
        return int(self._t[10])

    @property
    def flags(self) -> int:
        return int(self._t[11])

    @property
    def match(self) -> list[str]:
        bits = self._t[12]
        return [name for bit, name in ((1, "prefix"), (2, "inode"), (4, "debug")) if bits & bit]

    @property
    def dev(self) -> int:
        return int(self._t[13])

    @property
    def ino(self) -> int:
        return int(self._t[14])

    @property
    def path(self) -> str:
        return _cstr(self._t[15])

    @property
    def path2(self) -> str:
        return _cstr(self._t[16])

    @property
    def writable(self) -> bool:
        return bool(self.flags & 0o3) or bool(self.flags & 0o100)  # O_WRONLY|O_RDWR, O_CREAT

    @property
    def truncates(self) -> bool:
        """Opened with O_TRUNC: whatever the file held is gone."""
        return bool(self.flags & 0o1000) and self.writable


class SysEvent(Event):
    """The generic record: four integers and up to three strings."""

    __slots__ = ()

    def _arg(self, i: int) -> int:
        return int(self._t[10 + i])

    def _str(self, i: int) -> str:
        return _cstr(self._t[14 + i])


class ForkEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("child_pid",)

    @property
    def child_pid(self) -> int:
        return self._arg(0)


class ExitEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("exit_code", "signal")

    @property
    def exit_code(self) -> int:
        return self._arg(0)

    @property
    def signal(self) -> int:
        """The signal that killed the process, or 0."""
        return self._arg(1)


class PtraceEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("request", "target_pid")

    @property
    def request(self) -> int:
        return self._arg(0)

    @property
    def target_pid(self) -> int:
        return self._arg(1)


_MOUNT_OPS = ("mount", "umount", "move_mount", "fsopen", "pivot_root")


class MountEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("op", "target", "source", "fstype", "flags")

    @property
    def flags(self) -> int:
        return self._arg(0)

    @property
    def op(self) -> str:
        return _MOUNT_OPS[self._arg(1)] if self._arg(1) < len(_MOUNT_OPS) else str(self._arg(1))

    @property
    def target(self) -> str:
        return self._str(0)

    @property
    def source(self) -> str:
        return self._str(1)

    @property
    def fstype(self) -> str:
        return self._str(2)


_NS_FLAGS = ((0x00020000, "mnt"), (0x02000000, "cgroup"), (0x04000000, "uts"), (0x08000000, "ipc"),
             (0x10000000, "user"), (0x20000000, "pid"), (0x40000000, "net"), (0x00000080, "time"))
_NS_OPS = ("unshare", "setns", "clone", "clone3")


class NsEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("op", "namespaces", "fd")

    @property
    def op(self) -> str:
        return _NS_OPS[self._arg(1)] if self._arg(1) < len(_NS_OPS) else str(self._arg(1))

    @property
    def namespaces(self) -> list[str]:
        """The namespace types asked for (setns with nstype 0 means 'any': [])."""
        return [name for bit, name in _NS_FLAGS if self._arg(0) & bit]

    @property
    def fd(self) -> int:
        return self._arg(2)


class ModuleLoadEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("op", "params")

    @property
    def op(self) -> str:
        return "finit_module" if self._arg(0) else "init_module"

    @property
    def params(self) -> str:
        return self._str(0)


_BPF_CMDS = ("map_create", "map_lookup_elem", "map_update_elem", "map_delete_elem",
             "map_get_next_key", "prog_load")


class BpfEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("cmd",)

    @property
    def cmd(self) -> str:
        c = self._arg(0)
        return _BPF_CMDS[c] if 0 <= c < len(_BPF_CMDS) else str(c)


class MemfdExecEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("memfd_name", "filename")

    @property
    def memfd_name(self) -> str:
        return self._str(0)

    @property
    def filename(self) -> str:
        return self._str(1)


_SETID_OPS = ("setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
              "setfsuid", "setfsgid")


class SetuidEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("op", "ids")

    @property
    def op(self) -> str:
        return _SETID_OPS[self._arg(0)] if self._arg(0) < len(_SETID_OPS) else str(self._arg(0))

    @property
    def ids(self) -> list[int]:
        """The ids asked for, in the syscall's order (-1: unchanged)."""
        n = {"setreuid": 2, "setregid": 2, "setresuid": 3, "setresgid": 3}.get(self.op, 1)
        return [(self._arg(i) + 2**31) % 2**32 - 2**31 for i in range(1, 1 + n)]


class CapsetEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("effective", "permitted", "inheritable")

    @property
    def effective(self) -> int:
        return self._arg(0)

    @property
    def permitted(self) -> int:
        return self._arg(1)

    @property
    def inheritable(self) -> int:
        return self._arg(2)


_SIGNAL_OPS = ("kill", "tkill", "tgkill")


class SignalEvent(SysEvent):
    __slots__ = ()
    FIELDS = ("op", "target_pid", "signal")

    @property
    def target_pid(self) -> int:
        return self._arg(0)

    @property
    def signal(self) -> int:
        return self._arg(1)

    @property
    def op(self) -> str:
        return _SIGNAL_OPS[self._arg(2)] if self._arg(2) < len(_SIGNAL_OPS) else str(self._arg(2))


class DropEvent(Event):
    """Records the kernel could not hand over because the ring buffer was full."""

    __slots__ = ()
    FIELDS = ("count", "total")

    @classmethod
    def make(cls, count: int, total: int) -> DropEvent:
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        ev = cls.from_tuple((now, 0, DROP, 0, 0, 0, 0, 0, 0, b"", count, total))
        assert isinstance(ev, DropEvent)
        return ev

    @property
    def count(self) -> int:
        """Records lost since the previous drop event."""
        return int(self._t[10])

    @property
    def total(self) -> int:
        return int(self._t[11])


class DerivedEvent(Event):
    """An event made in user space (a DNS question, a classified flow, a scan...).

    It carries the header of the process it is about (pid, sandbox, step, ...)
    and its own fields in ``data``, named as rules use them without the kind
    prefix (a ``scan`` event's ``data["hosts"]`` is the rule field ``scan.hosts``).
    """

    __slots__ = ("data",)
    data: dict[str, Any]

    @classmethod
    def make(cls, kind: str, /, *, ts_ns: int | None = None, cgroup_id: int = 0, pid: int = 0, tid: int = 0,
             ppid: int = 0, uid: int = 0, sandbox_id: int = 0, step_id: int = 0, comm: str = "",
             proc: Process | None = None, **data: Any) -> DerivedEvent:
        ts = time.clock_gettime_ns(time.CLOCK_BOOTTIME) if ts_ns is None else ts_ns
        ev = object.__new__(cls)
        ev._t = (ts, cgroup_id, KIND_IDS[kind], pid, tid, ppid, uid, sandbox_id, step_id, comm.encode()[:16])
        ev.proc = proc
        ev.data = data
        return ev

    @classmethod
    def about(cls, kind: str, source: Event, /, *, ts_ns: int | None = None, **data: Any) -> DerivedEvent:
        """A derived event about the same process, sandbox and step as ``source``."""
        return cls.make(kind, ts_ns=source.ts_ns if ts_ns is None else ts_ns, cgroup_id=source.cgroup_id,
                        pid=source.pid, tid=source.tid, ppid=source.ppid, uid=source.uid,
                        sandbox_id=source.sandbox_id, step_id=source.step_id, comm=source.comm,
                        proc=source.proc, **data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(self.data)
        return out

    def __repr__(self) -> str:
        return f"<{self.kind} pid={self.pid} {self.data!r}>"


# -- a few words for people ----------------------------------------------------------

_EVENT_HEADER = frozenset({"kind", "time", "ts_ns", "pid", "tid", "ppid", "uid", "comm", "cgroup_id", "sandbox_id",
                           "step_id", "proc", "seq", "sandbox", "ancestors"})


def _result(code: int) -> str:
    return "ok" if code >= 0 else errno.errorcode.get(-code, f"errno {-code}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe(record: Mapping[str, Any]) -> str:
    """What an event says, in a few words: the part of a `corral trace` or `corral events`
    line after when and who.  `record` is Event.to_dict(), live or as the store keeps it."""
    kind = record["kind"]
    if kind == "exec":
        extra = " (argv truncated)" if record.get("args_truncated") else ""
        if record.get("stdio_sockets"):
            extra += f" (fds {','.join(map(str, record['stdio_sockets']))} are sockets)"
        return f"{record.get('filename')} {json.dumps(record.get('argv') or [])} cwd={record.get('cwd')}{extra}"
    if kind == "fork":
        return f"child {record.get('child_pid')}"
    if kind == "exit":
        return f"killed by {_signal_name(record['signal'])}" if record.get("signal") else \
            f"exit {record.get('exit_code')}"
    if "sock_type" in record:  # connect, send, bind, listen, accept, dup_socket
        if record.get("family") == "unix":
            proto, where = "unix", record.get("unix_path") or "(unnamed unix socket)"
        else:
            proto = {"stream": "tcp", "dgram": "udp"}.get(record["sock_type"], record["sock_type"])
            addr = f"[{record.get('addr')}]" if record.get("family") == "inet6" else record.get("addr")
            where = f"{addr}:{record.get('port')}"
        if kind == "dup_socket":
            return f"socket fd {record.get('source_fd')} -> fd {record.get('target_fd')} (peer {where})"
        return f"{proto} {where} {_result(record.get('result', 0))}"
    if "path" in record and "match" in record:  # open, unlink, rename
        target = f"{record['path']} -> {record.get('path2')}" if kind == "rename" else record["path"]
        flags = int(record.get("flags") or 0)
        mode = " write" if kind == "open" and (flags & 0o3 or flags & 0o100) else ""  # O_WRONLY|O_RDWR, O_CREAT
        return f"{target}{mode} {_result(record.get('result', 0))} [{','.join(record.get('match') or [])}]"
    if kind == "drop":
        return f"{record.get('count')} events lost: the ring buffer was full ({record.get('total')} in all)"
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str | list | dict) else v}"
                    for k, v in record.items() if k not in _EVENT_HEADER)
