"""A small typed ctypes binding over the system ``libbpf.so.1``.

Only what corral needs: open and load an object, reach its programs, maps and
BTF, attach programs (tracepoints by their section name, cgroup programs to a
cgroup fd), and read and write map elements.  Errors become
:class:`LibbpfError` carrying libbpf's own log (the verifier's output on a
failed load), never a bare errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from corral.errors import HostError


class LibbpfError(RuntimeError):
    """A libbpf call failed; ``log`` holds what libbpf printed meanwhile."""

    def __init__(self, what: str, err: int, log: list[str]) -> None:
        self.errno = err
        self.log = log
        detail = os.strerror(err) if err else "failed"
        super().__init__(f"{what}: {detail}")

    def refused(self, what: str) -> HostError:
        """The error a user gets when the kernel would not load `what` (the sensor, a guard...):
        what to do, then the end of libbpf's log, which says why."""
        tail = "\n".join(self.log[-25:])
        return HostError(f"the kernel refused the {what} ({self}); run `make setup` to rebuild it for this "
                         f"kernel. libbpf said:\n{tail}")


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# BTF kinds and the fixed part of struct btf_type (name_off, info, size/type).
BTF_KIND_STRUCT = 4
BTF_KIND_DATASEC = 15
_BTF_TYPE_SIZE = 12
_LIBBPF_DEBUG = 2  # enum libbpf_print_level: WARN, INFO, DEBUG


class _Btf(ctypes.Structure):
    pass


