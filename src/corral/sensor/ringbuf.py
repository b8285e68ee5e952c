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

import mmap
import select
import struct
from collections.abc import Callable

from corral.events import Event

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

Decode = Callable[[memoryview, int, int], Event]


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

    def wait(self, timeout: float) -> bool:
        """Sleep until the kernel signals new records (or timeout seconds pass)."""
        return bool(self._epoll.poll(timeout))

    def pending(self) -> int:
        """Bytes written by the kernel and not yet consumed."""
        return int(_U64.unpack_from(self._data, 0)[0] - _U64.unpack_from(self._consumer, 0)[0])

    def read(self, decode: Callable[[memoryview, int, int], Event | None], limit: int = 65536) -> list[Event]:
        """Decode up to ``limit`` committed records and release their space."""
        view, page, mask = self._view, self._page, self._mask
        unpack32 = _U32.unpack_from
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._data, 0)[0]
        out: list[Event] = []
        append = out.append
        while cons < prod and len(out) < limit:
            off = page + (cons & mask)
            length = unpack32(view, off)[0]
            if length & _BUSY:
                break  # the kernel is still writing this one; records after it wait
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                event = decode(view, off + _HDR, size)
                if event is not None:
                    append(event)
            cons += (size + _HDR + 7) & ~7
        _U64.pack_into(self._consumer, 0, cons)
        return out

    def close(self) -> None:
        self._epoll.close()
        self._view.release()
        self._data.close()
        self._consumer.close()
