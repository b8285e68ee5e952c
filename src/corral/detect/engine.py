"""Events in, alerts out.

Each event goes to the stateful detectors (which may conclude derived events:
a scan, a pinned CPU, ...) and, with whatever they concluded, to the rules
indexed under its kind.  A rule that matches makes an :class:`Alert`, which
names the sandbox, the episode, the step and its command, the process and its
parents, and carries the triggering event.  Alert storms are folded per rule
and sandbox, with a count, never dropped silently.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral import events as ev
from corral.detect.detectors import Detectors
from corral.enrich.proctable import Process
from corral.rules.fields import FieldRegistry
from corral.rules.loader import Rule, RuleSet, load_default_rules

SEVERITIES = ("info", "low", "medium", "high", "critical")

#: Storm control: at most this many alerts per (rule, sandbox) in FOLD_WINDOW_S;
#: the rest are counted and reported on the next alert of that rule that gets out.
#: Only rules whose action is `alert` are folded: every kill or cut must happen.
FOLD_BURST = 5
FOLD_WINDOW_S = 10.0


@dataclass
class Alert:
    """One rule matching one event, with everything needed to act and explain."""

    rule: str
    severity: str
    category: str
    tags: tuple[str, ...]
    output: str
    action: str
    event: ev.Event
    source: str
    sandbox: str | None = None
    episode: str | None = None
    step_cmdline: str | None = None
    parents: tuple[str, ...] = ()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time_ns: int = field(default_factory=time.time_ns)
    #: what the responder did ("alert", "kill_tree", "would kill_tree" in observe mode) and how it went
    action_taken: str = "alert"
    action_result: str = ""
    #: alerts of this rule and sandbox folded into this one since the last that got out
    folded: int = 0

    @property
    def sandbox_id(self) -> int:
        return self.event.sandbox_id

    @property
    def step(self) -> int:
        return self.event.step_id

    @property
    def pid(self) -> int:
        return self.event.pid

    def to_dict(self) -> dict[str, Any]:
        proc = self.event.proc
        return {
            "id": self.id, "time": ev.rfc3339(self.time_ns), "event_time": ev.rfc3339(self.event.time_ns),
            "rule": self.rule, "severity": self.severity, "category": self.category, "tags": list(self.tags),
            "output": self.output, "action": self.action, "action_taken": self.action_taken,
            "action_result": self.action_result, "folded": self.folded,
            "sandbox": self.sandbox, "sandbox_id": self.sandbox_id, "episode": self.episode,
            "step": self.step, "step_cmdline": self.step_cmdline, "pid": self.pid,
            "exe": proc.exe if proc else "", "cmdline": proc.cmdline if proc else self.event.comm,
            "parents": list(self.parents), "source": self.source, "event": self.event.to_dict(),
        }

    def line(self) -> str:
        """One readable line, for a terminal."""
        where = f"{self.sandbox or 'sandbox ' + str(self.sandbox_id)} step {self.step}"
        taken = f" -> {self.action_taken}" if self.action_taken != "alert" else ""
        if self.action_result:
            taken += f" ({self.action_result})"
        folded = f" (+{self.folded} folded)" if self.folded else ""
        return (f"corral: {self.severity.upper()} [{self.category}] {self.rule}: {self.output} "
                f"[{where}, pid {self.pid}]{taken}{folded}")


class SandboxContext:
    """What the engine knows about each sandbox beyond its events (rules.fields.Context)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[int, str] = {}
        self._modes: dict[int, str] = {}
        self._episodes: dict[int, str] = {}
        self._steps: dict[tuple[int, int], tuple[str, int]] = {}  # -> (cmdline, started wall ns)
        self._canaries: dict[ev.FileId, tuple[int, str]] = {}  # -> (sandbox, kind)
        self._domains: dict[tuple[int, str], tuple[str, float]] = {}

    def add_sandbox(self, sandbox_id: int, name: str, mode: str, episode: str | None) -> None:
        with self._lock:
            self._names[sandbox_id] = name
            self._modes[sandbox_id] = mode
            if episode:
                self._episodes[sandbox_id] = episode

    def remove_sandbox(self, sandbox_id: int) -> None:
        with self._lock:
            for table in (self._names, self._modes, self._episodes):
                table.pop(sandbox_id, None)
            self._steps = {k: v for k, v in self._steps.items() if k[0] != sandbox_id}
            self._domains = {k: v for k, v in self._domains.items() if k[0] != sandbox_id}
            # Its canaries' inode numbers are free for the file system to give to new files.
            self._canaries = {k: v for k, v in self._canaries.items() if v[0] != sandbox_id}

    def add_step(self, sandbox_id: int, step: int, cmdline: str) -> None:
        """Call it just before the step's first process starts: that is when the step began."""
        with self._lock:
            self._steps[(sandbox_id, step)] = (cmdline, time.time_ns())

    def add_canary(self, sandbox_id: int, fid: ev.FileId, kind: str) -> None:
        with self._lock:
            self._canaries[fid] = (sandbox_id, kind)

    def add_domain(self, sandbox_id: int, ip: str, name: str, ttl_s: float) -> None:
        with self._lock:
            self._domains[(sandbox_id, ip)] = (name, time.monotonic() + ttl_s)

    # -- rules.fields.Context ----------------------------------------------

    def domain_of(self, sandbox_id: int, ip: str) -> str | None:
        found = self._domains.get((sandbox_id, ip))
        return found[0] if found is not None and found[1] > time.monotonic() else None

    def sandbox_name(self, sandbox_id: int) -> str | None:
        return self._names.get(sandbox_id)

    def sandbox_mode(self, sandbox_id: int) -> str | None:
        return self._modes.get(sandbox_id)

    def step_cmdline(self, sandbox_id: int, step_id: int) -> str | None:
        found = self._steps.get((sandbox_id, step_id))
        return found[0] if found is not None else None

    def step_started_ns(self, sandbox_id: int, step_id: int) -> int | None:
        found = self._steps.get((sandbox_id, step_id))
        return found[1] if found is not None else None

    def episode(self, sandbox_id: int) -> str | None:
        return self._episodes.get(sandbox_id)

    def canary_kind(self, dev: int, ino: int) -> str | None:
        found = self._canaries.get((dev, ino))
        return found[1] if found is not None else None