class Libbpf:
    """The loaded library, its function signatures and a log of its messages."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise HostError(
                "libbpf.so.1 not found: install it with `apt-get install libbpf1` (make setup does)"
            ) from exc
        self.lib = lib
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._log: deque[str] = deque(maxlen=400)
        self._log_lock = threading.Lock()
        self._print_cb = _PRINT_FN(self._on_print)  # kept alive: libbpf holds it
        self._declare()
        lib.libbpf_set_print(self._print_cb)

    def _declare(self) -> None:
        vp, cp, ci, cu32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "libbpf_set_print": (vp, [_PRINT_FN]),
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (ci, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__next_program": (vp, [vp, vp]),
            "bpf_object__next_map": (vp, [vp, vp]),
            "bpf_object__btf": (vp, [vp]),
            "bpf_program__name": (cp, [vp]),
            "bpf_program__section_name": (cp, [vp]),
            "bpf_program__set_autoload": (ci, [vp, ctypes.c_bool]),
            "bpf_program__attach": (vp, [vp]),
            "bpf_program__attach_cgroup": (vp, [vp, ci]),
            "bpf_link__destroy": (ci, [vp]),
            "bpf_map__name": (cp, [vp]),
            "bpf_map__fd": (ci, [vp]),
            "bpf_map__max_entries": (cu32, [vp]),
            "bpf_map__set_max_entries": (ci, [vp, cu32]),
            "bpf_map__value_size": (cu32, [vp]),
            "bpf_map__initial_value": (vp, [vp, ctypes.POINTER(ctypes.c_size_t)]),
            "bpf_map_update_elem": (ci, [ci, vp, vp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (ci, [ci, vp, vp]),
            "bpf_map_delete_elem": (ci, [ci, vp]),
            "bpf_map_get_next_key": (ci, [ci, vp, vp]),
            "btf__find_by_name_kind": (ctypes.c_int32, [vp, cp, cu32]),
            "btf__type_by_id": (vp, [vp, cu32]),
            "btf__name_by_offset": (cp, [vp, cu32]),
            "libbpf_num_possible_cpus": (ci, []),
        }
        for name, (restype, argtypes) in sigs.items():
            fn = getattr(self.lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self._libc.vsnprintf.restype = ctypes.c_int
        self._libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, vp]

    def _on_print(self, level: int, fmt: bytes, args: int) -> int:
        if level >= _LIBBPF_DEBUG:
            return 0
        buf = ctypes.create_string_buffer(1 << 18)  # verifier logs come as one message
        self._libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip("\n")
        with self._log_lock:
            self._log.extend(text.splitlines())
        return 0

    def take_log(self) -> list[str]:
        with self._log_lock:
            lines = list(self._log)
            self._log.clear()
        return lines

    def check_ptr(self, ptr: int | None, what: str) -> int:
        if not ptr:
            raise LibbpfError(what, ctypes.get_errno() or errno.EINVAL, self.take_log())
        return ptr

    def check_rc(self, rc: int, what: str) -> None:
        if rc < 0:
            err = -rc if rc != -1 else ctypes.get_errno()
            raise LibbpfError(what, err, self.take_log())


_instance: Libbpf | None = None


def libbpf() -> Libbpf:
    """The process-wide binding (libbpf's print callback is global)."""
    global _instance
    if _instance is None:
        _instance = Libbpf()
    return _instance


class Map:
    """A map of a loaded object: element access by raw bytes."""

    def __init__(self, lb: Libbpf, ptr: int) -> None:
        self._lb = lb
        self.ptr = ptr
        self.name: str = lb.lib.bpf_map__name(ptr).decode()

    @property
    def fd(self) -> int:
        return int(self._lb.lib.bpf_map__fd(self.ptr))

    @property
    def max_entries(self) -> int:
        return int(self._lb.lib.bpf_map__max_entries(self.ptr))

    def set_max_entries(self, n: int) -> None:
        self._lb.check_rc(self._lb.lib.bpf_map__set_max_entries(self.ptr, n), f"resize map {self.name}")

    def update(self, key: bytes, value: bytes) -> None:
        rc = self._lb.lib.bpf_map_update_elem(self.fd, key, value, 0)
        self._lb.check_rc(rc, f"update map {self.name}")

    def lookup(self, key: bytes, value_size: int) -> bytes | None:
        out = ctypes.create_string_buffer(value_size)
        rc = self._lb.lib.bpf_map_lookup_elem(self.fd, key, out)
        if rc < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return None
            self._lb.check_rc(rc, f"lookup in map {self.name}")
        return out.raw

    def sum_per_cpu(self, key: bytes = b"\0\0\0\0") -> int:
        """The sum over CPUs of a per-CPU u64 (a PERCPU_ARRAY counter, such as a drop count)."""
        raw = self.lookup(key, 8 * possible_cpus())
        return sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)) if raw else 0

    def delete(self, key: bytes) -> bool:
        rc = self._lb.lib.bpf_map_delete_elem(self.fd, key)
        if rc < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return False
            self._lb.check_rc(rc, f"delete from map {self.name}")
        return True

    def keys(self, key_size: int) -> Iterator[bytes]:
        prev: bytes | None = None
        nxt = ctypes.create_string_buffer(key_size)
        while self._lb.lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            prev = nxt.raw
            yield prev

    def initial_value(self) -> ctypes.Array[ctypes.c_char]:
        """The map's data before load (.rodata, .bss), writable in place."""
        size = ctypes.c_size_t()
        ptr = self._lb.lib.bpf_map__initial_value(self.ptr, ctypes.byref(size))
        self._lb.check_ptr(ptr, f"initial value of map {self.name}")
        return (ctypes.c_char * size.value).from_address(ptr)


class Program:
    def __init__(self, lb: Libbpf, ptr: int) -> None:
        self._lb = lb
        self.ptr = ptr
        self.name: str = lb.lib.bpf_program__name(ptr).decode()
        self.section: str = lb.lib.bpf_program__section_name(ptr).decode()

    def set_autoload(self, load: bool) -> None:
        self._lb.lib.bpf_program__set_autoload(self.ptr, load)

    def attach(self) -> Link:
        """Attach by section name (tracepoints, raw tracepoints)."""
        ptr = self._lb.lib.bpf_program__attach(self.ptr)
        return Link(self._lb, self._lb.check_ptr(ptr, f"attach {self.name} ({self.section})"))

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        ptr = self._lb.lib.bpf_program__attach_cgroup(self.ptr, cgroup_fd)
        return Link(self._lb, self._lb.check_ptr(ptr, f"attach {self.name} to cgroup"))


