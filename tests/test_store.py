"""The store: what is written comes back, survives a crash of its writer, and a bad or busy
database is a clear error, not a hang.  Real SQLite files, real processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corral import events as ev
from corral.store import EventRow, Recorder, SqliteStore, StoreError, open_store
from corral.store import sqlite as sqlite_mod


def _alert(n: int, *, sandbox: str = "sb-1", severity: str = "high", episode: str = "ep") -> dict[str, object]:
    return {"id": f"a{n}", "time": f"2026-11-27T10:00:{n:02d}.000001Z", "rule": f"rule {n}", "severity": severity,
            "category": "tunnel", "sandbox": sandbox, "episode": episode, "step": n, "output": "x", "pid": 10 + n}


def _rows(n: int, *, sandbox: str = "sb-1", start_ns: int = 1_000_000_000) -> list[EventRow]:
    return [EventRow(sandbox, 1, start_ns + i, "exec", 100 + i, 1, "sh", json.dumps({"kind": "exec", "i": i}))
            for i in range(n)]


def test_records_come_back_with_filters(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.put_sandbox("sb-1", episode="ep", policy="default", mode="enforce", created_ns=1, limits={"pids": 64},
                      owner_pid=os.getpid())
    store.put_step("sb-1", 1, "make", 10)
    store.end_step("sb-1", 1, 20, 2)
    store.add_alert(_alert(1, severity="low"))
    store.add_alert(_alert(2, severity="critical"))
    store.add_alert(_alert(2, severity="critical"))  # the same alert twice is kept once
    store.add_events(_rows(3))
    store.set_state("sb-1", "frozen", 30)

    [sb] = store.sandboxes()
    assert (sb["state"], sb["alerts"], sb["worst_severity"], sb["limits"]) == ("frozen", 2, "critical", {"pids": 64})
    assert store.steps("sb-1") == [{"sandbox": "sb-1", "step": 1, "command": "make", "started_ns": 10,
                                    "ended_ns": 20, "exit_code": 2}]
    assert [a["rule"] for a in store.alerts(min_severity="medium")] == ["rule 2"]
    assert [a["rule"] for a in store.alerts(sandbox="nope")] == []
    first = store.alerts()
    assert [a["rule"] for a in store.alerts(after=first[0]["seq"])] == ["rule 2"]
    events = store.events(sandbox="sb-1", kinds=["exec"])
    assert [e["i"] for e in events] == [0, 1, 2]
    assert [e["i"] for e in store.events(after=events[0]["seq"], limit=1)] == [1]
    store.set_state("sb-1", "stopped", 40)
    assert store.sandbox("sb-1")["ended_ns"] == 40  # type: ignore[index]
    with pytest.raises(StoreError, match="unknown severity 'urgent'"):
        store.alerts(min_severity="urgent")
    store.close()


def test_prune_by_age_and_by_size(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    second = 1_000_000_000
    store.add_events(_rows(100, start_ns=0))  # 100 events in the first microsecond
    store.add_events(_rows(100, start_ns=3600 * second))  # and 100 an hour later
    store.add_alert(_alert(1))
    assert store.prune(max_age_s=60) == 100
    assert len(store.events(limit=1000)) == 100
    assert len(store.alerts()) == 1  # alerts are the record: never pruned

    store.add_events([EventRow("sb-1", 1, 3600 * second + i, "open", 1, 1, "x",
                               json.dumps({"pad": "x" * 2000})) for i in range(2000)])
    size = lambda: os.path.getsize(tmp_path / "corral.db")  # noqa: E731
    assert size() > 4_000_000
    removed = store.prune(max_bytes=1_000_000)
    assert removed > 1000
    left = store.events(limit=10_000)
    assert left and left[0]["seq"] > 200  # the oldest went first
    with sqlite3.connect(tmp_path / "corral.db") as db:
        used = (db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0])
        assert used * db.execute("PRAGMA page_size").fetchone()[0] <= 1_000_000
    store.close()


def test_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "corral.db").write_bytes(b"this is not a database, it is a note\n" * 200)
    with pytest.raises(StoreError, match=r"corrupt or not a corral database .* move it away"):
        open_store(tmp_path)


def test_locked_database_is_an_error_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    open_store(tmp_path).close()
    # Another process takes the write lock and keeps it.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys, time
        db = sqlite3.connect({str(tmp_path / 'corral.db')!r}, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(sqlite_mod, "LOCK_WAIT_S", 0.3)
        with pytest.raises(StoreError, match="is locked: another process has held it"):
            store = SqliteStore(tmp_path / "corral.db")
            store.add_alert(_alert(1))
    finally:
        holder.kill()
        holder.wait()


def test_unwritable_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match=r"cannot make the data directory .* pass --data DIR"):
        open_store(tmp_path / "file" / "data")


def test_recorder_batches_and_flushes(tmp_path: Path) -> None:
    recorder = Recorder(open_store(tmp_path))
    recorder.sandbox_started("sb-9", episode=None, policy="default", mode="observe", limits={})
    for i in range(20_000):
        recorder.event("sb-9", ev.DerivedEvent.make("scan", sandbox_id=9, step_id=1, pid=i, ports=i))
    recorder.alert(_alert(1, sandbox="sb-9"))
    assert recorder.flush()
    reader = open_store(tmp_path)
    assert len(reader.events(sandbox="sb-9", limit=100_000)) == 20_000
    assert reader.events(sandbox="sb-9", limit=1)[0]["ports"] == 0
    assert [a["id"] for a in reader.alerts(sandbox="sb-9")] == ["a1"]
    recorder.close()
    reader.close()


def test_an_alert_survives_a_crash_of_its_writer(tmp_path: Path) -> None:
    """What the recorder has committed is there after SIGKILL of the process that wrote it."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from corral.store import Recorder, open_store
        recorder = Recorder(open_store({str(tmp_path)!r}))
        recorder.alert({json.dumps(_alert(7))})
        assert recorder.flush()
        print("committed", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "committed"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    store = open_store(tmp_path)
    assert [a["rule"] for a in store.alerts()] == ["rule 7"]
    store.close()


def test_a_busy_store_delays_but_loses_nothing(tmp_path: Path) -> None:
    """A write that meets another process's lock is retried until it goes in."""
    store = open_store(tmp_path)
    lines: list[str] = []
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys, time
        db = sqlite3.connect({str(tmp_path / 'corral.db')!r}, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        sys.stdin.readline()
        db.execute("COMMIT")
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        original = sqlite_mod.LOCK_WAIT_S
        sqlite_mod.LOCK_WAIT_S = 0.2
        try:
            recorder = Recorder(SqliteStore(tmp_path / "corral.db"), warn=lines.append)
        except StoreError:
            pytest.fail("opening needs no write lock once the schema exists")
        finally:
            sqlite_mod.LOCK_WAIT_S = original
        recorder.alert(_alert(3))
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lines and "is locked" in lines[0] and "retrying" in lines[0]
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert recorder.flush()
        assert [a["id"] for a in store.alerts()] == ["a3"]
        recorder.close()
    finally:
        holder.kill()
        holder.wait()
        store.close()
