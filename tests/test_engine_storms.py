"""Storm control in the engine: an alert-only rule raises at most FOLD_BURST alerts per sandbox
in a window, the rest are counted and reported, never lost; rules that act are never folded.

The events are real: a shell in a watched cgroup execs a marked /bin/echo again and again, and
the sensor's exec events are fed to an Engine with marker rules.  The window is shortened (a
module constant) so that a test need not wait ten seconds for one to end.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import run_in_cgroup

from corral import events as ev
from corral.detect import engine as engine_mod
from corral.detect.engine import FOLD_BURST, Engine
from corral.monitor import Monitor

RULES = """
- rule: Test storm marker
  desc: a command naming corral-test-storm; an alert and nothing more
  event: exec
  condition: proc.args contains corral-test-storm
  severity: low
  category: execution
  tags: [T1059]
  action: alert
  output: "storm marker: %proc.cmdline"
  examples:
    match: [{proc.args: "corral-test-storm"}]
    no_match: [{proc.args: "-c sleep"}]

- rule: Test acting storm marker
  desc: the same, with an action (what it does is not this test's concern)
  event: exec
  condition: proc.args contains corral-test-acting
  severity: high
  category: execution
  tags: [T1059]
  action: kill
  output: "acting marker: %proc.cmdline"
  examples:
    match: [{proc.args: "corral-test-acting"}]
    no_match: [{proc.args: "-c sleep"}]
"""

WINDOW_S = 0.5


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setattr(engine_mod, "FOLD_WINDOW_S", WINDOW_S)
    rules = tmp_path / "storm.yaml"
    rules.write_text(RULES)
    return Engine(rule_paths=[rules])


def storm(monitor: Monitor, marker: str, n: int) -> list[ev.Event]:
    """The exec events of `n` runs of `/bin/echo MARKER` in one fresh watched cgroup (one sandbox)."""
    run = run_in_cgroup(monitor, ["/bin/sh", "-c", f"for i in $(seq {n}); do /bin/echo {marker}; done"])
    assert run.returncode == 0, run.stderr
    marked = [e for e in run.of("exec") if isinstance(e, ev.ExecEvent) and marker in e.argv]
    assert len(marked) == n
    return marked


def test_a_storm_is_folded_and_its_count_reported(monitor: Monitor, engine: Engine) -> None:
    events = storm(monitor, "corral-test-storm", 20)
    alerts = [a for e in events for a in engine.process(e)]
    assert len(alerts) == FOLD_BURST and all(a.folded == 0 for a in alerts)
    assert engine.tick() == []  # the window is not over yet
    time.sleep(WINDOW_S)
    (report,) = engine.tick()
    # the last folded event stands for itself and carries the count of the other folded ones
    assert (report.rule, report.folded, report.pid) == ("Test storm marker", 20 - FOLD_BURST - 1, events[-1].pid)
    assert FOLD_BURST + 1 + report.folded == 20  # nothing lost


def test_rules_that_act_are_never_folded(monitor: Monitor, engine: Engine) -> None:
    events = storm(monitor, "corral-test-acting", 12)
    alerts = [a for e in events for a in engine.process(e)]
    assert len(alerts) == 12 and {a.rule for a in alerts} == {"Test acting storm marker"}


def test_each_sandbox_has_windows_of_its_own(monitor: Monitor, engine: Engine) -> None:
    first, second = storm(monitor, "corral-test-storm", 8), storm(monitor, "corral-test-storm", 8)
    assert first[0].sandbox_id != second[0].sandbox_id
    alerts = [a for e in first + second for a in engine.process(e)]
    assert [a.event.sandbox_id for a in alerts].count(first[0].sandbox_id) == FOLD_BURST
    assert len(alerts) == 2 * FOLD_BURST


def test_a_gone_sandbox_is_reported_and_forgotten(monitor: Monitor, engine: Engine) -> None:
    """What a sandbox folded is reported when it goes (the pipeline's remove_sandbox), and its
    windows are dropped; so are windows long over with nothing folded, so that a daemon that
    sees thousands of sandboxes come and go keeps no state for them.  (The fold table is
    private: its size is the bound under test.)"""
    gone, quiet = storm(monitor, "corral-test-storm", 9), storm(monitor, "corral-test-storm", 2)
    for e in gone + quiet:
        engine.process(e)
    (report,) = engine.flush_folds(sandbox_id=gone[0].sandbox_id)
    assert report.folded == 9 - FOLD_BURST - 1
    assert {key[1] for key in engine._fold} == {quiet[0].sandbox_id}
    time.sleep(WINDOW_S * 1.1)
    assert engine.tick() == [] and engine._fold == {}
    # a new alert after that opens a window as if none had been
    again = storm(monitor, "corral-test-storm", FOLD_BURST)
    assert len([a for e in again for a in engine.process(e)]) == FOLD_BURST
