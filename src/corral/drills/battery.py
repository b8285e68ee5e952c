"""The drill battery: every scenario of corral.drills.scenarios run in the lab, judged, tabulated.

    with Lab("corral-lab") as lab:
        report = run_battery(lab, "observe", select(["tunnel"]))
    print(format_table(report))

Each scenario runs as one step of a sandbox of its own (``Sandbox("default", mode=..., netns=lab.client)``,
plus the scenario's allow entries and limits): a sandbox costs tens of milliseconds, and one per
scenario keeps a network cut or a freeze by one scenario's alert from deciding the next one's fate.
The lab stays up across scenarios; its server logs are read from where they ended before each
scenario, after its sandbox (and so everything the attack started) is gone.

Per scenario the battery records the first alert of the scenario's category at severity medium or
more that names its step (rule, severity, what the responder did), the time to detect (the alert's
time minus the step's start; also minus the triggering event's kernel time), what the lab's
servers saw, and the verdict (see corral.drills.scenarios for the rules).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.detect.engine import SEVERITIES, Alert
from corral.drills import lab as lab_mod
from corral.drills.lab import Lab
from corral.drills.scenarios import RELAY_KEY, Record, Scenario
from corral.errors import CorralError

if TYPE_CHECKING:
    from corral.sandbox.runner import Sandbox

MODES = ("observe", "enforce")
MIN_SEVERITY = "medium"
POLL_S = 0.05
#: after the sandbox is gone, for a server thread to finish writing what it received
LOG_GRACE_S = 0.1
#: how long to wait for data that a sandbox's sockets still held when it closed to leave (TCP
#: retransmits with backoff: 0.2, 0.4, 0.8, 1.6, 3.2 s...)
LEFTOVER_WAIT_S = 6.0
#: enforce mode, a scenario to be prevented: how long to wait for its alert (only reported) after its settle time
PREVENTED_WAIT_S = 1.0
Progress = Callable[[str], None]


@dataclass
class Row:
    """One scenario's outcome in one mode."""

    scenario: str
    category: str
    mode: str
    summary: str
    step: int | None = None
    exit_code: int | None = None
    seconds: float = 0.0
    frozen: bool = False
    detected: bool = False
    rule: str | None = None
    severity: str | None = None
    event_kind: str | None = None
    action: str | None = None
    #: the alert's time minus the step's start, and minus the triggering event's kernel time
    ttd_ms: float | None = None
    latency_ms: float | None = None
    #: every alert naming the step: severity, category, rule, action taken
    alerts: list[dict[str, Any]] = field(default_factory=list)
    evidence: str | None = None  # what would prove it happened (None: nothing in the lab would)
    lab_saw: int | None = None  # how many such records the lab's logs got
    happened: bool | None = None
    must_prevent: bool = False
    stopped_by: str = ""
    prevented: bool | None = None  # enforce mode, where evidence is defined
    missed: bool = False
    broken: bool = False
    reason: str = ""  # why missed or broken
    #: sockets of the sandbox that outlived it holding data for a lab host ("198.51.100.20:443 76 bytes")
    leftover: list[str] = field(default_factory=list)
    output: str = ""  # the step's stdout and stderr, shortened

    @property
    def ok(self) -> bool:
        return not (self.missed or self.broken)

    @property
    def verdict(self) -> str:
        if self.broken:
            return "BROKEN"
        if self.missed:
            return "MISSED"
        if self.mode == "observe":
            return "detected"
        if self.prevented and self.detected:
            return "prevented+detected"
        return "prevented" if self.prevented else "detected"


