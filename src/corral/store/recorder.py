"""Recorder: what sandboxes see goes into a Store, off the detection thread.

The pipeline thread must never wait for a disk: event() only appends to a
queue.  A writer thread turns queued events into rows and writes them in
batches (one transaction each, which is what makes ~100k events/s possible
with SQLite), and writes alerts and step/sandbox records ahead of queued
events.  A write that fails (a store locked by another process) is retried,
never dropped; only when events pile up past MAX_QUEUED_EVENTS are new events
counted and dropped, and the count is reported.  Alerts are never dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from corral import events as ev
from corral.store.base import EventRow, Store, StoreError

BATCH = 5000
MAX_QUEUED_EVENTS = 500_000
#: How long events may wait before they are written (and seen by `corral events --follow`).
WRITE_EVERY_S = 0.1
RETRY_AFTER_S = 0.5
PRUNE_EVERY_S = 60.0


class Recorder:
    """Feeds one Store from any thread; see the module's docstring."""

    def __init__(self, store: Store, *, max_age_s: float | None = None, max_bytes: int | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.dropped = 0
        self._retention = (max_age_s, max_bytes)
        self._warn = warn or (lambda line: print(f"corral: {line}", file=sys.stderr, flush=True))
        self._records: deque[Callable[[], None]] = deque()  # alerts, steps, states: in order, before events
        self._events: deque[tuple[str, ev.Event]] = deque()
        self._wake = threading.Condition()
        self._queued = 0
        self._written = 0
        self._closing = False
        self._last_prune = 0.0
        self._thread = threading.Thread(target=self._run, name="corral-recorder", daemon=True)
        self._thread.start()

    # -- what sandboxes call ---------------------------------------------------------

    def sandbox_started(self, name: str, *, episode: str | None, policy: str, mode: str,
                        limits: dict[str, Any]) -> None:
        now = time.time_ns()
        self._record(lambda: self.store.put_sandbox(name, episode=episode, policy=policy, mode=mode,
                                                    created_ns=now, limits=limits, owner_pid=os.getpid()))

    def state(self, name: str, state: str) -> None:
        now = time.time_ns()
        self._record(lambda: self.store.set_state(name, state, now))

    def step_started(self, sandbox: str, step: int, command: str) -> None:
        now = time.time_ns()
        self._record(lambda: self.store.put_step(sandbox, step, command, now))

    def step_ended(self, sandbox: str, step: int, exit_code: int) -> None:
        now = time.time_ns()
        self._record(lambda: self.store.end_step(sandbox, step, now, exit_code))

    def alert(self, alert: dict[str, Any]) -> None:
        self._record(lambda: self.store.add_alert(alert))

    def evidence(self, sandbox: str, alert_id: str, path: str) -> None:
        now = time.time_ns()

        def write() -> None:
            try:
                with open(path) as f:
                    bundle = f.read()
            except OSError as e:
                bundle = json.dumps({"error": f"cannot read {path}: {e.strerror}"})
            self.store.add_evidence(sandbox, alert_id, path, bundle, now)
        self._record(write)

    def event(self, sandbox: str, event: ev.Event) -> None:
        """Queue one event (the hot path: no lock, no wake-up; the writer looks every WRITE_EVERY_S)."""
        if len(self._events) >= MAX_QUEUED_EVENTS:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100_000 == 0:
                self._warn(f"the store is not keeping up: {self.dropped} events not recorded so far "
                           "(alerts are never dropped)")
            return
        self._queued += 1
        self._events.append((sandbox, event))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        with self._wake:
            target = self._queued
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._wake:
                if self._written >= target:
                    return True
                self._wake.wait(0.02)
        return False

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, stop the writer, close the store."""
        if self._closing:
            return
        if not self.flush(timeout):
            self._warn(f"the store took over {timeout:.0f} s to write what was queued; some events may be "
                       "missing from it")
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout)
        self.store.close()

    # -- the writer ------------------------------------------------------------------

    def _record(self, write: Callable[[], None]) -> None:
        with self._wake:
            self._queued += 1
            self._records.append(write)
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._records and not self._events and not self._closing:
                    self._wake.wait(WRITE_EVERY_S)
                if self._closing and not self._records and not self._events:
                    return
            try:
                self._write_pending()
                self._maybe_prune()
            except StoreError as e:
                # Kept in the queues: written when the store can be written again.
                self._warn(f"{e} (retrying in {RETRY_AFTER_S} s)")
                time.sleep(RETRY_AFTER_S)

    def _write_pending(self) -> None:
        while self._records:
            self._records[0]()
            with self._wake:
                self._records.popleft()
                self._written += 1
                self._wake.notify_all()
        while self._events:
            batch = [self._events[i] for i in range(min(BATCH, len(self._events)))]
            self.store.add_events([_row(sandbox, e) for sandbox, e in batch])
            with self._wake:
                for _ in batch:
                    self._events.popleft()
                self._written += len(batch)
                self._wake.notify_all()
            if self._records:  # an alert came in meanwhile: it goes first
                return

    def _maybe_prune(self) -> None:
        max_age_s, max_bytes = self._retention
        if (max_age_s is None and max_bytes is None) or time.monotonic() - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = time.monotonic()
        with contextlib.suppress(StoreError):  # a busy store: prune next time
            self.store.prune(max_age_s=max_age_s, max_bytes=max_bytes)


def _row(sandbox: str, e: ev.Event) -> EventRow:
    # orjson: the JSON of an event is most of the cost of recording it (json.dumps is 5x slower).
    data = e.to_dict()
    return EventRow(sandbox, data["step_id"], ev.wall_time_ns(data["ts_ns"]), data["kind"], data["pid"],
                    data["ppid"], data["comm"],
                    orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS).decode())
