"""The node daemon behind `corral serve`: one process, one sensor, many sandboxes.

Every Sandbox made here shares the process's Monitor and pipeline (that is
how corral.Sandbox works), records into one Store through one Recorder, and
reports its alerts and state changes to a Hub, which fans them out to the
server-sent-event streams of the API and the web console.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.console.tree import process_tree
from corral.detect.engine import Alert
from corral.errors import CorralError
from corral.sandbox.runner import Sandbox, SandboxFrozen
from corral.store import Recorder, Store, open_store

#: Streams that fall this far behind lose messages (counted) rather than grow without bound.
SUBSCRIBER_QUEUE = 10_000
MAX_OUTPUT = 1 << 20  # bytes of a step's stdout/stderr returned by the API


class NotFound(CorralError):
    """No such sandbox (in this daemon)."""


class Conflict(CorralError):
    """The sandbox cannot do that now (it is frozen, or stopping)."""


class Hub:
    """Fan-out of live messages from any thread to asyncio subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]] = []
        self._lock = threading.Lock()
        self.lost = 0

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        with self._lock:
            self._subscribers = [(loop, q) for loop, q in self._subscribers if q is not queue]

    def publish(self, message: dict[str, Any]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):  # its loop is closed: the server is stopping
                loop.call_soon_threadsafe(self._put, queue, message)

    def _put(self, queue: asyncio.Queue[dict[str, Any]], message: dict[str, Any]) -> None:
        try:
            queue.put_nowait(message)
        except asyncio.QueueFull:
            self.lost += 1


@dataclass
class _Live:
    sandbox: Sandbox
    lock: threading.Lock  # one step at a time per sandbox
    cpu_ns: int = 0
    cpu_at: float = 0.0
    cpu_percent: float = 0.0