class Engine:
    """Detectors and rules over one stream of events (not thread-safe: one
    thread feeds it, the pipeline's)."""

    def __init__(self, *, context: SandboxContext | None = None,
                 ancestors: Callable[[int], Sequence[Process]] | None = None,
                 rule_paths: Sequence[Path] = (), detectors: Detectors | None = None) -> None:
        self.context = context or SandboxContext()
        self._ancestors = ancestors or (lambda pid: ())
        self.registry = FieldRegistry(self.context, self._ancestors)
        self.rule_paths = tuple(rule_paths)
        self.rules: RuleSet = load_default_rules(self.registry, extra=self.rule_paths)
        self.detectors = detectors or Detectors()
        self._fold: dict[tuple[str, int], _Fold] = {}

    def process(self, event: ev.Event) -> list[Alert]:
        """The alerts this event (and what detectors conclude from it) raise."""
        alerts = self._match(event)
        derived = self.detectors.feed(event)
        if derived:  # rarely: most events conclude nothing
            for d in derived:
                alerts += self._match(d)
        return alerts

    def tick(self, now_ns: int | None = None) -> list[Alert]:
        """Time-based conclusions (call about twice a second)."""
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME) if now_ns is None else now_ns
        alerts = self.flush_folds(older_than_s=FOLD_WINDOW_S)
        for derived in self.detectors.tick(now):
            alerts += self._match(derived)
        return alerts

    def flush_folds(self, older_than_s: float = 0.0, sandbox_id: int | None = None) -> list[Alert]:
        """Report what was folded: the last folded alert of each (rule, sandbox)
        whose window is over, carrying the count of the others.  With `sandbox_id`, that
        sandbox's alone, and its windows are forgotten (it is gone).  Windows long over with
        nothing folded are forgotten too: a daemon sees thousands of sandboxes come and go."""
        now = time.monotonic()
        out = []
        for key, fold in list(self._fold.items()):
            if sandbox_id is not None and key[1] != sandbox_id:
                continue
            age = now - fold.start
            if fold.folded and age >= older_than_s:
                assert fold.last is not None
                out.append(self._make(fold.last[0], fold.last[1], folded=fold.folded - 1))
                self._fold[key] = _Fold(now, 1)
            elif not fold.folded and age > FOLD_WINDOW_S:
                del self._fold[key]  # the next alert opens a window of its own, as if none had been
        if sandbox_id is not None:
            for key in [k for k in self._fold if k[1] == sandbox_id]:
                del self._fold[key]
        return out

    def step_ended(self, sandbox_id: int, step: int) -> None:
        self.detectors.step_ended(sandbox_id, step, time.clock_gettime_ns(time.CLOCK_BOOTTIME))

    def _match(self, event: ev.Event) -> list[Alert]:
        rules = self.rules.match(event)
        if not rules:  # most events: nothing to build
            return []
        return [a for rule in rules if (a := self._alert(rule, event)) is not None]

    def _alert(self, rule: Rule, event: ev.Event) -> Alert | None:
        if rule.action != "alert":
            return self._make(rule, event, 0)  # an action is taken for every match: never folded
        now = time.monotonic()
        key = (rule.name, event.sandbox_id)
        fold = self._fold.get(key)
        if fold is None or now - fold.start > FOLD_WINDOW_S:
            fold = self._fold[key] = _Fold(now, 0, fold.folded if fold else 0, fold.last if fold else None)
        if fold.sent >= FOLD_BURST:
            fold.folded += 1
            fold.last = (rule, event)
            return None
        folded, fold.folded, fold.last = fold.folded, 0, None
        fold.sent += 1
        return self._make(rule, event, folded)

    def _make(self, rule: Rule, event: ev.Event, folded: int) -> Alert:
        ctx = self.context
        parents = tuple(f"{p.name}[{p.pid}]" for p in self._ancestors(event.pid)) if event.pid else ()
        return Alert(rule=rule.name, severity=rule.severity, category=rule.category, tags=rule.tags,
                     output=rule.format_output(event), action=rule.action, event=event, source=rule.source,
                     sandbox=ctx.sandbox_name(event.sandbox_id), episode=ctx.episode(event.sandbox_id),
                     step_cmdline=ctx.step_cmdline(event.sandbox_id, event.step_id), parents=parents,
                     folded=folded)



@dataclass
class _Fold:
    """Storm control state of one (rule, sandbox)."""

    start: float
    sent: int
    folded: int = 0
    last: tuple[Rule, ev.Event] | None = None
