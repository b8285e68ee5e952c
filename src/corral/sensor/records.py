"""Binary layouts of the kernel's event records (mirror of bpf/corral.h).

Each layout is a ``struct.Struct`` whose fields follow the C struct member by
member; ``MEMBERS`` names them in the same order so tests/test_layout.py can
check every offset against the compiled object's BTF.  Change bpf/corral.h
and this file together.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from corral import events as ev

HEADER_FORMAT = "QQIIIIIII4x16s"
HEADER_MEMBERS = ("ts_ns", "cgroup_id", "type", "pid", "tid", "ppid", "uid", "sandbox_id",
                  "step_id", "_pad", "comm")
TYPE_OFFSET = 16  # event_header.type

PATH_LEN = 256
ARGS_LEN = 2048

# struct name -> (struct format after the header, C member names after hdr)
LAYOUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "exec_event": ("IIQ256s256s", ("flags", "args_len", "exe_ctime_ns", "filename", "cwd")),
    "net_event": ("iIHHHH16sH6x128s", ("result", "fd", "family", "port", "sock_type", "protocol",
                                       "addr", "local_port", "_pad", "unix_path")),
    "file_event": ("iIIIQ256s256s", ("result", "flags", "match", "dev", "ino", "path", "path2")),
    "sys_event": ("4q128s128s32s", ("arg", "str", "str2", "str3")),
}

STRUCTS: dict[str, struct.Struct] = {
    name: struct.Struct("<" + HEADER_FORMAT + fmt) for name, (fmt, _) in LAYOUTS.items()
}
HEADER = struct.Struct("<" + HEADER_FORMAT)

# Keys and values of maps written from Python.
WATCH = struct.Struct("<II")            # struct watch
CGROUP_KEY = struct.Struct("<Q")
INODE_KEY = struct.Struct("<QI4x")      # struct inode_key
PATH_KEY = struct.Struct(f"<I{PATH_LEN}s")  # struct path_key

# type id -> (event class, layout)
_BY_TYPE: dict[int, tuple[type[ev.Event], str]] = {
    ev.EXEC: (ev.ExecEvent, "exec_event"),
    ev.FORK: (ev.ForkEvent, "sys_event"),
    ev.EXIT: (ev.ExitEvent, "sys_event"),
    ev.CONNECT: (ev.NetEvent, "net_event"),
    ev.SEND: (ev.NetEvent, "net_event"),
    ev.BIND: (ev.NetEvent, "net_event"),
    ev.LISTEN: (ev.NetEvent, "net_event"),
    ev.ACCEPT: (ev.NetEvent, "net_event"),
    ev.DUP_SOCKET: (ev.DupSocketEvent, "net_event"),
    ev.OPEN: (ev.FileEvent, "file_event"),
    ev.UNLINK: (ev.FileEvent, "file_event"),
    ev.RENAME: (ev.FileEvent, "file_event"),
    ev.PTRACE: (ev.PtraceEvent, "sys_event"),
    ev.MOUNT: (ev.MountEvent, "sys_event"),
    ev.NS: (ev.NsEvent, "sys_event"),
    ev.MODULE_LOAD: (ev.ModuleLoadEvent, "sys_event"),
    ev.BPF: (ev.BpfEvent, "sys_event"),
    ev.MEMFD_EXEC: (ev.MemfdExecEvent, "sys_event"),
    ev.SETUID: (ev.SetuidEvent, "sys_event"),
    ev.CAPSET: (ev.CapsetEvent, "sys_event"),
    ev.SIGNAL: (ev.SignalEvent, "sys_event"),
}



def _offsets(fmt: str, members: tuple[str, ...]) -> dict[str, int]:
    """Byte offset of each member of a little-endian struct format, C alignment
    rules included ('x' runs are named members too: the C struct's _pad)."""
    out, off = {}, 0
    for name, (count, code) in zip(members, re.findall(r"(\d*)([a-zA-Z])", fmt), strict=True):
        if code not in "sx":
            size = struct.calcsize("<" + code)
            off = (off + size - 1) // size * size
        out[name] = off
        off += struct.calcsize("<" + count + code)
    return out


def header_offsets() -> dict[str, int]:
    return _offsets(HEADER_FORMAT, HEADER_MEMBERS)


def record_offsets(name: str) -> dict[str, int]:
    """Member offsets of a record struct: hdr at 0, then its own members."""
    fmt, members = LAYOUTS[name]
    body = _offsets(fmt, members)
    return {"hdr": 0, **{m: HEADER.size + off for m, off in body.items()}} | (
        {"args": STRUCTS[name].size} if name == "exec_event" else {})


def record_size(name: str) -> int:
    """sizeof(struct name) in C; exec_event's argv area is read by args_len."""
    return STRUCTS[name].size + (ARGS_LEN if name == "exec_event" else 0)


Decoder = Callable[[bytes | memoryview | bytearray, int, int], ev.Event]

_EXEC_FIXED = STRUCTS["exec_event"]


class ShortRecord(ValueError):
    """A record smaller than its type's layout: never from our own programs."""


def _decode_exec(buf: bytes | memoryview | bytearray, off: int, size: int) -> ev.Event:
    if size < _EXEC_FIXED.size:
        raise ShortRecord(f"exec record of {size} bytes")
    values = _EXEC_FIXED.unpack_from(buf, off)
    args_len = min(values[11], size - _EXEC_FIXED.size, ARGS_LEN)
    args = bytes(buf[off + _EXEC_FIXED.size: off + _EXEC_FIXED.size + max(args_len, 0)])
    return ev.ExecEvent.from_tuple((*values, args))


def _fixed(cls: type[ev.Event], layout: struct.Struct) -> Decoder:
    unpack = layout.unpack_from
    new = object.__new__
    min_size = layout.size

    def decode_fixed(buf: bytes | memoryview | bytearray, off: int, size: int) -> ev.Event:
        if size < min_size:
            raise ShortRecord(f"{cls.__name__} record of {size} bytes, expected {min_size}")
        e = new(cls)
        e._t = unpack(buf, off)
        e.proc = None
        return e

    return decode_fixed


def _decoders() -> dict[int, Decoder]:
    """type id -> decode function (raising ShortRecord on a short record)."""
    return {type_id: _decode_exec if type_id == ev.EXEC else _fixed(cls, STRUCTS[layout])
            for type_id, (cls, layout) in _BY_TYPE.items()}


DECODERS = _decoders()


def decode(buf: bytes | memoryview | bytearray, off: int = 0, size: int | None = None) -> ev.Event:
    """Decode one record; raises ValueError on an unknown or short record."""
    size = len(buf) - off if size is None else size
    if size < HEADER.size:
        raise ShortRecord(f"record of {size} bytes is shorter than its header")
    type_id = int.from_bytes(buf[off + TYPE_OFFSET: off + TYPE_OFFSET + 4], "little")
    fn = DECODERS.get(type_id)
    if fn is None:
        raise ValueError(f"unknown event type {type_id}")
    return fn(buf, off, size)
