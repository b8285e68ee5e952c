"""``scan``: one process, or one step, tried many hosts or many ports of one host in a short while.

Every connect is an attempt, whatever came of it: refused, unreachable, timed out, in progress or
denied by the egress policy (a scan stopped by the kernel is still a scan).  A UDP datagram to a
new destination counts too (a UDP scan sends, it never connects).  Loopback is left out: a process
talking to its own host's services is not looking around a network.

Counts are kept in a sliding window per process *and* per step, so a scan spread over many short
processes (a shell loop running ``nc -z`` per port) is seen as one.  Defaults: 10 hosts, or 15
ports on one host, within 60 s.  A build reaches a handful of registries and mirrors on one or two
ports; a scan at one probe every 1–2 s crosses either line within 30 s.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from corral import events as ev
from corral.detect.detectors._common import (
    EINPROGRESS,
    NS,
    REPEATS,
    Lru,
    StepKey,
    due,
    hostport,
    outbound,
    step_key,
)


@dataclass(slots=True)
class _Window:
    """Probes within the window, with running counts so adding and expiring are O(1)."""

    probes: deque[tuple[int, str, int, bool]] = field(default_factory=deque)  # ts_ns, host, port, failed
    per_host: dict[str, int] = field(default_factory=dict)  # probes per host
    per_pair: dict[tuple[str, int], int] = field(default_factory=dict)  # probes per (host, port)
    ports: dict[str, int] = field(default_factory=dict)  # distinct ports per host
    failed: int = 0
    reported_hosts: int = 0
    reported_ports: int = 0

    def add(self, ts: int, host: str, port: int, failed: bool) -> None:
        self.probes.append((ts, host, port, failed))
        self.per_host[host] = self.per_host.get(host, 0) + 1
        pair = (host, port)
        n = self.per_pair.get(pair, 0)
        self.per_pair[pair] = n + 1
        if n == 0:
            self.ports[host] = self.ports.get(host, 0) + 1
        self.failed += failed

    def pop_oldest(self) -> None:
        _, host, port, failed = self.probes.popleft()
        self.failed -= failed
        pair = (host, port)
        if self.per_pair[pair] == 1:
            del self.per_pair[pair]
            if self.ports[host] == 1:
                del self.ports[host]
            else:
                self.ports[host] -= 1
        else:
            self.per_pair[pair] -= 1
        if self.per_host[host] == 1:
            del self.per_host[host]
        else:
            self.per_host[host] -= 1

    def expire(self, before_ns: int) -> None:
        while self.probes and self.probes[0][0] < before_ns:
            self.pop_oldest()


class ScanDetector:
    """Emits ``scan`` (data: hosts, ports, attempts, failed, window_s, targets, scope).

    ``hosts``: distinct hosts in the window; ``ports``: the most distinct ports tried on one host;
    ``window_s``: the time the counted probes span; ``targets``: a few recent "ip:port";
    ``scope``: "process" or "step" (the latter when no single process of the step made a scan).
    One event per process (or step) and scan, and another each time the counts double.
    """

    kinds = frozenset((ev.CONNECT, ev.SEND, ev.EXIT))

    def __init__(self, *, hosts: int = 10, ports: int = 15, window_s: float = 60.0, max_processes: int = 4096,
                 max_steps: int = 1024, max_probes: int = 1024, sample: int = 8) -> None:
        """
        hosts, ports: thresholds (distinct hosts; distinct ports on one host) within ``window_s``.
        max_processes, max_steps: windows kept at once (least recently active forgotten first).
        max_probes: probes kept per window (a faster scan has crossed the line long before).
        sample: how many "ip:port" targets an event lists.
        """
        self.hosts, self.ports, self.window_ns = hosts, ports, int(window_s * NS)
        self.max_probes, self.sample = max_probes, sample
        self._procs: Lru[int, _Window] = Lru(max_processes)
        self._steps: Lru[StepKey, _Window] = Lru(max_steps)

    def feed(self, event: ev.Event) -> list[ev.DerivedEvent]:
        t = event.type
        if t == ev.EXIT:
            self._procs.pop(event.pid, None)  # a pid may be reused; its step window lives on
            return []
        net = outbound(event)
        if net is None:
            return []
        failed = False
        if t == ev.CONNECT:
            if net.result in REPEATS:
                return []
            failed = net.result < 0 and net.result != -EINPROGRESS
        host, port = net.addr, net.port
        proc = self._procs.touch(net.pid, _Window)
        step = self._steps.touch(step_key(net), _Window)
        since = net.ts_ns - self.window_ns
        proc.expire(since)
        step.expire(since)
        if t == ev.SEND and (host, port) in step.per_pair:
            return []  # more datagrams to a known destination are traffic, not probes
        out: list[ev.DerivedEvent] = []
        for window, scope in ((proc, "process"), (step, "step")):
            window.add(net.ts_ns, host, port, failed)
            if len(window.probes) > self.max_probes:
                window.pop_oldest()
            hosts, ports = len(window.per_host), window.ports.get(host, 0)
            if not (due(hosts, self.hosts, window.reported_hosts) or due(ports, self.ports, window.reported_ports)):
                continue
            if scope == "step" and out:
                # this very probe made a process-level scan: say it once, and let the step's own
                # event wait until the step as a whole grows past what that scan showed
                window.reported_hosts, window.reported_ports = hosts, max(window.ports.values())
                continue
            out.append(self._conclude(net, window, scope))
        return out

    def _conclude(self, net: ev.NetEvent, window: _Window, scope: str) -> ev.DerivedEvent:
        hosts, ports = len(window.per_host), max(window.ports.values())
        window.reported_hosts = max(hosts, window.reported_hosts)
        window.reported_ports = max(ports, window.reported_ports)
        targets: list[str] = []
        for _, host, port, _ in reversed(window.probes):  # only when concluding: rare
            target = hostport(host, port)
            if target not in targets:
                targets.append(target)
                if len(targets) == self.sample:
                    break
        span = (window.probes[-1][0] - window.probes[0][0]) / NS
        return ev.DerivedEvent.about("scan", net, hosts=hosts, ports=ports, attempts=len(window.probes),
                                     failed=window.failed, window_s=round(span, 3), targets=targets, scope=scope)

    def tick(self, now_ns: int) -> list[ev.DerivedEvent]:
        # forget quiet windows, so a table holds only what is active (and a later scan is new)
        since = now_ns - self.window_ns
        for pid in [k for k, w in self._procs.items() if not w.probes or w.probes[-1][0] < since]:
            del self._procs[pid]
        for step in [k for k, w in self._steps.items() if not w.probes or w.probes[-1][0] < since]:
            del self._steps[step]
        return []
