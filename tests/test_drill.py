"""The drill battery (`corral drill`), end to end, in both modes.

The battery runs once per test session through the real command line (`corral drill --json`),
in a lab of its own name (never the default `corral-lab`, which the demo's tests and people use);
the lab is always taken down, also when the run fails.  Then, per scenario:

- observe mode: detected, by an alert of the scenario's category (severity medium or more) naming
  its step, and it really happened (the lab's servers saw it);
- enforce mode: a scenario the default policy is expected to prevent left no trace in the lab's
  server logs; every other scenario was detected.

Nothing here is timed: the battery's own waits are bounds, and each row is judged by what the
alerts and the lab's logs say.  Known gaps of corral are xfails whose reason names the gap.
The catalogue checks (names, categories, addresses) need no root.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.cli import main
from corral.drills import battery
from corral.drills.lab import Lab, netns_exists
from corral.drills.scenarios import SCENARIOS, Scenario, select
from corral.errors import CorralError
from corral.rules.loader import CATEGORIES
from corral.sandbox.runner import STATE_DIR

LAB = "corral-drilltest"
CORRAL = str(Path(sys.executable).parent / "corral")
RUN_TIMEOUT_S = 600  # both modes take about 1.5 min here

needs_lab = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("bwrap") is None
    or not Path("/usr/sbin/sshd").exists() or shutil.which("ssh-keygen") is None,
    reason="needs root, iproute2, bubblewrap and OpenSSH")

#: every category of docs/threats.md (escape / privilege_escalation is one row there)
THREAT_CATEGORIES = {"cryptomining", "tunnel", "reverse_shell", "recon", "metadata", "credential_access",
                     "persistence", "escape", "privilege_escalation", "defense_evasion", "exfiltration",
                     "resource_abuse"}

#: (mode, scenario) -> (reason, strict): scenarios corral is known to miss, run as xfails that name
#: the gap.  None now.
KNOWN_GAPS: dict[tuple[str, str], tuple[str, bool]] = {}

BY_NAME = {s.name: s for s in SCENARIOS}
MEDIUM = battery.SEVERITIES.index("medium")


# -- the catalogue (no root) -------------------------------------------------------------------

def test_catalogue_covers_every_threat_category_with_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 25
    assert len(BY_NAME) == len(SCENARIOS), "scenario names must be unique"
    assert {s.category for s in SCENARIOS} >= THREAT_CATEGORIES
    for s in SCENARIOS:
        assert s.category in CATEGORIES, s
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]+", s.name), s.name
        assert s.summary and s.script
        assert not s.prevents or (s.evidence is not None and s.stopped_by), f"{s.name}: prevented means evidence"
        assert all(path.startswith(("/workspace/", "/home/agent/")) for path, _, _ in s.files), s.name
    tools = " ".join(s.script for s in SCENARIOS)
    for tool in ("ssh ", "autossh", "socat", "ncat", "nmap", "curl", "wget", "python3", " nc "):
        assert tool in tools, f"no scenario uses {tool.strip()}"
    stealthy = {s.name for s in SCENARIOS if s.stealth}
    assert {"miner-python-detached", "stratum-tls-443", "ssh-renamed-on-443", "python-slow-sweep",
            "dns-exfil", "xmrig-renamed-argv"} <= stealthy


def _addresses(text: str) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(m) for m in re.findall(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])", text)]


def test_scenarios_reach_only_the_lab() -> None:
    """Every address a scenario names is the lab's (documentation ranges, its private network, the
    metadata stubs) or loopback: nothing is ever aimed at a real host."""
    allowed = [ipaddress.IPv4Network(n) for n in ("198.51.100.0/24", "203.0.113.0/24", "10.20.0.0/24",
                                                    "169.254.169.254/32", "100.100.100.200/32", "127.0.0.0/8")]
    for s in SCENARIOS:
        text = " ".join([s.script, *s.allow, *(t for _, t, _ in s.files)])
        for address in _addresses(text):
            assert any(address in n for n in allowed), f"{s.name} names {address}"
        for name in re.findall(r"[a-z0-9.-]+\.(?:example|internal)\b", text):
            assert name.endswith((".example", "metadata.google.internal")), name


def test_select_by_glob_and_category() -> None:
    assert [s.name for s in select(["ssh-reverse-tunnel"])] == ["ssh-reverse-tunnel"]
    assert {s.category for s in select(["tunnel"])} == {"tunnel"}
    assert {s.name for s in select(["miner-*", "dns-exfil"])} >= {"miner-python-detached", "dns-exfil"}
    assert select([]) == list(SCENARIOS)
    with pytest.raises(CorralError, match="matches no scenario"):
        select(["no-such-*"])


def test_table_summary_and_json(tmp_path: Path) -> None:
    observe = battery.Report("observe", LAB, "2026-01-01T00:00:00+00:00", 1.5, [
        battery.Row("a", "tunnel", "observe", "x", step=1, detected=True, rule="R", severity="high", ttd_ms=12.0,
                    evidence="e", lab_saw=1, happened=True),
        battery.Row("b", "recon", "observe", "y", step=1, missed=True, reason="no recon alert"),
    ])
    enforce = battery.Report("enforce", LAB, "2026-01-01T00:00:00+00:00", 2.0, [
        battery.Row("a", "tunnel", "enforce", "x", step=1, evidence="e", lab_saw=0, happened=False, prevented=True,
                    must_prevent=True),
    ])
    table = battery.format_table(observe).splitlines()
    assert table[0].split()[:2] == ["SCENARIO", "CATEGORY"] and "PREVENTED" in table[0]
    assert "R (high, 12 ms)" in table[1] and "MISSED: no recon alert" in table[2]
    assert table[-1].startswith("corral drill, observe mode: 2 scenarios, 1 detected, 1 missed") and "FAIL" in table[-1]
    assert battery.format_table(enforce).splitlines()[1].split()[-2:] == ["yes", "nothing"]
    assert "1 prevented (of 1" in enforce.summary() and enforce.summary().endswith("PASS")
    battery.write_json([observe, enforce], tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["ok"] is False and [r["mode"] for r in data["runs"]] == ["observe", "enforce"]
    assert data["runs"][0]["rows"][1]["verdict"] == "MISSED" and data["runs"][1]["rows"][0]["verdict"] == "prevented"


def test_cli_lists_and_refuses_a_pattern_that_matches_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drill", "--list", "--only", "tunnel,dns-exfil"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in out} == {s.name for s in select(["tunnel", "dns-exfil"])}
    assert main(["drill", "--only", "nothing-like-this"]) == 2
    assert "matches no scenario" in capsys.readouterr().err
    assert main(["drill", "--json", "/nonexistent-dir/x.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- the battery, both modes ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`corral drill --json` in its own lab, both modes: {"rc", "stdout", "stderr", "runs": {mode: {name: row}}}."""
    out = tmp_path_factory.mktemp("drill") / "drill.json"
    proc = subprocess.Popen([CORRAL, "drill", "--lab", LAB, "--json", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        try:
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # as Ctrl-C: the drill removes what it made
            stdout, stderr = proc.communicate(timeout=60)
            pytest.fail(f"corral drill took over {RUN_TIMEOUT_S} s:\n{stdout}\n{stderr[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        Lab(LAB).down()  # whatever a failed run left
    print(stdout)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{stdout}\n{stderr[-3000:]}"
    data = json.loads(out.read_text())
    yield {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "ok": data["ok"],
           "runs": {run["mode"]: {row["scenario"]: row for row in run["rows"]} for run in data["runs"]}}


@needs_lab
def test_drill_runs_every_scenario_in_both_modes_and_leaves_nothing(drill: dict[str, Any]) -> None:
    assert set(drill["runs"]) == {"observe", "enforce"}
    for rows in drill["runs"].values():
        assert list(rows) == [s.name for s in SCENARIOS]
    assert drill["rc"] == (0 if drill["ok"] else 1), drill["stderr"][-3000:]
    summaries = [line for line in drill["stdout"].splitlines() if line.startswith("corral drill, ")]
    n = len(SCENARIOS)
    assert [s.split(",")[1].strip() for s in summaries] == [f"{mode} mode: {n} scenarios"
                                                             for mode in ("observe", "enforce")]
    progress = [line for line in drill["stderr"].splitlines() if line.startswith("corral: drill ")]
    assert len(progress) == 2 * len(SCENARIOS), drill["stderr"][-3000:]
    assert not netns_exists(LAB) and not netns_exists(f"{LAB}-world")
    assert not Lab(LAB).state_dir.exists()
    # the freezes' evidence bundles go with their sandboxes
    bundles = STATE_DIR.joinpath("evidence").glob("*/*/bundle.json")
    assert not [b for b in bundles if '"episode": "drill-' in b.read_text()]


def _params(mode: str) -> list[Any]:
    out = []
    for s in SCENARIOS:
        gap = KNOWN_GAPS.get((mode, s.name))
        marks = [pytest.mark.xfail(strict=gap[1], reason=gap[0])] if gap else []
        out.append(pytest.param(s.name, id=s.name, marks=marks))
    return out


def _explain(row: dict[str, Any]) -> str:
    return (f"{row['scenario']} ({row['mode']}): {row['verdict']}: {row['reason']}\n  alerts: {row['alerts']}\n"
            f"  output: {row['output']!r}")


@needs_lab
@pytest.mark.parametrize("name", _params("observe"))
def test_observe_detects_with_the_right_category(drill: dict[str, Any], name: str) -> None:
    scenario: Scenario = BY_NAME[name]
    row = drill["runs"]["observe"][name]
    assert not row["broken"], _explain(row)
    assert row["detected"] and row["category"] == scenario.category, _explain(row)
    assert battery.SEVERITIES.index(row["severity"]) >= MEDIUM, _explain(row)
    assert any(a["rule"] == row["rule"] and a["category"] == scenario.category
               for a in row["alerts"]), _explain(row)
    if scenario.evidence is not None:
        assert row["happened"], _explain(row)  # observe blocks nothing: the attack worked
    assert not row["missed"], _explain(row)


@needs_lab
@pytest.mark.parametrize("name", _params("enforce"))
def test_enforce_prevents_what_the_default_policy_prevents(drill: dict[str, Any], name: str) -> None:
    scenario = BY_NAME[name]
    row = drill["runs"]["enforce"][name]
    assert not row["broken"], _explain(row)
    if scenario.prevents:
        assert row["prevented"] is True and row["lab_saw"] == 0, _explain(row)
    else:
        assert row["detected"] and row["category"] == scenario.category, _explain(row)
    assert not row["missed"], _explain(row)