@dataclass
class Report:
    mode: str
    lab: str
    started: str
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)

    @property
    def missed(self) -> int:
        return sum(r.missed for r in self.rows)

    @property
    def broken(self) -> int:
        return sum(r.broken for r in self.rows)

    @property
    def ok(self) -> bool:
        return not (self.missed or self.broken)

    def summary(self) -> str:
        n = len(self.rows)
        parts = [f"{sum(r.detected for r in self.rows)} detected"]
        if self.mode == "enforce":
            parts.append(f"{sum(bool(r.prevented) for r in self.rows)} prevented "
                         f"(of {sum(r.must_prevent for r in self.rows)} the default policy must prevent)")
        parts.append(f"{self.missed} missed")
        if self.broken:
            parts.append(f"{self.broken} broken (did not happen or could not run)")
        return (f"corral drill, {self.mode} mode: {n} scenario{'s' if n != 1 else ''}, {', '.join(parts)} "
                f"in {self.seconds:.1f} s: {'PASS' if self.ok else 'FAIL'}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "lab": self.lab, "started": self.started, "seconds": round(self.seconds, 2),
                "scenarios": len(self.rows), "detected": sum(r.detected for r in self.rows),
                "prevented": sum(bool(r.prevented) for r in self.rows), "missed": self.missed,
                "broken": self.broken, "ok": self.ok, "summary": self.summary(),
                "rows": [{**asdict(r), "verdict": r.verdict} for r in self.rows]}


# -- the lab's logs --------------------------------------------------------------------------------

