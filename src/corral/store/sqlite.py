"""The embedded default store: one SQLite file in WAL mode.

WAL lets `corral alerts`, `corral report` and the console read while a sandbox
or `corral serve` writes.  synchronous=NORMAL: a committed transaction survives
a crash of corral (the WAL is in the kernel's page cache); only a power cut can
take the last commits, and the alert sinks (JSON lines, webhook queue) are
fsynced on their own.  One connection, shared by threads behind a lock: writes
are batched by the Recorder, so the lock is taken a few times a second.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from corral.detect.engine import SEVERITIES
from corral.store.base import STATES, EventRow, Store, StoreError

#: How long a write waits for another process's lock before giving up with an error (never a hang).
LOCK_WAIT_S = 5.0
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY, episode TEXT, policy TEXT, mode TEXT, state TEXT NOT NULL,
    created_ns INTEGER NOT NULL, ended_ns INTEGER, limits TEXT, owner_pid INTEGER);
CREATE INDEX IF NOT EXISTS sandboxes_episode ON sandboxes (episode);
CREATE TABLE IF NOT EXISTS steps (
    sandbox TEXT NOT NULL, step INTEGER NOT NULL, command TEXT, started_ns INTEGER,
    ended_ns INTEGER, exit_code INTEGER, PRIMARY KEY (sandbox, step));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, sandbox TEXT NOT NULL, step INTEGER, time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL, pid INTEGER, ppid INTEGER, comm TEXT, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_sandbox ON events (sandbox, seq);
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, sandbox TEXT, episode TEXT, step INTEGER,
    time_ns INTEGER NOT NULL, rule TEXT, severity TEXT, category TEXT, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_sandbox ON alerts (sandbox, seq);
CREATE INDEX IF NOT EXISTS alerts_episode ON alerts (episode, seq);
CREATE INDEX IF NOT EXISTS alerts_time ON alerts (time_ns);
CREATE TABLE IF NOT EXISTS evidence (
    seq INTEGER PRIMARY KEY, sandbox TEXT NOT NULL, alert_id TEXT, path TEXT, time_ns INTEGER,
    bundle TEXT);
CREATE INDEX IF NOT EXISTS evidence_sandbox ON evidence (sandbox);
"""


