"""The storage interface every store implements, and the records it keeps."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, NamedTuple

from corral.errors import CorralError

#: Sandbox states as stored (and shown by `corral ps` and the console).
STATES = ("running", "frozen", "stopped")


class StoreError(CorralError):
    """The store cannot be opened, read or written; the message says what to do."""


class EventRow(NamedTuple):
    """One event as stored: the columns queries filter on, and the whole event as JSON.
    (A tuple: the batch goes to the database as it is.)"""

    sandbox: str
    step: int
    time_ns: int
    kind: str
    pid: int
    ppid: int
    comm: str
    data: str  # JSON of Event.to_dict()


class Store(abc.ABC):
    """Sandboxes, steps, events, alerts and evidence bundles.

    Every write is one transaction: when it returns, the record survives a crash
    of corral.  Queries return lists of plain dicts, newest last, and take
    ``after`` (a record's ``seq``) so a follower can ask for what is new.
    """

    # -- writes ------------------------------------------------------------------

    @abc.abstractmethod
    def put_sandbox(self, name: str, *, episode: str | None, policy: str, mode: str, created_ns: int,
                    limits: dict[str, Any], owner_pid: int) -> None:
        """Record a new sandbox (state running)."""

    @abc.abstractmethod
    def set_state(self, name: str, state: str, at_ns: int) -> None:
        """Move a sandbox to running, frozen or stopped (stopped also records when it ended)."""

    @abc.abstractmethod
    def put_step(self, sandbox: str, step: int, command: str, started_ns: int) -> None:
        """Record a step as it starts."""

    @abc.abstractmethod
    def end_step(self, sandbox: str, step: int, ended_ns: int, exit_code: int) -> None:
        """Record how a step ended."""

    @abc.abstractmethod
    def add_events(self, rows: Sequence[EventRow]) -> None:
        """Append a batch of events in one transaction."""

    @abc.abstractmethod
    def add_alert(self, alert: dict[str, Any]) -> None:
        """Record an alert (Alert.to_dict()); idempotent on its id."""

    @abc.abstractmethod
    def add_evidence(self, sandbox: str, alert_id: str, path: str, bundle: str, at_ns: int) -> None:
        """Record an evidence bundle (its JSON text) taken for an alert."""

    @abc.abstractmethod
    def prune(self, *, max_age_s: float | None = None, max_bytes: int | None = None) -> int:
        """Delete the oldest events past an age or past a size; returns how many went.
        Alerts, steps and evidence are kept: they are small and they are the record."""

    # -- queries -----------------------------------------------------------------

    @abc.abstractmethod
    def sandboxes(self, *, state: str | None = None, episode: str | None = None) -> list[dict[str, Any]]:
        """Sandboxes, oldest first, each with its step count, alert count and worst severity."""

    @abc.abstractmethod
    def sandbox(self, name: str) -> dict[str, Any] | None:
        """One sandbox, or None."""

    @abc.abstractmethod
    def steps(self, sandbox: str) -> list[dict[str, Any]]:
        """A sandbox's steps in order."""

    @abc.abstractmethod
    def events(self, *, sandbox: str | None = None, kinds: Sequence[str] = (), after: int = 0,
               limit: int = 1000) -> list[dict[str, Any]]:
        """Events (the stored JSON plus seq and sandbox), oldest first, after `after`."""

    @abc.abstractmethod
    def alerts(self, *, sandbox: str | None = None, episode: str | None = None, since_ns: int | None = None,
               min_severity: str | None = None, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Alerts (Alert.to_dict() plus seq), oldest first: the `limit` after `after` when it is
        given (to follow), else the newest `limit`."""

    @abc.abstractmethod
    def evidence(self, sandbox: str) -> list[dict[str, Any]]:
        """A sandbox's evidence bundles (alert id, path, time, the bundle itself)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store; safe to call twice."""
