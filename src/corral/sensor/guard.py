"""What the egress guard and the exec guard share: a BPF object whose programs judge the
processes of bound cgroups, each cgroup bound to one sandbox id in a ``sandbox_of`` map."""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from corral.errors import CorralError, HostError
from corral.sensor import host
from corral.sensor.libbpf import BpfObject, LibbpfError, Link, Map

U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")


class CgroupGuard:
    """Load the object at `path`, attach it with `attach`, and keep the cgroup -> sandbox map.

    Cgroups not bound to one of a guard's sandboxes are never touched, so several guards can be
    loaded at once.  Methods may be called from several threads; subclasses give ``_open``,
    which holds ``_lock`` and checks the guard is open and the sandbox known.
    """

    #: the guard's name in messages ("egress guard")
    WHAT: ClassVar[str]

    def __init__(self, path: Path, attach: Callable[[BpfObject], list[Link]]) -> None:
        host.check_privileges()
        if not path.exists():
            raise HostError(f"the {self.WHAT}'s BPF object {path} is not built: run `make setup`")
        self._lock = threading.RLock()  # also keeps close() from freeing maps in use
        self._links: list[Link] = []
        self._obj: BpfObject | None = BpfObject(str(path))
        try:
            self._obj.load()
            self._maps = self._obj.maps()
            self._links = attach(self._obj)
        except LibbpfError as exc:
            self.close()
            raise exc.refused(self.WHAT) from exc
        except BaseException:
            self.close()
            raise
        self._sandbox_of = self._maps["sandbox_of"]

    def close(self) -> None:
        """Detach the programs and free the maps; the bound cgroups are then unguarded."""
        with self._lock:
            for link in self._links:
                link.destroy()
            self._links.clear()
            self._release()
            if self._obj is not None:
                self._obj.close()
                self._obj = None

    def _release(self) -> None:
        """What a subclass frees on close, before the object's maps go."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._obj is None

    def _open(self, sandbox_id: int | None = None) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _check_closed(self) -> None:
        if self._obj is None:
            raise CorralError(f"the {self.WHAT} is closed; create a new {type(self).__name__}")

    @staticmethod
    def _check_id(sandbox_id: int) -> None:
        if not 0 <= sandbox_id <= 0xFFFFFFFF:
            raise CorralError(f"sandbox id {sandbox_id} does not fit in 32 bits")

    def _update(self, table: Map, key: bytes, value: bytes, what: str) -> None:
        try:
            table.update(key, value)
        except LibbpfError as exc:
            if exc.errno == errno.E2BIG:
                raise CorralError(f"the {self.WHAT}'s {what} map is full ({table.max_entries} entries "
                                  "across all sandboxes)") from None
            raise

    # -- cgroups ---------------------------------------------------------------

    def bind_cgroup(self, cgroup_id: int, sandbox_id: int) -> None:
        """Judge processes in this cgroup (and cgroups made below it) by the sandbox's policy."""
        key = U64.pack(cgroup_id)
        with self._open(sandbox_id):
            old = self._sandbox_of.lookup(key, U32.size)
            if old is not None and U32.unpack(old)[0] != sandbox_id:
                raise CorralError(f"cgroup {cgroup_id} already belongs to sandbox {U32.unpack(old)[0]}, "
                                  f"not {sandbox_id}: a cgroup can be in one sandbox only")
            self._update(self._sandbox_of, key, U32.pack(sandbox_id), "cgroup")

    def unbind_cgroup(self, cgroup_id: int) -> None:
        """Forget a cgroup (once it is removed); a no-op for an unknown one."""
        with self._open():
            self._sandbox_of.delete(U64.pack(cgroup_id))

    def _unbind_sandbox(self, sandbox_id: int) -> None:
        """Forget every cgroup of a sandbox (first, when it is removed: no process is then judged
        by a half-removed policy)."""
        for key in list(self._sandbox_of.keys(U64.size)):
            value = self._sandbox_of.lookup(key, U32.size)
            if value is not None and U32.unpack(value)[0] == sandbox_id:
                self._sandbox_of.delete(key)