class Daemon:
    """Sandboxes made on request, recorded, their alerts published live."""

    def __init__(self, data_dir: str | Path | None = None, *, rules: Sequence[str | Path] = (),
                 max_age_s: float | None = None, max_bytes: int | None = None) -> None:
        self.store: Store = open_store(data_dir)
        # The recorder writes through a connection of its own; the API's queries use self.store.
        self.recorder = Recorder(open_store(data_dir), max_age_s=max_age_s, max_bytes=max_bytes)
        self.hub = Hub()
        self._rules = tuple(rules)
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self.started = time.time()

    # -- sandboxes -------------------------------------------------------------------

    def create(self, *, policy: str = "default", mode: str | None = None, episode: str | None = None,
               netns: str | None = None, allow: Sequence[str] = (), allow_domains: Sequence[str] = (),
               cpus: float | None = None, memory: str | int | None = None, pids: int | None = None) -> dict[str, Any]:
        sandbox = Sandbox(policy, mode=mode, episode=episode, netns=netns, allow=allow, allow_domains=allow_domains,
                          cpus=cpus, memory=memory, pids=pids, rules=self._rules, recorder=self.recorder,
                          on_alert=self._on_alert, keep_events=0)  # the store has them all
        sandbox.start()
        with self._lock:
            self._live[sandbox.name] = _Live(sandbox, threading.Lock())
        self.recorder.flush()
        info = self.describe(sandbox.name)
        self.hub.publish({"type": "sandbox", "sandbox": info})
        return info

    def exec(self, name: str, command: Sequence[str] | str, *, timeout: float | None = None,
             input: str | None = None) -> dict[str, Any]:
        live = self._get(name)
        if live.sandbox.frozen:
            raise Conflict(f"sandbox {name} is frozen (evidence was taken): release or stop it first")
        if not live.lock.acquire(timeout=0.1):
            raise Conflict(f"sandbox {name} is running a step: one step at a time")
        started = time.monotonic()
        try:
            self.hub.publish({"type": "step", "sandbox": name, "state": "started",
                              "command": command if isinstance(command, str) else " ".join(command)})
            try:
                result = live.sandbox.exec(command, timeout=timeout, input=input)
            except SandboxFrozen as e:
                self._publish_state(name)
                raise Conflict(str(e)) from e
        finally:
            live.lock.release()
        live.sandbox.flush_events()
        self.hub.publish({"type": "step", "sandbox": name, "state": "ended", "step": result.step,
                          "exit_code": result.exit_code})
        return {"sandbox": name, "step": result.step, "exit_code": result.exit_code,
                "stdout": result.stdout[-MAX_OUTPUT:], "stderr": result.stderr[-MAX_OUTPUT:],
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                "alerts": [a.to_dict() for a in live.sandbox.alerts if a.step == result.step]}

    def release(self, name: str) -> dict[str, Any]:
        live = self._get(name)
        if not live.sandbox.frozen:
            raise Conflict(f"sandbox {name} is not frozen: nothing to release")
        live.sandbox.release()
        return self._publish_state(name)

    def stop(self, name: str) -> dict[str, Any]:
        with self._lock:
            live = self._live.pop(name, None)
        if live is None:
            raise NotFound(f"no running sandbox {name} in this daemon (`corral ps` lists them)")
        live.sandbox.close()
        self.recorder.flush()
        return self._publish_state(name)

    def close(self) -> None:
        """Stop every sandbox, write what is queued, close the store."""
        with self._lock:
            names = list(self._live)
        for name in names:
            with contextlib.suppress(CorralError):
                self.stop(name)
        self.recorder.close()
        self.store.close()

    # -- what is known -----------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return list(self._live)

    def describe(self, name: str, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """The stored record (read unless given), with live figures for a sandbox this daemon runs."""
        record = record if record is not None else self.store.sandbox(name)
        if record is None:
            raise NotFound(f"no sandbox {name} (`corral ps --all` lists them)")
        with self._lock:
            live = self._live.get(name)
        record["live"] = live is not None
        if live is not None:
            sb = live.sandbox
            record["state"] = "frozen" if sb.frozen else "running"
            record["steps"] = sb.steps
            with contextlib.suppress(Exception):  # a sandbox mid-teardown has no cgroup files
                record["memory_bytes"] = sb.cgroup.memory_bytes()
                record["cpu_percent"] = self._cpu_percent(live)
        return record

    def sandboxes(self, *, all_: bool = False) -> list[dict[str, Any]]:
        names = set(self.names())
        out = []
        for record in self.store.sandboxes():  # one query for all, not one per sandbox
            if record["name"] in names:
                out.append(self.describe(record["name"], record))
            elif all_:
                out.append({**record, "live": False})
        return out

    def detail(self, name: str) -> dict[str, Any]:
        """Everything the sandbox page shows: record, steps, alerts, process tree, evidence."""
        info = self.describe(name)
        alerts = self.store.alerts(sandbox=name, limit=10_000)
        events = self.store.events(sandbox=name, kinds=("fork", "exec", "exit"), limit=100_000)
        return {"sandbox": info, "steps": self.store.steps(name), "alerts": alerts,
                "tree": process_tree(events, alerts), "evidence": self.store.evidence(name)}

    # -- internals -----------------------------------------------------------------------

    def _get(self, name: str) -> _Live:
        with self._lock:
            live = self._live.get(name)
        if live is None:
            raise NotFound(f"no running sandbox {name} in this daemon (`corral ps` lists them)")
        return live

    def _cpu_percent(self, live: _Live) -> float:
        """CPU use since the last look (a console polls every few seconds)."""
        now, used = time.monotonic(), live.sandbox.cgroup.cpu_usage_ns()
        if live.cpu_at and now > live.cpu_at:
            live.cpu_percent = round(100.0 * (used - live.cpu_ns) / ((now - live.cpu_at) * 1e9), 1)
        live.cpu_ns, live.cpu_at = used, now
        return live.cpu_percent

    def _on_alert(self, alert: Alert) -> None:
        # Runs on the pipeline thread, after the action: publish only, never block.
        self.hub.publish({"type": "alert", "alert": alert.to_dict()})
        with self._lock:
            live = self._live.get(alert.sandbox or "")
        if live is not None and live.sandbox.frozen:
            self.hub.publish({"type": "sandbox", "sandbox": {"name": live.sandbox.name, "state": "frozen"}})

    def _publish_state(self, name: str) -> dict[str, Any]:
        info = self.describe(name)
        self.hub.publish({"type": "sandbox", "sandbox": info})
        return info
