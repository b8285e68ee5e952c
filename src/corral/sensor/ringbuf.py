"""Read a BPF ring buffer by mapping it into this process.

The kernel's layout (kernel/bpf/ringbuf.c): page 0 holds the consumer
position and is writable by us; page 1 holds the producer position; the data
pages follow, mapped twice in a row so a record that wraps around the end is
still contiguous in memory.  Each record starts with an 8-byte header: a u32
length whose top two bits mean "still being written" (BUSY) and "discarded",
and a u32 page offset we do not need.

A whole batch is decoded from the mapping directly, and the consumer
position is written once per batch, which tells the kernel the space is free.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import select
import struct
from collections.abc import Callable

from corral.events import Event

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

#: record decoder: (view, offset of the record, its size) -> event, or None to skip it
Decoder = Callable[[memoryview, int, int], Event | None]


class RingBuffer:
    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self._mask = size - 1
        self._page = page
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._view = memoryview(self._data)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, select.EPOLLIN)

    def wait(self, timeout: float) -> bool:
        """Sleep until the kernel signals new records, wake() is called, or timeout seconds pass."""
        ready = self._epoll.poll(timeout)
        for fd, _ in ready:
            if fd == self._wakeup:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wakeup)
        return bool(ready)

    def wake(self) -> None:
        """End a wait() in another thread now (thread-safe)."""
        os.eventfd_write(self._wakeup, 1)

    def pending(self) -> int:
        """Bytes written by the kernel and not yet consumed."""
        return int(_U64.unpack_from(self._data, 0)[0] - _U64.unpack_from(self._consumer, 0)[0])

    def read(self, decoders: dict[int, Decoder], type_offset: int, on_unknown: Decoder,
             limit: int = 65536) -> list[Event]:
        """Decode up to ``limit`` committed records and release their space.

        Each record carries a u32 type at ``type_offset``; ``decoders`` maps it to
        the function that makes the event (``on_unknown`` gets the others).  The
        dispatch is inlined here, one Python call per record, because this loop
        is the sensor's hot path.  The garbage collector is paused meanwhile: a
        batch allocates tens of thousands of objects that hold no cycles.
        """
        view, page, mask = self._view, self._page, self._mask
        unpack32 = _U32.unpack_from
        get = decoders.get
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._data, 0)[0]
        out: list[Event] = []
        append = out.append
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            while cons < prod and len(out) < limit:
                off = page + (cons & mask)
                length = unpack32(view, off)[0]
                if length & _BUSY:
                    break  # the kernel is still writing this one; records after it wait
                size = length & ~(_BUSY | _DISCARD)
                if not length & _DISCARD:
                    off += _HDR
                    try:
                        event = get(unpack32(view, off + type_offset)[0], on_unknown)(view, off, size)
                    except ValueError:  # a record too short for its type
                        event = on_unknown(view, off, size)
                    if event is not None:
                        append(event)
                cons += (size + _HDR + 7) & ~7
        finally:
            if gc_was_enabled:
                gc.enable()
            _U64.pack_into(self._consumer, 0, cons)
        return out

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wakeup)
        self._view.release()
        self._data.close()
        self._consumer.close()
