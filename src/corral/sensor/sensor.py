"""Load the kernel programs, scope them, and turn the ring buffer into events."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

from corral import events as ev
from corral.errors import CorralError, HostError
from corral.sensor import host, records
from corral.sensor.cgroups import cgroup_id, cgroup_of_pid
from corral.sensor.libbpf import BpfObject, LibbpfError, Link
from corral.sensor.ringbuf import Decoder, RingBuffer

DEFAULT_OBJECT = Path(__file__).parent.parent / "_bpf" / "sensor.bpf.o"
_DROP_CHECK_INTERVAL_S = 0.1
#: How long records may wait in the ring before the reader looks: the bound on
#: the latency the kernel's batched wake-ups add.
POLL_SLICE_S = 0.002
#: After this long without records the reader stops polling: it sets the kernel's
#: `reader_asleep` flag and sleeps until the next record wakes it.  Polling costs
#: ~30 µs of CPU per slice, about 1.6% of a core, taken from the cores the
#: watched workload runs on; a wake-up costs one irq_work per quiet spell.
QUIET_BEFORE_SLEEP_S = 0.01
#: The longest such sleep before looking again anyway (a safety net: on hosts whose
#: memory model the flag hand-off in _sleep does not cover, a wake-up may be lost).
SLEEP_SLICE_S = 0.02


def object_path() -> Path:
    return Path(os.environ.get("CORRAL_BPF_OBJECT", DEFAULT_OBJECT))


def layout_mismatches(obj: BpfObject) -> list[str]:
    """Differences between records.py and the struct layouts in the object's BTF."""
    problems = []
    expected = {"event_header": (records.HEADER.size, records.header_offsets())}
    for name in records.LAYOUTS:
        expected[name] = (records.record_size(name), records.record_offsets(name))
    for name, (py_size, py) in expected.items():
        size, btf = obj.struct_layout(name)
        if size != py_size:
            problems.append(f"{name}: size {size} in BTF, {py_size} in Python")
        for member in btf.keys() | py.keys():
            if btf.get(member) != py.get(member):
                problems.append(f"{name}.{member}: offset {btf.get(member)} in BTF, "
                                f"{py.get(member)} in Python")
    return problems




