"""``outlives_step``: a process still running G seconds after the step that started it ended.

A step is one tool call; what it leaves behind (``nohup miner &``, ``setsid ssh -fN -R ...``, a
daemonised listener) keeps running under the agent's name while the next steps look innocent.
The detector knows each step's live processes from fork, exec and exit events; the caller says
when a step has ended (``step_ended``).  The grace G (default 5 s) lets a step's processes finish
exiting.  Step 0 is the sandbox's holder (its long-lived init), so it is never reported.
"""

from __future__ import annotations

from corral import events as ev
from corral.detect.detectors._common import NS, Lru, StepKey, step_key
from corral.sensor.host import pid_alive


class _Step:
    __slots__ = ("ended_ns", "live", "reported")

    def __init__(self) -> None:
        self.live: dict[int, ev.Event] = {}  # pid -> the event that made it known
        self.reported: dict[int, None] = {}  # leftovers already reported, and their descendants
        self.ended_ns = 0  # 0 while the step runs



class OutlivesStepDetector:
    """Emits ``outlives_step`` (data: seconds) once per leftover process."""

    kinds = frozenset((ev.FORK, ev.EXEC, ev.EXIT))

    def __init__(self, *, grace_s: float = 5.0, max_steps: int = 4096, max_per_step: int = 4096) -> None:
        """
        grace_s: how long after its step ended a process must still run to be reported.
        max_steps: steps followed at once (the least recently active are forgotten first).
        max_per_step: live processes remembered per step.
        """
        self.grace_ns = int(grace_s * NS)
        self.max_per_step = max_per_step
        self._steps: Lru[StepKey, _Step] = Lru(max_steps)
        self._pid_step: dict[int, StepKey] = {}

    def feed(self, event: ev.Event) -> list[ev.DerivedEvent]:
        t = event.type
        if t == ev.EXIT:
            key = self._pid_step.pop(event.pid, None)
            step = self._steps.get(key) if key is not None else None
            if step is not None:
                step.live.pop(event.pid, None)
            return []
        if t not in (ev.FORK, ev.EXEC) or (event.sandbox_id and event.step_id == 0):
            return []
        pid = event.child_pid if isinstance(event, ev.ForkEvent) else event.pid
        key = step_key(event)
        step = self._steps.touch(key, _Step)
        if event.pid in step.reported or pid in step.reported:
            # a leftover's children are part of what was reported: a leftover loop that runs
            # a command each second must not make an event each second
            self._remember(step.reported, pid)
            return []
        if len(step.live) < self.max_per_step or pid in step.live:
            step.live[pid] = event
            self._pid_step[pid] = key
            if len(self._pid_step) > 16 * self.max_per_step:
                # exits lost to drops, or steps forgotten: keep only pids of steps still followed
                self._pid_step = {p: k for k, s in self._steps.items() for p in s.live}
        return []

    def step_ended(self, sandbox_id: int, step_id: int, now_ns: int) -> None:
        if step_id == 0:
            return
        step = self._steps.get((sandbox_id, step_id, 0))
        if step is not None and not step.ended_ns:
            step.ended_ns = now_ns

    def tick(self, now_ns: int) -> list[ev.DerivedEvent]:
        out: list[ev.DerivedEvent] = []
        for key, step in list(self._steps.items()):
            if not step.ended_ns:
                continue
            if not step.live:
                del self._steps[key]  # ended and empty: nothing more can happen to it
                continue
            late = now_ns - step.ended_ns
            if late < self.grace_ns:
                continue
            for pid, known in list(step.live.items()):
                del step.live[pid]  # reported (or found gone) once, and never again
                self._pid_step.pop(pid, None)
                if not pid_alive(pid):
                    continue  # its exit was not seen (a dropped record)
                self._remember(step.reported, pid)
                fork = isinstance(known, ev.ForkEvent) and known.pid != pid
                out.append(ev.DerivedEvent.make(
                    "outlives_step", ts_ns=now_ns, cgroup_id=known.cgroup_id, pid=pid, tid=pid,
                    ppid=known.pid if fork else known.ppid, uid=known.uid, sandbox_id=known.sandbox_id,
                    step_id=known.step_id, comm=known.comm, proc=None if fork else known.proc,
                    seconds=round(late / NS, 1)))
        return out

    def _remember(self, reported: dict[int, None], pid: int) -> None:
        reported[pid] = None
        if len(reported) > self.max_per_step:
            del reported[next(iter(reported))]
