"""The one thread that moves data through corral's stages, in one direction:

    sensor (kernel events) + flow sniffer (first bytes of flows) + queued
    events from other threads (DNS questions)
      -> enrich (the Monitor's process table)
      -> detect (detectors and rules: Engine)
      -> the sandbox each event belongs to: its events, its alerts (and what
         respond does about them, through the sandbox's alert handler)

Every sandbox of a process shares one Pipeline (and one Monitor): the kernel
side is loaded once.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral import events as ev
from corral.detect.engine import Alert, Engine
from corral.detect.flows import FlowJoiner, FlowRecord, FlowSniffer, to_event
from corral.monitor import Monitor
from corral.respond.prevent import DeniedExec, ExecGuard
from corral.sandbox.cgroups import LimitWatch, SandboxCgroup

#: How often time-based detectors run.
TICK_S = 0.5
#: How long a flow whose process is not known yet (its accept not read yet) waits.
FLOW_JOIN_WAIT_S = 0.1
#: What corral itself runs in a step's cgroup before the step's command (fs.enter_argv).
LAUNCHER_EXES = frozenset({"/usr/bin/setpriv", "/usr/bin/nsenter", "/usr/bin/setsid", "/usr/bin/env"})


@dataclass
class _Listener:
    on_event: Callable[[ev.Event], None]
    on_alert: Callable[[Alert], None]
    #: events the sandbox itself observed (its cgroup's limit hits): called on the ticks when
    #: the pipeline's LimitWatch says its counters may have moved, or every tick if it has none
    poll: Callable[[], list[ev.Event]] | None = None
    #: notified after each alert was handled (on_alert returned: a freeze is done by then)
    alerted: threading.Condition | None = None


class Pipeline(threading.Thread):
    def __init__(self, monitor: Monitor, *, rule_paths: Sequence[Path] = (), sniff_flows: bool = True,
                 prevent_exec: bool = True) -> None:
        super().__init__(name="corral-pipeline", daemon=True)
        self.monitor = monitor
        self.engine = Engine(ancestors=monitor.ancestors, rule_paths=rule_paths)
        self.flows = FlowSniffer() if sniff_flows else None
        self.exec_guard = ExecGuard() if prevent_exec else None
        self._joiner = FlowJoiner()
        self._scopes: dict[int, tuple[int, int]] = {}  # cgroup id -> (sandbox id, step)
        self._launching: dict[int, bool] = {}  # cgroup id -> forever (the holder's)
        self._listeners: dict[int, _Listener] = {}
        #: sandboxes that poll without a LimitWatch entry: polled every tick
        self._always_polled: set[int] = set()
        self.limits = LimitWatch()
        self._drops_seen = 0
        self._lock = threading.Lock()
        # What other threads hand the pipeline thread: events to detect on, and
        # work on the engine (which only this thread touches).
        self._inbox: queue.SimpleQueue[ev.Event | Callable[[], None]] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._rounds = 0
        self._held: list[tuple[float, FlowRecord]] = []
        self._next_tick = 0.0

    # -- called from other threads -------------------------------------------

    def add_sandbox(self, sandbox_id: int, listener_event: Callable[[ev.Event], None],
                    listener_alert: Callable[[Alert], None],
                    poll: Callable[[], list[ev.Event]] | None = None, *, limits: SandboxCgroup | None = None,
                    alerted: threading.Condition | None = None,
                    cpu_saturation: tuple[float, float] | None = None) -> None:
        """Deliver this sandbox's events and alerts.  `poll` reports its limit hits: with `limits`
        (the cgroup whose counters it reads) only when they may have moved (LimitWatch), else every
        tick.  `alerted` is notified after each of its alerts was handled.  `cpu_saturation`:
        the sandbox's own (percent, seconds) for the CPU detector (its policy's)."""
        if cpu_saturation is not None:
            percent, seconds = cpu_saturation
            cpu = self.engine.detectors.cpu
            self._in_pipeline_thread(lambda: cpu.set_thresholds(sandbox_id, percent, seconds))
        if limits is not None:
            self.limits.add(sandbox_id, limits)
        with self._lock:
            self._listeners[sandbox_id] = _Listener(listener_event, listener_alert, poll, alerted)
            if poll is not None and limits is None:
                self._always_polled.add(sandbox_id)
            else:
                self._always_polled.discard(sandbox_id)

    def remove_sandbox(self, sandbox_id: int) -> None:
        """Report what was folded for it, then forget it (call flush() first if its
        last events matter: the runner does, before it unwatches the steps)."""
        with self._lock:
            listener = self._listeners.pop(sandbox_id, None)
            self._always_polled.discard(sandbox_id)
            self._scopes = {c: s for c, s in self._scopes.items() if s[0] != sandbox_id}
        self.limits.remove(sandbox_id)

        def report_folds() -> None:
            for alert in self.engine.flush_folds(sandbox_id=sandbox_id):
                if listener is not None:
                    listener.on_alert(alert)
            self.engine.context.remove_sandbox(sandbox_id)
            self.engine.detectors.cpu.clear_thresholds(sandbox_id)

        self._in_pipeline_thread(report_folds)

    def watch(self, cgroup_id: int, sandbox_id: int, step: int, *, infrastructure: bool = False) -> None:
        """Report what processes in this cgroup do, as this sandbox's step.

        Until the first exec of something other than corral's launcher
        (LAUNCHER_EXES), the cgroup's events are corral's own and are not
        reported; an `infrastructure` cgroup (the namespace holder) never is.
        """
        with self._lock:
            self._scopes[cgroup_id] = (sandbox_id, step)
            self._launching[cgroup_id] = infrastructure
        self.monitor.watch_cgroup(cgroup_id, sandbox_id, step)

    def unwatch(self, cgroup_id: int) -> None:
        self.monitor.unwatch_cgroup(cgroup_id)
        with self._lock:
            self._launching.pop(cgroup_id, None)
        self._joiner.forget_cgroup(cgroup_id)

    def submit(self, event: ev.Event) -> None:
        """An event made elsewhere (a DNS question), to go through detection."""
        self._inbox.put(event)
        self.monitor.sensor.ring.wake()

    def step_ended(self, sandbox_id: int, step: int) -> None:
        self._inbox.put(lambda: self.engine.step_ended(sandbox_id, step))
        self.monitor.sensor.ring.wake()

    def _in_pipeline_thread(self, work: Callable[[], None], timeout: float = 5.0) -> None:
        """Run `work` in the pipeline thread and wait for it (inline if that thread is gone)."""
        if not self.is_alive() or threading.current_thread() is self:
            work()
            return
        done = threading.Event()

        def run() -> None:
            try:
                work()
            finally:
                done.set()

        self._inbox.put(run)
        self.monitor.sensor.ring.wake()
        done.wait(timeout)

    def flush(self, timeout: float = 1.0) -> None:
        """Wait until everything the kernel has written so far went through."""
        deadline = time.monotonic() + timeout
        with self._idle:
            target = self._rounds + 2  # the round in flight may predate the caller's events
            while self._rounds < target and self.is_alive() and time.monotonic() < deadline:
                self.monitor.sensor.ring.wake()
                self._idle.wait(0.01)

    # -- the pipeline thread -----------------------------------------------------

    def run(self) -> None:
        while True:
            try:
                self._round()
            except (OSError, ValueError):
                self.limits.close()
                return  # the monitor was closed under us: nothing more to deliver
            with self._idle:
                self._rounds += 1
                self._idle.notify_all()

    def _round(self) -> None:
        # Flows first, then the sensor: every connect/accept that a flow follows
        # is then in the sensor batch, ready to name the flow's process.
        records = self.flows.read() if self.flows is not None else []
        denied = self.exec_guard.read() if self.exec_guard is not None else []
        batch = self.monitor.read(timeout=0.05)
        with self._lock:
            listeners = dict(self._listeners)
        limits = self.limits
        for event in batch:
            if isinstance(event, ev.NetEvent):
                self._joiner.observe(event)
            elif isinstance(event, ev.ForkEvent):  # (the holder's cgroup included: its tasks count too)
                limits.forked(event.sandbox_id)
            elif isinstance(event, ev.ExitEvent):
                limits.exited(event.sandbox_id, killed=event.signal == signal.SIGKILL)
            self._handle(event, listeners)
        self._handle_flows(records, listeners)
        for d in denied:
            self._handle(self._denied_event(d), listeners)
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._inbox.get_nowait()
                if callable(item):
                    item()
                else:
                    self._handle(item, listeners)
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK_S
            for alert in self.engine.tick():
                self._deliver_alert(alert, listeners)
            self._poll_limits(listeners)

    def _poll_limits(self, listeners: dict[int, _Listener]) -> None:
        """Limit hits of the sandboxes whose counters may have moved (see LimitWatch)."""
        drops = self.monitor.drops
        if drops != self._drops_seen:  # lost records may have been the forks or exits that tell
            self._drops_seen = drops
            self.limits.records_lost()
        due = self.limits.due()
        with self._lock:
            polled = [*due, *self._always_polled]
        for sandbox_id in polled:
            listener = listeners.get(sandbox_id)
            if listener is not None and listener.poll is not None:
                for event in listener.poll():
                    self._handle(event, listeners)

    def _handle_flows(self, records: list[FlowRecord], listeners: dict[int, _Listener]) -> None:
        now = time.monotonic()
        waiting = self._held + [(now, r) for r in records]
        self._held = []
        for since, record in waiting:
            source = self._joiner.match(record)
            if source is None and now - since < FLOW_JOIN_WAIT_S:
                self._held.append((since, record))  # its accept() may not be read yet
                continue
            scope = self._scopes.get(record.cgroup_id)
            if scope is None and source is None:
                continue  # another corral process's sandbox: the attachment sees all of corral/
            self._handle(to_event(record, scopes=self._scopes, source=source), listeners)

    def _denied_event(self, d: DeniedExec) -> ev.DerivedEvent:
        sandbox_id, step = self._scopes.get(d.cgroup_id, (d.sandbox_id, 0))
        return ev.DerivedEvent.make(
            "exec_denied", ts_ns=d.ts_ns, cgroup_id=d.cgroup_id, pid=d.pid, tid=d.tid, uid=d.uid,
            sandbox_id=sandbox_id, step_id=step, comm=d.comm, proc=self.monitor.processes.get(d.pid),
            filename=d.filename, path=d.path, match=d.kind.name.lower(), rule=d.rule, enforced=d.enforced)

    def _handle(self, event: ev.Event, listeners: dict[int, _Listener]) -> None:
        listener = listeners.get(event.sandbox_id)
        if listener is None or self._corral_own(event):
            return
        listener.on_event(event)
        for alert in self.engine.process(event):
            self._deliver_alert(alert, listeners)

    def _corral_own(self, event: ev.Event) -> bool:
        """Is this event corral's own launcher at work (not the sandbox's)?"""
        forever = self._launching.get(event.cgroup_id)
        if forever is None or event.type == ev.EXEC_DENIED:  # (the deny list never names the launcher)
            return False
        if forever:
            return True
        if isinstance(event, ev.ExecEvent) and event.filename not in LAUNCHER_EXES:
            with self._lock:
                self._launching.pop(event.cgroup_id, None)  # the step's command: from here on, the agent's
            return False
        return True

    @staticmethod
    def _deliver_alert(alert: Alert, listeners: dict[int, _Listener]) -> None:
        listener = listeners.get(alert.sandbox_id)
        if listener is not None:
            listener.on_alert(alert)
            if listener.alerted is not None:
                with listener.alerted:
                    listener.alerted.notify_all()