class LabLogs:
    """The lab's access logs, read from a mark on: what the servers saw since."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def _paths(self) -> list[Path]:
        return [*sorted(self.lab.log_dir.glob("*.jsonl")), self.lab.sshd_dir / "sshd.log"]

    def mark(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in self._paths() if p.exists()}

    def since(self, mark: dict[Path, int]) -> list[Record]:
        records: list[Record] = []
        for path in self._paths():
            try:
                with path.open("rb") as f:
                    f.seek(mark.get(path, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            if path.suffix == ".log":
                records += lab_mod.sshd_records(text)
                continue
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records


# -- running ------------------------------------------------------------------------------------------

def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


def _matching(alerts: Sequence[Alert], step: int, category: str) -> list[Alert]:
    return [a for a in alerts if a.step == step and a.category == category
            and _rank(a.severity) >= _rank(MIN_SEVERITY)]


class Battery:
    """Runs scenarios one after another in one lab and mode."""

    def __init__(self, lab: Lab, mode: str, *, relay_key: str | None = None,
                 progress: Progress | None = None) -> None:
        if mode not in MODES:
            raise CorralError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.lab = lab
        self.mode = mode
        self.relay_key = relay_key
        self.logs = LabLogs(lab)
        self.progress = progress or (lambda _: None)

    def run(self, scenarios: Sequence[Scenario]) -> Report:
        started = time.monotonic()
        report = Report(self.mode, self.lab.name,
                        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        # Observe mode blocks nothing: prove the lab has no route out before anything runs.
        self.lab.check_no_route_out()
        for i, scenario in enumerate(scenarios, 1):
            row = self.run_one(scenario)
            report.rows.append(row)
            self.progress(f"drill {self.mode} [{i}/{len(scenarios)}] {_progress_line(row)}")
        report.seconds = time.monotonic() - started
        return report

    def run_one(self, sc: Scenario) -> Row:
        from corral.sandbox.runner import STATE_DIR, Sandbox, SandboxFrozen

        row = Row(sc.name, sc.category, self.mode, sc.summary, must_prevent=sc.prevents and self.mode == "enforce",
                  stopped_by=sc.stopped_by, evidence=sc.evidence.description if sc.evidence else None)
        missing = [t for t in sc.tools if shutil.which(t) is None]
        if missing:
            row.broken, row.reason = True, f"needs {', '.join(missing)} (make setup installs it)"
            return row
        if sc.relay_key and self.relay_key is None:
            row.broken, row.reason = True, "needs the relay key (run it through run_drill)"
            return row
        mark = self.logs.mark()
        t0 = time.monotonic()
        evidence_dir: Path | None = None
        try:
            with Sandbox("default", mode=self.mode, netns=self.lab.client, allow=sc.allow, pids=sc.pids,
                         memory=sc.memory, episode=f"drill-{sc.name}") as sb:
                evidence_dir = STATE_DIR / "evidence" / sb.name
                for path, text, mode in sc.files:
                    sb.put_file(path, text, mode)
                if sc.relay_key and self.relay_key is not None:
                    sb.put_file(RELAY_KEY, self.relay_key, 0o600)
                start_ns = time.time_ns()
                step_start = time.monotonic()
                try:
                    result = sb.exec(sc.script, timeout=sc.timeout)
                    row.step, row.exit_code = result.step, result.exit_code
                    row.output = (result.stdout + result.stderr).strip()[-300:]
                except SandboxFrozen:
                    row.step, row.frozen = 1, True
                self._wait(sb, sc, row.step or 1, step_start, mark)
                step = row.step or 1
                row.frozen = row.frozen or sb.frozen
                if sb.frozen:
                    sb.release()  # so that close() ends its processes at once
                alerts = list(sb.alerts)
        except (CorralError, OSError) as exc:
            row.broken, row.reason = True, f"could not run: {exc}"
            row.seconds = time.monotonic() - t0
            return row
        finally:
            # A freeze's evidence bundle (the drill's verdict is the row; nothing of the drill stays behind)
            if evidence_dir is not None:
                shutil.rmtree(evidence_dir, ignore_errors=True)
        closed_ns = time.time_ns()
        row.leftover = self._leftover_sockets()
        time.sleep(LOG_GRACE_S)
        self._judge(sc, row, alerts, step, start_ns, self.logs.since(mark), closed_ns)
        row.seconds = time.monotonic() - t0
        return row

    def _leftover_sockets(self) -> list[str]:
        """TCP sockets the closed sandbox left in the lab's namespace still holding data for a lab
        host: waited for (bounded) until the data has left, as it will once the sandbox's egress
        entries are gone.  Those still holding data after LEFTOVER_WAIT_S are named, then destroyed
        (so that their data cannot land in the next scenario's logs)."""
        deadline = time.monotonic() + LEFTOVER_WAIT_S
        seen: dict[str, int] = {}
        while True:
            queued = _queued_sockets(self.lab.client)
            for peer, _, size in queued:
                seen[peer] = max(seen.get(peer, 0), size)
            if not queued or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for peer, local, _ in queued:
            _destroy_socket(self.lab.client, local, peer)
        still = {peer for peer, _, _ in queued}
        return [f"{peer} {size} bytes{' (still queued: destroyed by the drill)' if peer in still else ''}"
                for peer, size in seen.items()]

    def _wait(self, sb: Sandbox, sc: Scenario, step: int, step_start: float, mark: dict[Path, int]) -> None:
        """Until the step's alert has come and (where the scenario has evidence) the lab saw it, or
        (enforce) long enough has passed to believe it never will; bounded by the scenario's wait.
        A scenario that enforce mode must only prevent waits for its alert (to report it) at most
        PREVENTED_WAIT_S after its settle time."""
        deadline = time.monotonic() + sc.wait
        settled_at = step_start + sc.settle
        if self.mode == "enforce" and sc.prevents:
            deadline = min(deadline, max(time.monotonic(), settled_at) + PREVENTED_WAIT_S)
        while True:
            sb.flush_events()
            now = time.monotonic()
            detected = bool(_matching(sb.alerts, step, sc.category))
            # evidence not (yet) seen is believed absent only in enforce mode, after the settle time
            evidence_done = (sc.evidence is None or self.mode == "enforce"
                             or sc.evidence.count(self.logs.since(mark)) >= sc.evidence.at_least)
            if now >= settled_at and ((detected and evidence_done) or now >= deadline):
                return
            time.sleep(POLL_S)

    def _judge(self, sc: Scenario, row: Row, alerts: list[Alert], step: int, start_ns: int,
               records: list[Record], closed_ns: int) -> None:
        mine = [a for a in alerts if a.step == step]
        row.alerts = [{"severity": a.severity, "category": a.category, "rule": a.rule, "event": a.event.kind,
                       "action_taken": a.action_taken, "ms": round((a.time_ns - start_ns) / 1e6, 1)}
                      for a in sorted(mine, key=lambda a: a.time_ns)]
        hits = sorted(_matching(mine, step, sc.category), key=lambda a: a.time_ns)
        if hits:
            first = hits[0]
            row.detected = True
            row.rule, row.severity, row.event_kind = first.rule, first.severity, first.event.kind
            row.action = first.action_taken
            row.ttd_ms = round(max(0, first.time_ns - start_ns) / 1e6, 1)
            row.latency_ms = round(max(0, first.time_ns - first.event.time_ns) / 1e6, 1)
        late = ""
        if sc.evidence is not None:
            row.lab_saw = sc.evidence.count(records)
            row.happened = row.lab_saw >= sc.evidence.at_least
            closed = _rfc3339(closed_ns)
            after = sum(1 for r in records if r.get("server") == sc.evidence.server and sc.evidence.test(r)
                        and str(r.get("time", "")) > closed)
            if row.happened and after:
                late = (", after the sandbox had closed" if after == row.lab_saw
                        else f", {after} of them after the sandbox had closed")
            pending = [x for x in row.leftover if "still queued" in x]
            if self.mode == "enforce" and pending and not row.happened:
                row.happened = True  # its data was on its way out, and would have arrived
            if self.mode == "enforce":
                row.prevented = not row.happened
        others = sorted({a["category"] for a in row.alerts if _rank(a["severity"]) >= _rank(MIN_SEVERITY)}
                        - {sc.category})
        elsewhere = f" (alerts in {', '.join(others)} only)" if others else ""
        if self.mode == "observe":
            if sc.evidence is not None and not row.happened:
                row.broken = True
                row.reason = (f"did not happen: not in the lab's logs: {sc.evidence.description} "
                              f"(the step's exit status: {row.exit_code})")
            if not row.detected:
                row.missed = True
                reason = f"no {sc.category} alert >= {MIN_SEVERITY} for step {step}{elsewhere}"
                row.reason = f"{reason}; {row.reason}" if row.reason else reason
        elif sc.prevents:
            if row.happened:
                row.missed = True
                what = sc.evidence.description if sc.evidence else ""
                if row.lab_saw:
                    records_seen = f"{row.lab_saw} record{'s' if row.lab_saw != 1 else ''}"
                    saw = f"the lab saw {what} ({records_seen}{late})"
                else:
                    saw = "data for the lab was still queued in a socket that outlived the sandbox"
                row.reason = f"not prevented: {saw}{'' if row.detected else ', and it was not detected'}"
                if row.leftover:
                    row.reason += f"; sockets that outlived the sandbox held: {', '.join(row.leftover)}"
        elif not row.detected:
            row.missed = True
            row.reason = f"no {sc.category} alert >= {MIN_SEVERITY} for step {step}{elsewhere}"


def _rfc3339(wall_ns: int) -> str:
    """As the lab's servers write times (so that the two compare as strings)."""
    return datetime.datetime.fromtimestamp(wall_ns / 1e9, datetime.UTC).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


def _ss(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    # nsenter --net, not `ip netns exec`: that remounts /sys, where ss then finds no cgroup2 mount
    return subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "ss", *args], capture_output=True, text=True,
                          timeout=10)


