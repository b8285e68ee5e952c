"""Small pieces every detector uses: time units, keys, bounded tables, address tests."""

from __future__ import annotations

import errno
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeVar

from corral import events as ev

NS = 1_000_000_000
#: a non-blocking connect that has sent its SYN: an attempt like any other
EINPROGRESS = errno.EINPROGRESS
#: repeated connect() calls on a socket already connecting or connected: not new attempts
REPEATS = frozenset((-errno.EALREADY, -errno.EISCONN))

K = TypeVar("K")
V = TypeVar("V")

#: a step: (sandbox_id, step_id, 0); outside any sandbox (host-wide mode) the cgroup stands in
#: for the step, so the whole host is never lumped into one "step"
StepKey = tuple[int, int, int]


class Detector(Protocol):
    """What the Detectors facade runs: ``kinds`` are the event type ids ``feed`` looks at."""

    kinds: frozenset[int]

    def feed(self, event: ev.Event) -> list[ev.DerivedEvent]: ...

    def tick(self, now_ns: int) -> list[ev.DerivedEvent]: ...


def step_key(event: ev.Event) -> StepKey:
    if event.sandbox_id:
        return (event.sandbox_id, event.step_id, 0)
    return (0, 0, event.cgroup_id)


_LOCAL = frozenset(("", "0.0.0.0", "::", "::1"))


def is_local(addr: str) -> bool:
    """Loopback or unspecified (which also means this host): traffic that never leaves it."""
    if addr.startswith("127.") or addr in _LOCAL:
        return True
    if addr.startswith("::ffff:"):  # an IPv4 address on a dual-stack socket
        mapped = ipaddress.IPv6Address(addr).ipv4_mapped
        return mapped is not None and (mapped.is_loopback or mapped.is_unspecified)
    return False


def outbound(event: ev.Event) -> ev.NetEvent | None:
    """``event`` if it is an IP connect or send to somewhere off this host, else None."""
    if event.type not in (ev.CONNECT, ev.SEND) or not isinstance(event, ev.NetEvent):
        return None
    if event.family not in ("inet", "inet6") or is_local(event.addr):
        return None
    return event


def hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def due(value: int | float, threshold: int | float, reported: int | float) -> bool:
    """At or over the threshold, and (if already reported) at least double what was reported:
    the rule that keeps every detector to one event per conclusion, plus a few as it grows."""
    return value >= max(threshold, 2 * reported)


class Lru(OrderedDict[K, V]):
    """A dict that keeps at most ``cap`` entries, forgetting the least recently touched."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def touch(self, key: K, make: Callable[[], V]) -> V:
        value = self.get(key)
        if value is None:
            value = self[key] = make()
            if len(self) > self.cap:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.cap:
            self.popitem(last=False)