class Link:
    def __init__(self, lb: Libbpf, ptr: int) -> None:
        self._lb = lb
        self.ptr: int | None = ptr

    def destroy(self) -> None:
        if self.ptr:
            self._lb.lib.bpf_link__destroy(self.ptr)
            self.ptr = None


class BpfObject:
    """An opened (and later loaded) BPF object file."""

    def __init__(self, path: str) -> None:
        self._lb = libbpf()
        self._lb.take_log()
        ptr = self._lb.lib.bpf_object__open_file(path.encode(), None)
        self.ptr: int | None = self._lb.check_ptr(ptr, f"open BPF object {path}")
        self.path = path

    def programs(self) -> list[Program]:
        out: list[Program] = []
        prev = None
        while True:
            prev = self._lb.lib.bpf_object__next_program(self.ptr, prev)
            if not prev:
                return out
            out.append(Program(self._lb, prev))

    def maps(self) -> dict[str, Map]:
        out: dict[str, Map] = {}
        prev = None
        while True:
            prev = self._lb.lib.bpf_object__next_map(self.ptr, prev)
            if not prev:
                return out
            m = Map(self._lb, prev)
            out[m.name] = m

    def load(self) -> None:
        self._lb.take_log()
        self._lb.check_rc(self._lb.lib.bpf_object__load(self.ptr), f"load {self.path}")

    def close(self) -> None:
        if self.ptr:
            self._lb.lib.bpf_object__close(self.ptr)
            self.ptr = None

    # -- BTF: the object's own description of its types --------------------

    def _btf(self) -> int:
        btf = self._lb.lib.bpf_object__btf(self.ptr)
        return self._lb.check_ptr(btf, f"BTF of {self.path}")

    def _type(self, btf: int, type_id: int) -> tuple[int, int, int, int]:
        """(address, kind, vlen, size) of a BTF type."""
        addr = self._lb.lib.btf__type_by_id(btf, type_id)
        _name_off, info, size = (ctypes.c_uint32 * 3).from_address(addr)
        return addr, (info >> 24) & 0x1F, info & 0xFFFF, size

    def _entries(self, kind: int, name: str) -> tuple[int, list[tuple[str, int, int]]]:
        """A struct's (size, [(member, byte offset, type id)]) or a datasec's vars."""
        btf = self._btf()
        type_id = self._lb.lib.btf__find_by_name_kind(btf, name.encode(), kind)
        if type_id < 0:
            raise LibbpfError(f"type {name} not in the BTF of {self.path}", -type_id, [])
        addr, _kind, vlen, size = self._type(btf, type_id)
        raw = (ctypes.c_uint32 * (3 * vlen)).from_address(addr + _BTF_TYPE_SIZE)
        entries = []
        for i in range(vlen):
            a, b, c = raw[3 * i], raw[3 * i + 1], raw[3 * i + 2]
            if kind == BTF_KIND_STRUCT:  # btf_member: name_off, type, bit offset
                entries.append((self._lb.lib.btf__name_by_offset(btf, a).decode(), c // 8, b))
            else:  # btf_var_secinfo: var type, offset, size
                var_addr = self._lb.lib.btf__type_by_id(btf, a)
                var_name = self._lb.lib.btf__name_by_offset(btf, ctypes.c_uint32.from_address(var_addr).value)
                entries.append((var_name.decode(), b, c))
        return size, entries

    def struct_layout(self, name: str) -> tuple[int, dict[str, int]]:
        """Size and member byte offsets of ``struct name`` per the object's BTF."""
        size, members = self._entries(BTF_KIND_STRUCT, name)
        return size, {m: off for m, off, _ in members}

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """Variables of a data section (".rodata"): name -> (offset, size)."""
        _size, entries = self._entries(BTF_KIND_DATASEC, section)
        return {name: (off, size) for name, off, size in entries}


def possible_cpus() -> int:
    return int(libbpf().lib.libbpf_num_possible_cpus())