def ns_of(rfc3339: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time as events.rfc3339() writes it (µs precision)."""
    moment = datetime.datetime.fromisoformat(rfc3339)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


class SqliteStore(Store):
    """A Store in one SQLite file (see the module's docstring for the durability it gives)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=LOCK_WAIT_S, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the store {self.path}: {e}; pass --data DIR with a directory "
                             "you can write") from e
        self._db.row_factory = sqlite3.Row
        try:
            with self._errors("open"):
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(f"the store {self.path} was written by a newer corral (schema {version}, "
                                     f"this one knows {SCHEMA_VERSION}): upgrade corral or pass --data DIR")
                if version < SCHEMA_VERSION:
                    # Statement by statement: executescript() would commit the transaction half way.
                    with self._transaction() as db:
                        for statement in filter(str.strip, SCHEMA.split(";")):
                            db.execute(statement)
                        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    # -- plumbing ------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """sqlite3's errors as one line that says what to do."""
        try:
            yield
        except StoreError:
            raise
        except sqlite3.OperationalError as e:
            text = str(e)
            if "locked" in text or "busy" in text:
                raise StoreError(f"the store {self.path} is locked: another process has held it for over "
                                 f"{LOCK_WAIT_S:.0f} s ({doing}); stop it, or pass --data DIR for a store of "
                                 "your own") from e
            if "readonly" in text or "unable to open" in text:
                raise StoreError(f"cannot write the store {self.path} ({text}); pass --data DIR with a "
                                 "directory you can write") from e
            raise StoreError(f"the store {self.path} failed ({doing}): {text}") from e
        except OverflowError as e:  # an integer argument past SQLite's 64 bits (a time in the year 2300)
            raise StoreError(f"a value is out of range for the store ({doing}): {e}") from e
        except sqlite3.DatabaseError as e:
            raise StoreError(f"the store {self.path} is corrupt or not a corral database ({e}): move it "
                             "away (corral starts a new one) or pass --data DIR") from e

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so a busy store fails here, after
        # LOCK_WAIT_S, rather than half way through.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(doing), self._transaction() as db:
            yield db

    def _query(self, doing: str, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock, self._errors(doing):
            return self._db.execute(sql, args).fetchall()

    # -- writes --------------------------------------------------------------------

    def put_sandbox(self, name: str, *, episode: str | None, policy: str, mode: str, created_ns: int,
                    limits: dict[str, Any], owner_pid: int) -> None:
        with self._write("recording a sandbox") as db:
            db.execute("INSERT OR REPLACE INTO sandboxes (name, episode, policy, mode, state, created_ns, limits,"
                       " owner_pid) VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                       (name, episode, policy, mode, created_ns, json.dumps(limits), owner_pid))

    def set_state(self, name: str, state: str, at_ns: int) -> None:
        if state not in STATES:
            raise ValueError(f"unknown sandbox state {state!r} (one of {', '.join(STATES)})")
        with self._write("recording a sandbox's state") as db:
            db.execute("UPDATE sandboxes SET state = ?, ended_ns = CASE WHEN ? = 'stopped' THEN ? ELSE ended_ns END"
                       " WHERE name = ?", (state, state, at_ns, name))

    def put_step(self, sandbox: str, step: int, command: str, started_ns: int) -> None:
        with self._write("recording a step") as db:
            db.execute("INSERT OR REPLACE INTO steps (sandbox, step, command, started_ns) VALUES (?, ?, ?, ?)",
                       (sandbox, step, command, started_ns))

    def end_step(self, sandbox: str, step: int, ended_ns: int, exit_code: int) -> None:
        with self._write("recording a step's end") as db:
            db.execute("UPDATE steps SET ended_ns = ?, exit_code = ? WHERE sandbox = ? AND step = ?",
                       (ended_ns, exit_code, sandbox, step))

    def add_events(self, rows: Sequence[EventRow]) -> None:
        if not rows:
            return
        with self._write("recording events") as db:
            db.executemany("INSERT INTO events (sandbox, step, time_ns, kind, pid, ppid, comm, data)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def add_alert(self, alert: dict[str, Any]) -> None:
        with self._write("recording an alert") as db:
            db.execute("INSERT OR IGNORE INTO alerts (id, sandbox, episode, step, time_ns, rule, severity, category,"
                       " data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (alert["id"], alert.get("sandbox"), alert.get("episode"), alert.get("step"),
                        ns_of(alert["time"]), alert["rule"], alert["severity"], alert["category"],
                        json.dumps(alert)))

    def add_evidence(self, sandbox: str, alert_id: str, path: str, bundle: str, at_ns: int) -> None:
        with self._write("recording evidence") as db:
            db.execute("INSERT INTO evidence (sandbox, alert_id, path, time_ns, bundle) VALUES (?, ?, ?, ?, ?)",
                       (sandbox, alert_id, path, at_ns, bundle))

    def prune(self, *, max_age_s: float | None = None, max_bytes: int | None = None) -> int:
        removed = 0
        with self._write("pruning old events") as db:
            if max_age_s is not None:
                removed += self._prune_by_age(db, max_age_s)
            if max_bytes is not None:
                removed += self._prune_to_size(db, max_bytes)
        return removed

    @staticmethod
    def _prune_by_age(db: sqlite3.Connection, max_age_s: float) -> int:
        """Delete the events older than max_age_s before the newest one.

        Events are written in the order they happened, so seq follows time: the
        first young event is found by scanning from the oldest (what is scanned is
        what goes), and everything before it is deleted by its primary key.  This
        saves keeping a time index up to date on every insert."""
        newest = db.execute("SELECT time_ns FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        if newest is None:
            return 0
        cut = newest[0] - int(max_age_s * 1e9)
        first_kept = db.execute("SELECT seq FROM events WHERE time_ns >= ? ORDER BY seq LIMIT 1", (cut,)).fetchone()
        return db.execute("DELETE FROM events WHERE seq < ?", (first_kept[0],)).rowcount

    @staticmethod
    def _prune_to_size(db: sqlite3.Connection, max_bytes: int) -> int:
        """Delete the oldest events until the pages in use fit in max_bytes (the file keeps
        its size: freed pages are reused by the next writes)."""
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        used = (db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0])
        excess = used * page_size - max_bytes
        count = db.execute("SELECT count(*) FROM events").fetchone()[0]
        if excess <= 0 or count == 0:
            return 0
        # Events are most of the bytes; delete in proportion, and a little more so one pass does.
        per_event = used * page_size / count
        n = min(count, int(excess / per_event * 1.1) + 1)
        return db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                          (n,)).rowcount

    # -- queries -------------------------------------------------------------------

    def sandboxes(self, *, state: str | None = None, episode: str | None = None) -> list[dict[str, Any]]:
        where, args = _where(("state = ?", state), ("episode = ?", episode))
        rows = self._query("listing sandboxes",
                           f"SELECT s.*, (SELECT count(*) FROM steps WHERE steps.sandbox = s.name) AS steps "
                           f"FROM sandboxes s {where} ORDER BY created_ns", args)
        counts: dict[str, dict[str, int]] = {}
        for r in self._query("counting alerts", "SELECT sandbox, severity, count(*) AS n FROM alerts "
                                                "GROUP BY sandbox, severity"):
            counts.setdefault(r["sandbox"], {})[r["severity"]] = r["n"]
        return [_sandbox(r, counts.get(r["name"], {})) for r in rows]

    def sandbox(self, name: str) -> dict[str, Any] | None:
        rows = self._query("reading a sandbox", "SELECT s.*, (SELECT count(*) FROM steps WHERE steps.sandbox = "
                                                "s.name) AS steps FROM sandboxes s WHERE name = ?", (name,))
        if not rows:
            return None
        counts = {r["severity"]: r["n"] for r in self._query(
            "counting alerts", "SELECT severity, count(*) AS n FROM alerts WHERE sandbox = ? GROUP BY severity",
            (name,))}
        return _sandbox(rows[0], counts)

    def steps(self, sandbox: str) -> list[dict[str, Any]]:
        rows = self._query("reading steps", "SELECT * FROM steps WHERE sandbox = ? ORDER BY step", (sandbox,))
        return [dict(r) for r in rows]

    def events(self, *, sandbox: str | None = None, kinds: Sequence[str] = (), after: int = 0,
               limit: int = 1000) -> list[dict[str, Any]]:
        kind_sql = f"kind IN ({', '.join('?' * len(kinds))})" if kinds else None
        where, args = _where(("seq > ?", after), ("sandbox = ?", sandbox))
        if kind_sql:
            where += f" AND {kind_sql}"
            args.extend(kinds)
        rows = self._query("reading events", f"SELECT seq, sandbox, data FROM events {where} ORDER BY seq LIMIT ?",
                           [*args, limit])
        return [{"seq": r["seq"], "sandbox": r["sandbox"], **json.loads(r["data"])} for r in rows]

    def alerts(self, *, sandbox: str | None = None, episode: str | None = None, since_ns: int | None = None,
               min_severity: str | None = None, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        severities: list[str] = []
        if min_severity is not None:
            if min_severity not in SEVERITIES:
                raise StoreError(f"unknown severity {min_severity!r}: one of {', '.join(SEVERITIES)}")
            severities = list(SEVERITIES[SEVERITIES.index(min_severity):])
        where, args = _where(("seq > ?", after), ("sandbox = ?", sandbox), ("episode = ?", episode),
                             ("time_ns >= ?", since_ns))
        if severities:
            where += f" AND severity IN ({', '.join('?' * len(severities))})"
            args.extend(severities)
        # A follower (after > 0) pages forward through everything after its last seq; a first look
        # (after = 0) gets the newest `limit`.  Oldest first either way.
        newest_first = "DESC" if after == 0 else "ASC"
        rows = self._query("reading alerts", f"SELECT * FROM (SELECT seq, data FROM alerts {where} "
                                             f"ORDER BY seq {newest_first} LIMIT ?) ORDER BY seq", [*args, limit])
        return [{"seq": r["seq"], **json.loads(r["data"])} for r in rows]

    def evidence(self, sandbox: str) -> list[dict[str, Any]]:
        rows = self._query("reading evidence", "SELECT * FROM evidence WHERE sandbox = ? ORDER BY seq", (sandbox,))
        return [{"alert_id": r["alert_id"], "path": r["path"], "time_ns": r["time_ns"],
                 "bundle": json.loads(r["bundle"]) if r["bundle"] else None} for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _where(*clauses: tuple[str, Any]) -> tuple[str, list[Any]]:
    """WHERE over the clauses whose value is not None (seq > 0 is always there, so AND can follow)."""
    parts = [sql for sql, value in clauses if value is not None]
    args = [value for _, value in clauses if value is not None]
    return ("WHERE " + " AND ".join(parts)) if parts else "WHERE 1", args


def _sandbox(row: sqlite3.Row, counts: dict[str, int]) -> dict[str, Any]:
    out = dict(row)
    out["limits"] = json.loads(out["limits"]) if out.get("limits") else {}
    out["alerts"] = sum(counts.values())
    out["alerts_by_severity"] = counts
    present = [s for s in SEVERITIES if counts.get(s)]
    out["worst_severity"] = present[-1] if present else None
    return out