def _queued_sockets(netns: str) -> list[tuple[str, str, int]]:
    """(peer, local, bytes) of TCP sockets in netns with data not yet acknowledged by a non-loopback
    peer (a lone FIN counts 1: more is data)."""
    out = []
    for line in _ss(netns, "-t", "-n", "-H", "-a").stdout.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] in ("LISTEN", "TIME-WAIT") or not fields[2].isdigit():
            continue
        local, peer = fields[3], fields[4]
        if int(fields[2]) > 1 and not peer.startswith(("127.", "[::1]", "[::ffff:127.")):
            out.append((peer, local, int(fields[2])))
    return out


def _destroy_socket(netns: str, local: str, peer: str) -> None:
    laddr, lport = local.rsplit(":", 1)
    paddr, pport = peer.rsplit(":", 1)
    _ss(netns, "-K", "-t", "-n", "src", laddr, "sport", "=", f":{lport}", "dst", paddr, "dport", "=", f":{pport}")


def _progress_line(row: Row) -> str:
    what = row.verdict
    if row.detected:
        what += f" by {row.rule!r} in {row.ttd_ms:.0f} ms"
    if row.reason:
        what += f": {row.reason}"
    return f"{row.scenario} ({row.category}): {what} ({row.seconds:.1f} s)"