class Sensor:
    """The loaded kernel programs and the stream of events they produce.

    Nothing is reported until a cgroup is watched (or ``host_wide`` is set).
    """

    def __init__(self, *, host_wide: bool = False, trace_all_opens: bool = False,
                 ring_size: int = 16 << 20, path: Path | None = None) -> None:
        host.preflight()
        path = path or object_path()
        if not path.exists():
            raise HostError(f"the sensor's BPF object {path} is not built: run `make setup`")
        if ring_size & (ring_size - 1) or ring_size < 4096:
            raise ValueError("ring_size must be a power of two of at least 4096")
        self.unavailable: list[str] = []  # programs whose hook this kernel lacks
        self._links: list[Link] = []
        self._obj = BpfObject(str(path))
        try:
            self._load(host_wide, trace_all_opens, ring_size)
        except LibbpfError as exc:
            self._obj.close()
            raise exc.refused("sensor") from exc
        maps = self._obj.maps()
        self._watched = maps["watched"]
        self._prefixes = maps["watched_prefixes"]
        self._inodes = maps["watched_inodes"]
        self._dropped = maps["dropped"]
        self.ring = RingBuffer(maps["events"].fd, ring_size)
        self._asleep = mmap.mmap(maps["reader_asleep"].fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        self._active_at = 0.0  # when records were last seen in the ring (monotonic)
        self.drops_total = 0
        self.bad_records = 0
        self._cgroup_of_pid: dict[int, int] = {}
        self._proc_cgroups: dict[int, tuple[int | None, float]] = {}
        self._table = self._decoders()
        self._last_drop_check = 0.0

    def _load(self, host_wide: bool, trace_all_opens: bool, ring_size: int) -> None:
        mismatches = layout_mismatches(self._obj)
        if mismatches:
            raise HostError("the sensor object does not match this corral's decoder "
                            f"({mismatches[0]}): run `make setup` to rebuild it")
        maps = self._obj.maps()
        rodata = next(m for name, m in maps.items() if name.endswith(".rodata"))
        data = rodata.initial_value()
        config = {"host_wide": int(host_wide), "trace_all_opens": int(trace_all_opens),
                  "monitor_pid": os.getpid()}
        for name, (off, size) in self._obj.datasec_vars(".rodata").items():
            if name in config:
                ctypes.memmove(ctypes.addressof(data) + off, config[name].to_bytes(size, "little"), size)
        maps["events"].set_max_entries(ring_size)
        for prog in self._obj.programs():
            kind, _, rest = prog.section.partition("/")
            if kind == "tp":
                category, _, name = rest.partition("/")
                if not host.tracepoint_exists(category, name):
                    prog.set_autoload(False)
                    self.unavailable.append(prog.section)
        self._obj.load()
        for prog in self._obj.programs():
            if prog.section not in self.unavailable:
                self._links.append(prog.attach())

    # -- scope -------------------------------------------------------------

    def watch_cgroup(self, cgroup: int | str | Path, sandbox_id: int = 0, step_id: int = 0) -> int:
        """Report what processes in this cgroup (by v2 id or path) do; returns the id."""
        cid = cgroup if isinstance(cgroup, int) else cgroup_id(cgroup)
        self._watched.update(records.CGROUP_KEY.pack(cid), records.WATCH.pack(sandbox_id, step_id))
        return cid

    def unwatch_cgroup(self, cgroup: int | str | Path) -> None:
        cid = cgroup if isinstance(cgroup, int) else cgroup_id(cgroup)
        self._watched.delete(records.CGROUP_KEY.pack(cid))

    def watched_cgroups(self) -> list[int]:
        return [records.CGROUP_KEY.unpack(k)[0] for k in self._watched.keys(records.CGROUP_KEY.size)]

    def watch_prefix(self, prefix: str) -> None:
        """Report open/unlink/rename of paths starting with ``prefix``."""
        raw = prefix.encode()
        if not raw.startswith(b"/") or len(raw) >= records.PATH_LEN:
            raise ValueError(f"watched prefix must be an absolute path shorter than "
                             f"{records.PATH_LEN} bytes: {prefix!r}")
        self._prefixes.update(records.PATH_KEY.pack(len(raw) * 8, raw), b"\1\0\0\0")

    def watch_file(self, path: str | Path) -> ev.FileId:
        """Report every open of this file, under any name (canaries).  Returns the id to
        unwatch it by: the path may be gone by then."""
        fid = ev.file_id(path)
        self._inodes.update(records.INODE_KEY.pack(fid[1], fid[0]), b"\1\0\0\0")
        return fid

    def unwatch_file(self, fid: ev.FileId) -> None:
        self._inodes.delete(records.INODE_KEY.pack(fid[1], fid[0]))

    # -- events ------------------------------------------------------------

    def _decoders(self) -> dict[int, Decoder]:
        """Per record type, the function that makes its event.  Fork, exec, exit
        and signal records also pass through _track_cgroups."""
        table: dict[int, Decoder] = dict(records.DECODERS)
        for type_id in (ev.FORK, ev.EXEC, ev.EXIT, ev.SIGNAL):
            table[type_id] = self._tracked(records.DECODERS[type_id])
        return table

    def _tracked(self, decode: records.Decoder) -> Decoder:
        def tracked(view: memoryview, off: int, size: int) -> ev.Event | None:
            return self._track_cgroups(decode(view, off, size))
        return tracked

    def _unknown(self, view: memoryview, off: int, size: int) -> ev.Event | None:
        self.bad_records += 1
        return None

    def _track_cgroups(self, event: ev.Event) -> ev.Event | None:
        """Know each watched process's cgroup from the stream itself, so a
        signal to a process in the sender's own cgroup can be left out even
        when the target is already gone by the time we read the record."""
        cgroups = self._cgroup_of_pid
        if isinstance(event, ev.ForkEvent):
            cgroups[event.child_pid] = event.cgroup_id
        elif isinstance(event, ev.ExecEvent):
            cgroups[event.pid] = event.cgroup_id
        elif isinstance(event, ev.ExitEvent):
            cgroups.pop(event.pid, None)
        elif isinstance(event, ev.SignalEvent) and event.target_pid > 0:
            target = cgroups.get(event.target_pid)
            if target is None:
                target = self._outside_cgroup(event.target_pid)
            if target == event.cgroup_id:
                return None
        return event

    def _outside_cgroup(self, pid: int) -> int | None:
        """The cgroup of a process this stream has not seen start, from /proc,
        remembered for a second: `kill(pid, 0)` in a loop is a common liveness
        check, and a /proc read per signal would cost the monitor ~50 µs each."""
        now = time.monotonic()
        cached = self._proc_cgroups.get(pid)
        if cached is not None and cached[1] > now:
            return cached[0]
        if len(self._proc_cgroups) > 4096:
            self._proc_cgroups.clear()
        found = _cgroup_id_of_pid(pid)
        self._proc_cgroups[pid] = (found, now + 1.0)
        return found

    def read(self, timeout: float = 0.0) -> list[ev.Event]:
        """Events ready now, waiting up to ``timeout`` seconds for the first."""
        if timeout > 0:
            # The kernel wakes us only per 256 KiB of records (see WAKEUP_BYTES in
            # sensor.bpf.c), so look for new records every POLL_SLICE_S meanwhile,
            # or, once the ring has been quiet a while, ask for a wake-up and sleep.
            deadline = time.monotonic() + timeout
            while not self.ring.pending():
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    break
                if now - self._active_at >= QUIET_BEFORE_SLEEP_S:
                    if self._sleep(min(left, SLEEP_SLICE_S)):
                        break
                elif self.ring.wait(min(left, POLL_SLICE_S)):
                    break
        now = time.monotonic()
        if self.ring.pending():
            self._active_at = now
        batch = self.ring.read(self._table, records.TYPE_OFFSET, self._unknown)
        if now - self._last_drop_check >= _DROP_CHECK_INTERVAL_S:
            self._last_drop_check = now
            drop = self.check_drops()
            if drop is not None:
                batch.append(drop)
        return batch

    def _sleep(self, timeout: float) -> bool:
        """Wait until the next record (the kernel wakes us), a wake(), or timeout seconds.

        The flag must be visible to the kernel before we look at the ring for
        the last time, or a record committed in between would neither be seen
        nor wake us.  The store below and that look are ordered by the locked
        instruction between them (x86 orders a store before a later load only
        across one): ``wait(0)`` hands the GIL over around epoll_wait, which
        takes a mutex.  On other architectures SLEEP_SLICE_S bounds what a lost
        wake-up costs.
        """
        self._asleep[0:4] = b"\1\0\0\0"
        try:
            if self.ring.wait(0) or self.ring.pending():
                return True
            return self.ring.wait(timeout)
        finally:
            self._asleep[0:4] = b"\0\0\0\0"

    def check_drops(self) -> ev.DropEvent | None:
        """A drop event if the kernel lost records since the last check."""
        total = self._dropped.sum_per_cpu()
        if total <= self.drops_total:
            return None
        event = ev.DropEvent.make(total - self.drops_total, total)
        self.drops_total = total
        return event

    def close(self) -> None:
        for link in self._links:
            link.destroy()
        self._links.clear()
        self.ring.close()
        self._asleep.close()
        self._obj.close()

    def __enter__(self) -> Sensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cgroup_id_of_pid(pid: int) -> int | None:
    try:
        return cgroup_id(cgroup_of_pid(pid))
    except (OSError, CorralError):  # gone or unreadable: the signal is reported
        return None
