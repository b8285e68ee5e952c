"""`corral alerts|events|ps|report`, read from a store that real sandboxes wrote.

One episode of two real sandboxes is recorded once for the module: an observe
one that reads a canary credential (critical alert, "would cut_network") and
runs a command holding <script> and a terminal escape, and an enforce one
whose step is frozen by a test rule (evidence bundle).  The commands touch no
network.  The queries are called through their own argparse, as `corral` will.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral import Monitor, Sandbox
from corral.console.queries import add_query_parsers, since_ns
from corral.errors import CorralError
from corral.sandbox.runner import STATE_DIR, SandboxFrozen
from corral.store import Recorder, SqliteStore, open_store

RULES = Path(__file__).parent / "rules" / "respond.yaml"
SCRIPT_CMD = "echo '<script>alert(1)</script>' # \x1b[2J"
#: How long a wait for the follower may take before the test fails (a bound, not a measurement).
WAIT_S = 20.0


@dataclass
class Recorded:
    data: Path
    episode: str
    observed: str  # the observe sandbox's name
    frozen: str  # the enforce sandbox's name


@pytest.fixture(scope="module")
def recorded() -> Iterator[Recorded]:
    data = Path(tempfile.mkdtemp(prefix="corral-queries-"))
    episode = f"ep-{secrets.token_hex(4)}"
    recorder = Recorder(open_store(data))
    made: list[str] = []
    try:
        # A monitor of this module's own, so its pipeline loads tests/rules/respond.yaml (the freeze marker).
        with Monitor() as monitor:
            # keep_events=0, as the daemon's sandboxes: none kept in memory, all in the store
            with Sandbox(monitor=monitor, rules=[RULES], mode="observe", recorder=recorder, episode=episode,
                         keep_events=0) as a:
                made.append(a.name)
                a.exec("echo hello > /workspace/notes.txt")
                a.exec("cat ~/.aws/credentials >/dev/null")
                a.exec(["sh", "-c", SCRIPT_CMD])
                a.flush_events()
                assert not a.events and a.alerts
            with Sandbox(monitor=monitor, rules=[RULES], recorder=recorder, episode=episode) as b:
                made.append(b.name)
                with pytest.raises(SandboxFrozen):
                    b.exec(["sh", "-c", "sleep 0.5", "corral-test-freeze"])
                b.flush_events()
                b.release()
        assert recorder.flush()
        yield Recorded(data, episode, *made)
    finally:
        recorder.close()
        shutil.rmtree(data, ignore_errors=True)
        for name in made:
            shutil.rmtree(STATE_DIR / "evidence" / name, ignore_errors=True)


def corral(*argv: str) -> str:
    """Run a query command as `corral ARGV...` would; its stdout."""
    parser = argparse.ArgumentParser(prog="corral")
    add_query_parsers(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    assert args.func(args, out) == 0
    return out.getvalue()


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


# -- alerts ------------------------------------------------------------------------------------

def test_alerts_table_names_the_rule_the_sandbox_and_what_was_done(recorded: Recorded) -> None:
    out = corral("alerts", "--data", str(recorded.data))
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "SEVERITY", "RULE", "SANDBOX", "STEP", "ACTION", "OUTPUT"]
    canary = next(line for line in lines if "Canary credential opened" in line)
    assert recorded.observed in canary and "critical" in canary and "would cut_network" in canary
    frozen = next(line for line in lines if "Test freeze marker" in line)
    assert recorded.frozen in frozen and " freeze " in frozen
    assert all(len(line) <= 120 for line in lines)
    assert "\x1b" not in out


def test_alerts_filters(recorded: Recorded) -> None:
    data = ("--data", str(recorded.data))
    critical = corral("alerts", "--severity", "critical", *data)
    assert "Canary credential opened" in critical and "Test freeze marker" not in critical  # high < critical
    high = corral("alerts", "--severity", "high", *data)
    assert "Canary credential opened" in high and "Test freeze marker" in high
    one = corral("alerts", "--sandbox", recorded.frozen[:-2], *data)  # a unique start of the name
    assert "Test freeze marker" in one and "Canary credential opened" not in one
    assert "SANDBOX" not in one.splitlines()[0]  # one sandbox: the column would say the same on every line
    assert corral("alerts", "--episode", recorded.episode, *data) == corral("alerts", *data)
    assert corral("alerts", "--episode", "no-such-episode", *data) == ""
    assert "Canary credential opened" in corral("alerts", "--since", "2000-01-01", *data)
    assert corral("alerts", "--since", "2200-01-01", *data) == ""


def test_alerts_json_is_what_was_stored(recorded: Recorded) -> None:
    rows = json_lines(corral("alerts", "--json", "--data", str(recorded.data)))
    with _store(recorded.data) as store:
        stored = store.alerts()
    assert [r["id"] for r in rows] == [a["id"] for a in stored]
    canary = next(r for r in rows if r["rule"] == "Canary credential opened")
    assert canary["sandbox"] == recorded.observed and canary["episode"] == recorded.episode
    assert canary["step"] == 2 and canary["action_taken"] == "would cut_network"


def test_since_accepts_durations_and_local_times() -> None:
    assert since_ns("1h30m") < since_ns("1h") < since_ns("90s") <= time.time_ns()
    assert since_ns("00:00") <= time.time_ns()  # a time of day: its latest occurrence, never the future
    assert since_ns("2024-05-01") == since_ns("2024-05-01T00:00")
    for bad in ("10x", "soon", "1h-"):
        with pytest.raises(argparse.ArgumentTypeError, match="neither a duration"):
            since_ns(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
        since_ns("2999-01-01")


def test_follow_prints_an_alert_recorded_after_it_started(recorded: Recorded, tmp_path: Path) -> None:
    # A store of its own, so the alerts added here do not show in other tests; it starts with a recorded one.
    with _store(recorded.data) as source, _store(tmp_path) as store:
        (canary,) = source.alerts(min_severity="critical")
        store.add_alert({k: v for k, v in canary.items() if k != "seq"})
    parser = argparse.ArgumentParser(prog="corral")
    add_query_parsers(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["alerts", "--follow", "--json", "--severity", "critical", "--data", str(tmp_path)])
    out, stop = _Output(), threading.Event()
    follower = threading.Thread(target=args.func, args=(args, out, stop))
    follower.start()
    try:
        first = _wait_for(out, lambda text: "Canary credential opened" in text)
        with _store(tmp_path) as store:
            new = {**json.loads(first.splitlines()[0]), "id": secrets.token_hex(16),
                   "time": "2030-01-01T00:00:00.000000Z", "rule": "Added while following"}
            new.pop("seq")
            store.add_alert(new)
            store.add_alert({**new, "id": secrets.token_hex(16), "severity": "low", "rule": "Too low to show"})
            store.add_alert({**new, "id": secrets.token_hex(16), "rule": "Added last"})
        text = _wait_for(out, lambda text: "Added last" in text)
    finally:
        stop.set()
        follower.join(WAIT_S)
    assert not follower.is_alive()
    rules = [row["rule"] for row in json_lines(text)]
    assert rules == ["Canary credential opened", "Added while following", "Added last"]


def test_ctrl_c_ends_follow_quietly(recorded: Recorded) -> None:
    code = ("import argparse, sys\nfrom corral.console.queries import add_query_parsers\n"
            "p = argparse.ArgumentParser(prog='corral')\nadd_query_parsers(p.add_subparsers(dest='cmd'))\n"
            "a = p.parse_args(sys.argv[1:])\nsys.exit(a.func(a))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "alerts", "--follow", "--json", "--data", str(recorded.data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and json.loads(proc.stdout.readline())["rule"]  # following by now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


# -- events --------------------------------------------------------------------------------------

def test_events_of_a_sandbox(recorded: Recorded) -> None:
    data = ("--data", str(recorded.data))
    table = corral("events", "--sandbox", recorded.observed, *data)
    assert table.splitlines()[0].split() == ["TIME", "STEP", "KIND", "PID", "COMM", "WHAT"]
    opened = next(line for line in table.splitlines() if " open " in line)
    assert "/home/agent/.aws/credentials" in opened
    execs = json_lines(corral("events", "--sandbox", recorded.observed, "--kind", "exec", "--json", *data))
    assert {e["kind"] for e in execs} == {"exec"} and {e["sandbox"] for e in execs} == {recorded.observed}
    assert any(e["argv"] == ["cat", "/home/agent/.aws/credentials"] and e["step_id"] == 2 for e in execs)
    with pytest.raises(CorralError, match="no sandbox 'sb-nope'"):
        corral("events", "--sandbox", "sb-nope", *data)
    with pytest.raises(CorralError, match="names 2 sandboxes"):
        corral("events", "--sandbox", "sb-", *data)


# -- ps ------------------------------------------------------------------------------------------

def test_ps_lists_recent_sandboxes(recorded: Recorded) -> None:
    out = corral("ps", "--data", str(recorded.data))
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "EPISODE", "STATE", "MODE", "CREATED", "RAN", "STEPS", "ALERTS", "WORST"]
    observed = next(line.split() for line in lines if line.startswith(recorded.observed))
    assert observed[1:4] == [recorded.episode, "stopped", "observe"] and observed[-3:] == ["3", "2", "critical"]
    frozen = next(line.split() for line in lines if line.startswith(recorded.frozen))
    assert frozen[2:4] == ["stopped", "enforce"] and frozen[-3:] == ["1", "1", "high"]
    rows = json.loads(corral("ps", "--all", "--json", "--data", str(recorded.data)))
    assert {r["name"] for r in rows} == {recorded.observed, recorded.frozen}
    assert all(r["recorded_state"] == "stopped" and r["created"].endswith("Z") for r in rows)


def test_ps_shows_a_sandbox_whose_owner_died_as_lost(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    with _store(tmp_path) as store:
        now = time.time_ns()
        for name, owner in (("sb-orphan", dead.pid), ("sb-owned", 1)):
            store.put_sandbox(name, episode=None, policy="default", mode="enforce", created_ns=now, limits={},
                              owner_pid=owner)
        # made ten days ago by a pid that this test process has now: a newer process, not its owner
        store.put_sandbox("sb-reused", episode=None, policy="default", mode="enforce", created_ns=now - 864 * 10**12,
                          limits={}, owner_pid=os.getpid())
        store.put_sandbox("sb-old", episode=None, policy="default", mode="enforce", created_ns=now - 10**13,
                          limits={}, owner_pid=dead.pid)
        store.set_state("sb-old", "stopped", now - 9 * 10**12)  # hours ago
    states = {line.split()[0]: line.split()[2] for line in corral("ps", "--data", str(tmp_path)).splitlines()[1:]}
    assert states == {"sb-orphan": "lost", "sb-owned": "running", "sb-reused": "lost"}  # sb-old: too long ago
    rows = {r["name"]: r for r in json.loads(corral("ps", "--all", "--json", "--data", str(tmp_path)))}
    assert rows["sb-orphan"]["state"] == "lost" and rows["sb-orphan"]["recorded_state"] == "running"
    assert rows["sb-old"]["state"] == "stopped"


def test_queries_of_an_empty_data_dir(tmp_path: Path) -> None:
    assert corral("ps", "--data", str(tmp_path)) == ""
    assert corral("alerts", "--data", str(tmp_path)) == ""
    with pytest.raises(CorralError, match="nothing is recorded"):
        corral("report", "ep-x", "--data", str(tmp_path))
    assert not list(tmp_path.iterdir())  # a query makes no store


# -- report --------------------------------------------------------------------------------------

def test_markdown_report_tells_the_episode_in_order(recorded: Recorded) -> None:
    md = corral("report", recorded.episode, "--data", str(recorded.data))
    assert md.startswith(f"# Incident report: episode {recorded.episode}\n")
    summary = md[md.index("## Summary"):md.index("## What happened")]
    assert "**Verdict: CRITICAL.** 3 alerts (1 critical, 2 high) in credential_access, execution" in summary
    assert recorded.observed in summary and recorded.frozen in summary
    _in_order(md[md.index("## What happened"):], "#### Step 1", "echo hello > /workspace/notes.txt", "#### Step 2",
              "cat ~/.aws/credentials", "`cat /home/agent/.aws/credentials`", "Credential file named in a command",
              "Canary credential opened", "would cut_network", "#### Step 3", f"### Sandbox `{recorded.frozen}`",
              "frozen by a rule", "Test freeze marker", "#### Evidence", "## What was done")
    assert "exit 0 after" in md  # steps 1 and 2 ended normally
    assert "frozen by a rule, then killed (exit 137 after" in md  # the frozen step, killed when its sandbox closed
    evidence = md[md.index("#### Evidence"):md.index("## What was done")]
    assert "bundle.json" in evidence and "corral-test-freeze" in evidence
    done = md[md.index("## What was done"):]
    assert "freeze (frozen; evidence in" in done and "would cut_network" in done
    assert "\\x1b[2J" in md and "\x1b" not in md  # an agent's escape sequence must not reach the terminal


def test_html_report_is_self_contained_and_escaped(recorded: Recorded, tmp_path: Path) -> None:
    out = tmp_path / "incident.html"
    assert corral("report", recorded.observed, "--out", str(out), "--data", str(recorded.data)) == ""
    page = out.read_text()  # HTML, from the file's extension
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page and " src=" not in page and "<link" not in page
    assert "Canary credential opened" in page and recorded.frozen not in page  # the one sandbox asked for


def test_json_report(recorded: Recorded) -> None:
    report = json.loads(corral("report", recorded.episode, "--format", "json", "--data", str(recorded.data)))
    assert report["subject"] == "episode" and report["id"] == recorded.episode
    s = report["summary"]
    assert s["worst_severity"] == "critical" and s["alerts"] == 3 and s["steps"] == 4
    assert s["categories"] == ["credential_access", "execution"]
    assert s["risk"] == 0.975  # distinct rules: one critical (0.9), two high (0.5 each)
    assert [(a["rule"], a["taken"]) for a in s["actions"]] == [("Canary credential opened", "would cut_network"),
                                                                 ("Test freeze marker", "freeze")]
    observed, frozen = report["sandboxes"]
    assert [st["command"] for st in observed["steps"]][1] == "cat ~/.aws/credentials >/dev/null"
    assert [[a["rule"] for a in st["alerts"]] for st in observed["steps"]] == [
        [], ["Credential file named in a command", "Canary credential opened"], []]
    cat = observed["steps"][1]["processes"][0]["children"][0]
    assert cat["cmdline"] == "cat /home/agent/.aws/credentials" and cat["exit"]["code"] == 0
    (bundle,) = frozen["evidence"]
    assert bundle["rule"] == "Test freeze marker" and bundle["path"].endswith("bundle.json")
    assert any("corral-test-freeze" in p["cmdline"] for p in bundle["processes"])
    by_name = json.loads(corral("report", recorded.frozen, "--format", "json", "--data", str(recorded.data)))
    assert by_name["subject"] == "sandbox" and [sb["name"] for sb in by_name["sandboxes"]] == [recorded.frozen]


def test_report_of_nothing(recorded: Recorded) -> None:
    with pytest.raises(CorralError, match="no episode or sandbox 'ep-none'"):
        corral("report", "ep-none", "--data", str(recorded.data))


# -- helpers -------------------------------------------------------------------------------------

class _Output(io.StringIO):
    """What a follower thread writes, readable from the test's thread."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return super().write(text)

    def text(self) -> str:
        with self._lock:
            return self.getvalue()


def _wait_for(out: _Output, done: Callable[[str], bool]) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        text = out.text()
        if done(text):
            return text
        time.sleep(0.05)
    raise AssertionError(f"the follower did not print it within {WAIT_S} s; it printed: {out.text()!r}")


def _in_order(text: str, *parts: str) -> None:
    at = 0
    for part in parts:
        found = text.find(part, at)
        assert found >= 0, f"{part!r} not found after {text[max(at - 200, 0):at]!r}"
        at = found + len(part)


@contextlib.contextmanager
def _store(data: Path) -> Iterator[SqliteStore]:
    store = open_store(data)
    try:
        yield store
    finally:
        store.close()