@contextlib.contextmanager
def _relay_access(lab: Lab) -> Iterator[str]:
    """A key of the agent's own that the lab's relay accepts (so an unprevented tunnel works);
    revoked at the end."""
    private, public = lab_mod.agent_key("agent@drill")
    lab.authorize_key(public)
    try:
        yield private
    finally:
        with contextlib.suppress(OSError, CorralError):
            lab.revoke_key(public)


def run_battery(lab: Lab, mode: str, scenarios: Sequence[Scenario], progress: Progress | None = None) -> Report:
    """Run scenarios in a lab that is up, in one mode."""
    needs_key = any(s.relay_key for s in scenarios)
    with contextlib.ExitStack() as stack:
        key = stack.enter_context(_relay_access(lab)) if needs_key else None
        return Battery(lab, mode, relay_key=key, progress=progress).run(scenarios)


def run_drill(scenarios: Sequence[Scenario], modes: Sequence[str] = MODES, *, lab_name: str = lab_mod.DEFAULT_NAME,
              progress: Progress | None = None, on_report: Callable[[Report], None] | None = None) -> list[Report]:
    """Bring the lab up (unless it is up), run the scenarios in each mode (on_report gets each
    mode's report as soon as it is done), take the lab down if this call brought it up.
    Everything the scenarios made goes with their sandboxes."""
    say = progress or (lambda _: None)
    for mode in modes:
        if mode not in MODES:
            raise CorralError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if os.geteuid() != 0:
        raise CorralError("the drills need root (the lab's namespaces, sandboxes, the sensor)")
    reports = []
    with Lab(lab_name, progress=say) as lab:
        if not lab.made:
            say(f"lab {lab.name} was up already: using it, leaving it up")
        needs_key = any(s.relay_key for s in scenarios)
        with contextlib.ExitStack() as stack:
            key = stack.enter_context(_relay_access(lab)) if needs_key else None
            for mode in modes:
                reports.append(Battery(lab, mode, relay_key=key, progress=say).run(scenarios))
                if on_report is not None:
                    on_report(reports[-1])
    return reports


# -- output ---------------------------------------------------------------------------------------------

def format_table(report: Report) -> str:
    """The report as a table for people, with its summary line last."""
    head = ("SCENARIO", "CATEGORY", "DETECTED (rule, ms)", "PREVENTED", "LAB SAW", "MISSED")
    lines = []
    for r in report.rows:
        detected = f"{r.rule} ({r.severity}, {r.ttd_ms:.0f} ms)" if r.detected else "no"
        prevented = "-" if r.mode == "observe" or r.evidence is None else "yes" if r.prevented else "NO"
        if r.lab_saw is None:
            lab = "-"
        else:
            lab = f"{r.lab_saw} record{'s' if r.lab_saw != 1 else ''}" if r.lab_saw else "nothing"
        missed = "" if r.ok else f"{r.verdict}: {r.reason}"
        lines.append((r.scenario, r.category, detected, prevented, lab, missed))
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head) - 1)]
    out = []
    for row in [head, *lines]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        out.append("  ".join([*cells, row[-1]]).rstrip())
    out.append(report.summary())
    return "\n".join(out)


def write_json(reports: Sequence[Report], path: str | Path) -> None:
    data = {"ok": all(r.ok for r in reports), "runs": [r.to_dict() for r in reports]}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(target)
