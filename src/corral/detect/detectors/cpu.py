"""``cpu_saturation``: a process that kept (at least) X% of one CPU busy for T seconds.

The kernel sensor does not sample CPU; this detector does, at each tick, from
``/proc/<pid>/stat`` (utime + stime of the whole thread group), for the processes of watched
sandboxes it learns from exec, fork and connect events and forgets on exit.  The default, 40%
over 20 s, catches a miner throttled to half a CPU ("stealthier variants", docs/threats.md) while a
compiler burst or a test run that pins a CPU for a few seconds stays under it.  The event lists
the process's recent outbound peers, because a miner talks to its pool.

A process seen from its birth has used no CPU at its start: that is its first sample, and /proc is
not read until the window could be full, T seconds on.  Most processes (every short command of a
step) never get that old and are never read: with hundreds of sandboxes running steps, reading every
live process at every tick was a file read per process twice a second.  Learned from its fork, a
process is seen from its birth; learned from an exec (a step's command, whose fork by corral's
launcher is not reported), it is taken to be, and the first read checks its start time: one that
started more than a second before (a process not seen from its birth) is then sampled from that
read on, and concludes T seconds later than it would have.  One learned from a connect is read at
the next tick, as before, for its start time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from corral import events as ev
from corral.detect.detectors._common import EINPROGRESS, NS, Lru, due, hostport, outbound
from corral.sensor.host import TICK_NS, proc_stat

#: a process that started at most this long before it was first seen is taken as seen from its birth
#: (a step's first process starts in corral's cgroup and is seen from its exec, milliseconds later)
_BIRTH_SLACK_NS = NS


@dataclass(slots=True)
class _Proc:
    origin: ev.Event  # the exec, fork or connect it was learned from (header of what we emit)
    pid: int
    ppid: int
    seen_ns: int  # when it was first seen (that event's time)
    start: int = -1  # /proc starttime, to notice a reused pid
    read_ns: int = 0  # when to read /proc next, at the first tick from then (0: the next tick)
    samples: deque[tuple[int, int]] = field(default_factory=deque)  # (now_ns, cpu ns)
    peers: dict[str, int] = field(default_factory=dict)  # "ip:port" -> last seen, in insertion order
    busy_ns: int = 0  # time spent saturated, counted from the first conclusion
    reported_ns: int = 0
    last_ns: int = 0


def _cpu_ns(pid: int) -> tuple[int, int] | None:
    """(starttime, utime + stime in ns) of a process, or None when it is gone."""
    fields = proc_stat(pid)
    if fields is None:
        return None
    return int(fields[19]), (int(fields[11]) + int(fields[12])) * TICK_NS


class CpuSaturationDetector:
    """Emits ``cpu_saturation`` (data: percent, seconds, peers).

    ``percent``: the average % of one CPU over the last ``seconds_window`` (above 100 for several
    busy threads); ``seconds``: how long the process has been found saturated so far; ``peers``:
    recent outbound "ip:port" it connected to; ``policy``: whether the thresholds crossed are the
    sandbox policy's own (set_thresholds) rather than the detector's.  One event per process,
    another each time ``seconds`` doubles.
    """

    kinds = frozenset((ev.EXEC, ev.FORK, ev.EXIT, ev.CONNECT))

    def __init__(self, *, percent: float = 40.0, seconds: float = 20.0, max_per_sandbox: int = 1024,
                 max_peers: int = 8) -> None:
        """
        percent, seconds: the average share of one CPU, and over how long, that concludes.
        max_per_sandbox: processes sampled per sandbox (the oldest learned are dropped beyond it;
        a sandbox's pids limit is normally far below).
        max_peers: peers kept per process (the most recent).
        """
        self.percent, self.window_ns = percent, int(seconds * NS)
        self.max_per_sandbox, self.max_peers = max_per_sandbox, max_peers
        self._sandboxes: dict[int, Lru[int, _Proc]] = {}
        self._policies: dict[int, tuple[float, int]] = {}  # sandbox id -> its own (percent, window ns)

    def set_thresholds(self, sandbox_id: int, percent: float, seconds: float) -> None:
        """A sandbox's own thresholds (its policy's detect.cpu_saturation), in place of the detector's."""
        self._policies[sandbox_id] = (percent, int(seconds * NS))

    def clear_thresholds(self, sandbox_id: int) -> None:
        self._policies.pop(sandbox_id, None)

    def _thresholds(self, sandbox_id: int) -> tuple[float, int]:
        return self._policies.get(sandbox_id) or (self.percent, self.window_ns)

    def _table(self, event: ev.Event) -> Lru[int, _Proc]:
        key = event.sandbox_id or -event.cgroup_id  # host-wide mode: one table per cgroup
        table = self._sandboxes.get(key)
        if table is None:
            table = self._sandboxes[key] = Lru(self.max_per_sandbox)
        return table

    def feed(self, event: ev.Event) -> list[ev.DerivedEvent]:
        t = event.type
        if t == ev.FORK and isinstance(event, ev.ForkEvent):
            child = event.child_pid
            self._table(event).put(child, self._born(event, child, event.pid))
        elif t == ev.EXEC:
            # the same process (its CPU time carries on), now known by its new image
            self._table(event).touch(event.pid, lambda: self._born(event, event.pid, event.ppid)).origin = event
        elif t == ev.EXIT:
            table = self._sandboxes.get(event.sandbox_id or -event.cgroup_id)
            if table is not None:
                table.pop(event.pid, None)
        elif t == ev.CONNECT:
            net = outbound(event)
            if net is not None and net.result in (0, -EINPROGRESS):
                proc = self._table(net).touch(net.pid, lambda: _Proc(net, net.pid, net.ppid, net.ts_ns))
                if proc.origin.pid != net.pid:
                    proc.origin = net  # learned from its fork: this event knows the process itself
                peer = hostport(net.addr, net.port)
                proc.peers.pop(peer, None)
                proc.peers[peer] = net.ts_ns
                if len(proc.peers) > self.max_peers:
                    del proc.peers[next(iter(proc.peers))]
        return []

    def _born(self, event: ev.Event, pid: int, ppid: int) -> _Proc:
        """A process taken to be born at `event`, with no CPU time used: the first sample, and nothing
        to read before the window could be full."""
        proc = _Proc(event, pid, ppid, event.ts_ns, read_ns=event.ts_ns + self._thresholds(event.sandbox_id)[1])
        proc.samples.append((event.ts_ns, 0))
        return proc

    def tick(self, now_ns: int) -> list[ev.DerivedEvent]:
        out: list[ev.DerivedEvent] = []
        for key, table in list(self._sandboxes.items()):
            for pid, proc in list(table.items()):
                if now_ns < proc.read_ns:
                    continue  # seen from its birth, and younger than the window
                found = _cpu_ns(pid)
                if found is None:
                    del table[pid]  # gone (its exit event may have been dropped)
                    continue
                if found[0] != proc.start:
                    if proc.start != -1 or not self._first_read(proc, found[0]):
                        del table[pid]  # the pid was reused (the exit was lost): not the process we knew
                        continue
                    if now_ns < proc.read_ns:
                        continue
                event = self._sample(proc, now_ns, found[1])
                if event is not None:
                    out.append(event)
            if not table:
                del self._sandboxes[key]
        return out

    def _first_read(self, proc: _Proc, start: int) -> bool:
        """Take the process's /proc starttime (clock ticks since boot); False if it shows a process
        started after this one was seen: its pid was reused."""
        proc.start = start
        start_ns = start * TICK_NS
        if start_ns > proc.seen_ns:
            return False
        if start_ns >= proc.seen_ns - _BIRTH_SLACK_NS:
            # seen from (about) its birth: no CPU time used at its start, the first sample
            proc.samples.clear()
            proc.samples.append((start_ns, 0))
            proc.read_ns = max(proc.read_ns, start_ns + self._thresholds(proc.origin.sandbox_id)[1])
        else:
            proc.samples.clear()  # older than it was taken to be: its CPU time so far is not the window's
            proc.read_ns = 0
        return True

    def _sample(self, proc: _Proc, now: int, cpu: int) -> ev.DerivedEvent | None:
        samples = proc.samples
        samples.append((now, cpu))
        threshold, window_ns = self._thresholds(proc.origin.sandbox_id)
        since = now - window_ns
        # keep exactly one sample at or before the window's start, to average over >= T seconds
        while len(samples) >= 2 and samples[1][0] <= since:
            samples.popleft()
        last, proc.last_ns = proc.last_ns, now
        start, cpu0 = samples[0]
        if start > since or now == start:
            return None  # not watched for T seconds yet
        percent = 100.0 * (cpu - cpu0) / (now - start)
        if percent < threshold:
            return None
        proc.busy_ns += (now - start) if proc.busy_ns == 0 else (now - last)
        if not due(proc.busy_ns, window_ns, proc.reported_ns):
            return None
        proc.reported_ns = proc.busy_ns
        o = proc.origin
        return ev.DerivedEvent.make(
            "cpu_saturation", ts_ns=now, cgroup_id=o.cgroup_id, pid=proc.pid, tid=proc.pid, ppid=proc.ppid,
            uid=o.uid, sandbox_id=o.sandbox_id, step_id=o.step_id, comm=o.comm,
            proc=o.proc if o.pid == proc.pid else None,
            percent=round(percent, 1), seconds=round(proc.busy_ns / NS, 1), peers=list(proc.peers),
            policy=o.sandbox_id in self._policies)
