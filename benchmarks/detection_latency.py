"""Detection latency: from the kernel event that breaks a rule to its alert, and to the process gone.

Two sandboxes share one ``Monitor`` of this benchmark's own (so one pipeline, one engine: the
default rules plus a few marker rules written at run time).  In the *trigger* sandbox a shell
script starts, one after the other and paced, processes whose command line names a marker
(``sh -c 'exec sleep 2' corral-bench-kill-a``): the marker rules kill them (action ``kill``) or
their tree (``kill_tree``).  In the *load* sandbox a C program (compiled here, at run time) makes
UDP ``connect()`` calls to 127.0.0.1:1 in the sandbox's own network namespace (no packet is sent)
at a paced rate, 0, 20,000 or 100,000 per second, each one a ``connect`` event through the
pipeline and the engine; the default rules raise nothing on them (checked).  Then, per trigger:

  alert    the trigger's exec event (``Alert.event.ts_ns``, kernel CLOCK_BOOTTIME) to the sandbox's
           ``on_alert`` callback (CLOCK_BOOTTIME read there; the callback runs after the action);
           also to the alert's creation in the engine (``Alert.time_ns``, wall clock, converted)
  kill     the exec event to the kernel's exit event of the killed process (same clock)
  freeze   (a few per level, a ``freeze`` marker rule) the exec event to ``on_alert``, which runs
           once the sandbox is frozen and the evidence bundle is written, in the pipeline thread

    .venv/bin/python benchmarks/detection_latency.py            # ~2 minutes, updates the doc
    .venv/bin/python benchmarks/detection_latency.py --quick    # ~15 seconds, prints only
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _bench

from corral import Monitor, Sandbox
from corral import events as ev
from corral.detect.engine import Alert
from corral.sandbox import runner
from corral.sandbox.runner import SandboxFrozen

TARGET_ALERT_P50_MS = 5.0
TARGET_ALERT_P99_MS = 50.0
TARGET_KILL_P99_MS = 20.0
TARGET_FREEZE_P99_MS = 100.0
LEVELS = (0, 20_000, 100_000)  # background events/s
RING_SIZE = 16 << 20  # the Monitor's default

# Storm control lets a (rule, sandbox) raise at most 5 alerts per 10 s (detect/engine.py FOLD_BURST):
# triggers rotate over enough marker rules that none comes near it.
KILL_MARKS = "abcdefghijklmnop"
TREE_MARKS = "qrstuvwx"
FREEZE_MARKS = "abc"
MARKER_SLEEP_S = 2  # a marker not killed by then exits by itself: a missed kill (1 with --quick)
SLOW_MS = 20.0  # an alert made later than this after its event is looked into
FREEZE_WAIT_S = 2.0  # for a freeze marker's alert, before giving up on it (1 with --quick)


# driver.sh GAP SPEC...: per SPEC (k:a, t:q), a process naming the marker, started in the background
# GAP seconds after the previous one (so a kill that comes late, or never, does not slow the pace);
# then wait for them all.  The markers are put together here, so this script's own command line
# names none of them.
DRIVER_SH = r"""
gap=$1
shift
for spec in "$@"; do
	kind=${spec%%:*}
	mark=${spec#*:}
	case $kind in
	k) name=corral-bench-kill-$mark ;;
	t) name=corral-bench-tree-$mark ;;
	esac
	sh -c 'exec sleep @SLEEP@' "$name" &
	sleep "$gap"
done
wait
"""


def marker_rules() -> str:
    """Marker rules: an exec of sh naming the marker is killed, its tree killed, or the sandbox frozen."""
    def rule(name: str, marker: str, action: str) -> str:
        return (f"- rule: {name}\n  desc: benchmarks/detection_latency.py marker\n  event: exec\n"
                f"  condition: proc.name = sh and proc.args contains {marker}\n  severity: high\n"
                f"  category: execution\n  tags: [T1059]\n  action: {action}\n"
                f'  output: "marker {marker}: %proc.cmdline"\n'
                f'  examples:\n    match: [{{proc.name: sh, proc.args: "-c true {marker}"}}]\n'
                f'    no_match: [{{proc.name: sh, proc.args: "-c true"}}]\n\n')
    out = "# Written by benchmarks/detection_latency.py for one run.\n"
    out += "".join(rule(f"Bench kill {m}", f"corral-bench-kill-{m}", "kill") for m in KILL_MARKS)
    out += "".join(rule(f"Bench kill_tree {m}", f"corral-bench-tree-{m}", "kill_tree") for m in TREE_MARKS)
    out += "".join(rule(f"Bench freeze {m}", f"corral-bench-freeze-{m}", "freeze") for m in FREEZE_MARKS)
    return out


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class GcPauses:
    """Garbage collections (any thread; each one stops every Python thread):
    (generation, CLOCK_BOOTTIME ns at its start, ms)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, int, float]] = []
        self._t0 = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = boot_ns()
        else:
            self.pauses.append((info["generation"], self._t0, (boot_ns() - self._t0) / 1e6))

    def take(self) -> list[tuple[int, int, float]]:
        out, self.pauses = self.pauses, []
        return out


class LoadSandbox(Sandbox):
    """A sandbox that counts the events delivered to it (then keeps them, as any sandbox does)."""

    delivered = 0

    def _on_event(self, event: ev.Event) -> None:
        self.delivered += 1
        super()._on_event(event)


@dataclass
class Level:
    rate: int
    triggers: list[str]
    alerts: list[tuple[Alert, int]] = field(default_factory=list)  # (alert, BOOTTIME ns in on_alert)
    freezes: list[tuple[Alert, int]] = field(default_factory=list)
    freezes_sent: int = 0
    exits: dict[int, list[ev.ExitEvent]] = field(default_factory=dict)
    produced: int = 0
    produced_s: float = 0.0
    delivered: int = 0
    drain_s: float = 0.0
    busy_s: float = 0.0  # from the load's start to the pipeline caught up
    drops: int = 0
    load_alerts: list[str] = field(default_factory=list)
    gc_pauses: list[tuple[int, int, float]] = field(default_factory=list)
    max_pending: int = 0  # the most bytes seen waiting in the ring (sampled every 2 ms)
    pipeline_cpu: float = 0.0  # of one core, while the level ran: the pipeline thread on a CPU
    pipeline_wait: float = 0.0  # ... and runnable but waiting for one (other threads, other people)
    load_avg: float = 0.0  # the host's 1-minute load average when the level began
    other_alerts: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, wd: _bench.Workdir, mon: Monitor, rules: Path, quick: bool) -> None:
        self.mon = mon
        self.marker_sleep = 1 if quick else MARKER_SLEEP_S
        self.freeze_wait = 1.0 if quick else FREEZE_WAIT_S
        self.gc = GcPauses()
        self._lock = threading.Lock()
        self._alerts: list[tuple[Alert, int]] = []
        self._load_alerts: list[Alert] = []
        self.trig = Sandbox(monitor=mon, rules=[rules], on_alert=self._on_trigger_alert)
        self.load: LoadSandbox | None = None
        try:
            self.trig.start()
            self.load = LoadSandbox(monitor=mon, rules=[rules], on_alert=self._load_alerts.append)
            self.load.start()
        except BaseException:
            self.close()
            raise
        driver = self.trig.workspace / "driver.sh"
        driver.write_text(DRIVER_SH.replace("@SLEEP@", str(self.marker_sleep)))
        driver.chmod(0o644)
        loadgen = self.load.workspace / "loadgen"
        shutil.copy(wd.compile("loadgen", _bench.PACED_LOADGEN_C), loadgen)
        loadgen.chmod(0o755)

    def _on_trigger_alert(self, alert: Alert) -> None:
        now = boot_ns()  # first: this runs in the pipeline thread, after the action
        with self._lock:
            self._alerts.append((alert, now))

    def take_alerts(self) -> list[tuple[Alert, int]]:
        with self._lock:
            out, self._alerts = self._alerts, []
        return out

    def close(self) -> None:
        for sb in (self.load, self.trig):
            if sb is not None:
                with contextlib.suppress(Exception):
                    sb.release()  # a freeze that a failure left in place
                sb.close()
                shutil.rmtree(runner.STATE_DIR / "evidence" / sb.name, ignore_errors=True)

    def run_level(self, rate: int, triggers: list[str], gap: float, freezes: int) -> Level:
        lv = Level(rate, triggers)
        assert self.load is not None
        stop = self.load.workspace / "stop"
        stop.unlink(missing_ok=True)
        load_result: list[runner.Result] = []
        load_thread = None
        drops0 = self.mon.drops
        delivered0 = self.load.delivered
        self.take_alerts()
        self.gc.take()
        sampling = threading.Event()
        pending = [0]
        ring = self.mon.sensor.ring

        def sample() -> None:
            while not sampling.wait(0.002):
                pending[0] = max(pending[0], ring.pending())
        sampler = threading.Thread(target=sample, name="bench-ring-sampler", daemon=True)
        sampler.start()
        lv.load_avg = os.getloadavg()[0]
        sched0 = _bench.schedstat(self.trig.pipeline.native_id)
        t_start = time.monotonic()
        if rate:
            load = self.load

            def run_load() -> None:
                # MIX "c": connects only; the PATH argument is unused then
                load_result.append(load.exec(["/workspace/loadgen", str(rate), "c", "/workspace/stop", "600",
                                              "/dev/null"], timeout=660))
            load_thread = threading.Thread(target=run_load, name="bench-load", daemon=True)
            load_thread.start()
            time.sleep(0.5)  # the pipeline in its steady state before the first trigger
        try:
            r = self.trig.exec(["/bin/sh", "/workspace/driver.sh", f"{gap:g}", *triggers],
                               timeout=len(triggers) * gap + self.marker_sleep + 30)
            if r.exit_code != 0:
                raise RuntimeError(f"the trigger driver failed (exit {r.exit_code}): {r.stderr[-500:]}")
            lv.freezes_sent = freezes
            for i in range(freezes):
                self.freeze_once(lv, FREEZE_MARKS[i % len(FREEZE_MARKS)])
                time.sleep(gap)
        finally:
            stop.touch()
            if load_thread is not None:
                load_thread.join(timeout=60)
        t_stop = time.monotonic()
        if load_result:
            out = load_result[0].stdout.split()
            if load_result[0].exit_code != 0 or len(out) != 2:
                raise RuntimeError(f"the load generator failed (exit {load_result[0].exit_code}): "
                                   f"{load_result[0].stderr[-500:]}")
            lv.produced, lv.produced_s = int(out[0]), float(out[1])
        # How long the pipeline takes to work off what is left in the ring.
        while ring.pending() and time.monotonic() - t_stop < 20:
            time.sleep(0.005)
        seen = -1
        while self.load.delivered != seen and time.monotonic() - t_stop < 30:
            seen = self.load.delivered  # a round may still be working through a big batch
            self.load.flush_events()
        self.trig.flush_events()
        lv.drain_s = time.monotonic() - t_stop
        if self.trig.frozen:  # a freeze whose alert came only after freeze_once() gave up on it
            time.sleep(0.2)
            self.trig.release()
        lv.busy_s = time.monotonic() - t_start
        sched1 = _bench.schedstat(self.trig.pipeline.native_id)
        if sched0 is not None and sched1 is not None:
            lv.pipeline_cpu = (sched1[0] - sched0[0]) / 1e9 / lv.busy_s
            lv.pipeline_wait = (sched1[1] - sched0[1]) / 1e9 / lv.busy_s
        lv.gc_pauses = self.gc.take()
        sampling.set()
        sampler.join()
        lv.max_pending = pending[0]
        lv.delivered = self.load.delivered - delivered0
        self.mon.sensor.check_drops()
        lv.drops = self.mon.drops - drops0
        for alert, t in self.take_alerts():
            if alert.rule.startswith("Bench freeze"):
                lv.freezes.append((alert, t))
            elif alert.rule.startswith("Bench "):
                lv.alerts.append((alert, t))
            else:
                lv.other_alerts.append(alert.rule)
        lv.load_alerts = [a.rule for a in self._load_alerts]
        self._load_alerts.clear()
        for e in self.trig.events:
            if isinstance(e, ev.ExitEvent):
                lv.exits.setdefault(e.pid, []).append(e)
        return lv

    def freeze_once(self, lv: Level, mark: str) -> None:
        """One step naming the freeze marker: the sandbox is frozen, the evidence taken, then released."""
        def freezes() -> int:
            with self._lock:
                return sum(1 for a, _ in self._alerts if a.rule.startswith("Bench freeze"))

        before = freezes()
        with contextlib.suppress(SandboxFrozen):
            self.trig.exec(["/bin/sh", "-c", "exec sleep 0.3", f"corral-bench-freeze-{mark}"], timeout=10)
        # exec() may see the sandbox frozen before the evidence is written and on_alert has run:
        # release only after that (or after FREEZE_WAIT_S: a freeze whose exec event was lost).
        deadline = time.monotonic() + self.freeze_wait
        while freezes() == before and time.monotonic() < deadline:
            time.sleep(0.002)
        if self.trig.frozen:
            self.trig.release()


def quantile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank quantile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass
class Figures:
    raised: list[float]  # exec event -> Alert made in the engine, kill and kill_tree triggers
    alert: list[float]  # exec event -> on_alert, kill triggers (after the kill action)
    kill_action: list[float]  # Alert made -> on_alert, kill triggers: the action
    kill: list[float]  # exec event -> exit event of the killed process, kill triggers
    tree: list[float]
    tree_cb: list[float]
    freeze: list[float]
    freeze_action: list[float]
    missed_alerts: int
    missed_kills: int
    missed_freezes: int
    slow: int = 0  # alerts made over SLOW_MS after their event
    slow_gc: int = 0  # of which a full garbage collection began in between
    slow_action: int = 0  # of which the pipeline was carrying out another alert's kill_tree or freeze


def figures(lv: Level, offset_ns: int) -> Figures:
    f = Figures([], [], [], [], [], [], [], [], 0, 0, 0)
    for alert, t_cb in lv.alerts:
        t0 = alert.event.ts_ns
        made = alert.time_ns - offset_ns
        f.raised.append((made - t0) / 1e6)
        if made - t0 > SLOW_MS * 1e6:
            f.slow += 1
            f.slow_gc += any(g == 2 and t0 <= start <= made for g, start, _ in lv.gc_pauses)
            # another alert's action that ran in between and took at least half of this delay
            f.slow_action += any(a.action in ("kill_tree", "freeze") and a is not alert
                                 and t0 < cb and a.time_ns - offset_ns < made
                                 and cb - (a.time_ns - offset_ns) >= (made - t0) / 2
                                 for a, cb in [*lv.alerts, *lv.freezes])
        if alert.action == "kill":
            f.alert.append((t_cb - t0) / 1e6)
            f.kill_action.append((t_cb - made) / 1e6)
        else:
            f.tree_cb.append((t_cb - t0) / 1e6)
        killed = [e.ts_ns for e in lv.exits.get(alert.pid, ()) if e.ts_ns >= t0 and e.signal == 9]
        if not killed:
            f.missed_kills += 1
            continue
        (f.kill if alert.action == "kill" else f.tree).append((min(killed) - t0) / 1e6)
    f.freeze = [(t_cb - a.event.ts_ns) / 1e6 for a, t_cb in lv.freezes]
    f.freeze_action = [(t_cb - (a.time_ns - offset_ns)) / 1e6 for a, t_cb in lv.freezes]
    f.missed_alerts = len(lv.triggers) - len(lv.alerts)
    f.missed_freezes = lv.freezes_sent - len(lv.freezes)
    return f


def main() -> int:
    parser = _bench.common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--triggers", type=int, help="kill triggers per load level (default 60; 6 with --quick); "
                        "a kill_tree trigger follows every third")
    parser.add_argument("--freezes", type=int, help="freeze triggers per load level (default 6; 1 with --quick)")
    parser.add_argument("--gap", type=float, help="seconds between triggers (default 0.15; 0.1 with --quick)")
    parser.add_argument("--levels", help="background events/s per level, comma-separated (default "
                        f"{','.join(map(str, LEVELS))})")
    args = parser.parse_args()
    n_kill = args.triggers or (6 if args.quick else 60)
    n_freeze = args.freezes if args.freezes is not None else (1 if args.quick else 6)
    gap = args.gap or (0.1 if args.quick else 0.15)
    levels_wanted = [int(x) for x in args.levels.split(",")] if args.levels else list(LEVELS)
    _bench.require_host()
    m = _bench.machine()
    offset0 = time.time_ns() - boot_ns()

    levels: list[Level] = []
    with _bench.terminate_as_exit(), _bench.Workdir() as wd:
        rules = wd.path / "markers.yaml"
        rules.write_text(marker_rules())
        with Monitor(ring_size=RING_SIZE) as mon:
            b: Bench | None = None
            try:
                t_setup = time.monotonic()
                b = Bench(wd, mon, rules, args.quick)
                gc.callbacks.append(b.gc)
                print(f"  two sandboxes ready in {time.monotonic() - t_setup:.1f} s", file=sys.stderr)
                k = t = 0
                for rate in levels_wanted:
                    triggers = []
                    for i in range(n_kill):
                        triggers.append(f"k:{KILL_MARKS[k % len(KILL_MARKS)]}")
                        k += 1
                        if i % 3 == 2:
                            triggers.append(f"t:{TREE_MARKS[t % len(TREE_MARKS)]}")
                            t += 1
                    t_level = time.monotonic()
                    lv = b.run_level(rate, triggers, gap, n_freeze)
                    levels.append(lv)
                    f = figures(lv, offset0)
                    print(f"  {rate:>7,}/s: {len(lv.alerts)}/{len(triggers)} alerts, alert p50 "
                          f"{quantile(f.alert, .5) if f.alert else float('nan'):.2f} ms, kill p99 "
                          f"{quantile(f.kill, .99) if f.kill else float('nan'):.2f} ms; produced "
                          f"{lv.produced / lv.produced_s if lv.produced_s else 0:,.0f}/s, drops {lv.drops}; "
                          f"{time.monotonic() - t_level:.1f} s", file=sys.stderr)
            finally:
                if b is not None:
                    with contextlib.suppress(ValueError):
                        gc.callbacks.remove(b.gc)
                    b.close()
    offset1 = time.time_ns() - boot_ns()

    lines = report(levels, offset0, m, n_kill, n_freeze, gap, (offset1 - offset0) / 1e6, RING_SIZE,
                   1 if args.quick else MARKER_SLEEP_S)
    print("\n".join(lines))
    if not (args.quick or args.no_doc):
        _bench.update_doc("detection_latency", lines)
        print(f"\nupdated {_bench.DOC.relative_to(_bench.REPO)}")
    missed = any(missed_targets(figures(lv, offset0)) for lv in levels)
    return 1 if args.strict and missed else 0


def missed_targets(f: Figures) -> list[str]:
    out = []
    if not f.alert or quantile(f.alert, .5) > TARGET_ALERT_P50_MS:
        out.append("alert p50")
    if not f.alert or quantile(f.alert, .99) > TARGET_ALERT_P99_MS:
        out.append("alert p99")
    if not f.kill or quantile(f.kill, .99) > TARGET_KILL_P99_MS:
        out.append("kill p99")
    if f.freeze and quantile(f.freeze, .99) > TARGET_FREEZE_P99_MS:
        out.append("freeze p99")
    if f.missed_alerts or f.missed_kills or f.missed_freezes:
        out.append("triggers missed")
    return out


def ms(xs: Sequence[float]) -> str:
    if not xs:
        return "– | – | – | –"
    return f"{quantile(xs, .5):.2f} | {quantile(xs, .9):.2f} | {quantile(xs, .99):.2f} | {max(xs):.2f}"


def report(levels: list[Level], offset_ns: int, m: dict[str, str], n_kill: int, n_freeze: int, gap: float,
           drift_ms: float, ring_size: int, marker_sleep: int) -> list[str]:
    rows, load_rows, verdicts, notes = [], [], [], []
    for lv in levels:
        f = figures(lv, offset_ns)
        name = f"{lv.rate:,}/s" if lv.rate else "none"
        rows += [
            f"| {name} | **alert**: `on_alert` called (`kill` rules; after the action) | {len(f.alert)} | "
            f"{ms(f.alert)} |",
            f"| {name} | alert made in the engine (`Alert.time_ns`; all markers) | {len(f.raised)} | "
            f"{ms(f.raised)} |",
            f"| {name} | **kill**: exit event of the killed process (`kill`) | {len(f.kill)} | {ms(f.kill)} |",
            f"| {name} | (the `kill` action alone: alert made → `on_alert`) | {len(f.kill_action)} | "
            f"{ms(f.kill_action)} |",
            f"| {name} | kill_tree: `on_alert` (sandbox frozen, tree killed, thawed) | {len(f.tree_cb)} | "
            f"{ms(f.tree_cb)} |",
            f"| {name} | kill_tree: exit event of the killed process | {len(f.tree)} | {ms(f.tree)} |",
            f"| {name} | **freeze**: `on_alert` (frozen, evidence written) | {len(f.freeze)} | {ms(f.freeze)} |",
            f"| {name} | (the `freeze` action alone: alert made → `on_alert`) | {len(f.freeze_action)} | "
            f"{ms(f.freeze_action)} |",
        ]
        produced = lv.produced / lv.produced_s if lv.produced_s else 0.0
        full = [p for g, _, p in lv.gc_pauses if g == 2]
        longest = max(full, default=0.0)
        load_rows.append(
            f"| {name} | {_bench.rate(produced)} | {lv.delivered:,} | "
            f"{_bench.rate(lv.delivered / lv.busy_s) if lv.busy_s else '–'} | "
            f"{lv.max_pending / ring_size:.0%} | {lv.drain_s * 1000:.0f} ms | "
            f"{lv.drops:,} | "
            f"{', '.join(sorted(set(lv.load_alerts))) or 'none'} | {len(full)} ({longest:.0f} ms) | "
            f"{lv.pipeline_cpu:.0%} / {lv.pipeline_wait:.0%} | {lv.load_avg:.1f} |")
        missed = missed_targets(f)
        verdicts.append(f"{name}: " + ("all met" if not missed else "**MISSED** " + ", ".join(missed)))
        if f.missed_alerts or f.missed_kills or f.missed_freezes:
            notes.append(f"At {name}: {f.missed_alerts} of {len(lv.triggers)} triggers raised no alert, "
                         f"{f.missed_kills} alerted processes were not seen killed, {f.missed_freezes} of "
                         f"{lv.freezes_sent} freezes raised no alert.")
        if f.slow:
            notes.append(f"At {name}: {f.slow} alerts were made more than {SLOW_MS:g} ms after their event; "
                         f"during {f.slow_gc} of those a full garbage collection ran, during {f.slow_action} the "
                         "pipeline thread spent at least half the delay carrying out another alert's `kill_tree` "
                         "or `freeze` (which holds up every event behind it).")
        if lv.other_alerts:
            notes.append(f"At {name} the trigger sandbox also raised: "
                         f"{', '.join(sorted(set(lv.other_alerts)))}.")
    lines = [
        "## Detection latency: kernel event to alert, to a killed process, to a frozen sandbox",
        "",
        f"`.venv/bin/python benchmarks/detection_latency.py`: one `Monitor` of the benchmark's own (the default "
        f"{RING_SIZE >> 20} MiB ring) and two sandboxes on it, so one pipeline and one engine (the 114 default "
        "rules and marker rules written at run time). In the *trigger* sandbox a shell script starts, one at a time "
        f"and {gap:g} s apart, `sh -c 'exec sleep {marker_sleep}' corral-bench-kill-X`: per load level "
        f"{n_kill} such triggers for rules with action `kill`, a `kill_tree` one after every third, then "
        f"{n_freeze} steps naming a `freeze` marker (each released once its evidence is written). In the "
        "*load* sandbox a C program makes UDP `connect()`s to 127.0.0.1:1 in the sandbox's own network "
        "namespace (no packet leaves) at a paced rate, each a `connect` event through the pipeline and the "
        "engine. Times are from the trigger's exec event (`Alert.event.ts_ns`, the kernel's CLOCK_BOOTTIME) "
        "to: CLOCK_BOOTTIME read in the sandbox's `on_alert` callback, which runs after the rule's action; "
        "the alert's creation in the engine (`Alert.time_ns`, wall clock, converted with the offset "
        f"measured at start; it drifted {drift_ms:+.2f} ms over the run); the kernel's exit event of the "
        "killed process (SIGKILL), on the same clock as the trigger. Percentiles are nearest-rank.",
        "",
        *_bench.machine_lines(m),
        "",
        "| background load | from the trigger's exec event (kernel) to | n | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "| background load | produced (events/s) | delivered to the load sandbox | delivered per second of "
        "the level | most waiting in the ring | pipeline caught up, after the load stopped | records dropped | "
        "alerts in the load sandbox | full garbage collections (longest) | pipeline thread: on a CPU / waiting "
        "for one | host load average |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        *load_rows,
        "",
        f"Targets: alert p50 ≤ {TARGET_ALERT_P50_MS:g} ms and p99 ≤ {TARGET_ALERT_P99_MS:g} ms (to `on_alert`); "
        f"kill p99 ≤ {TARGET_KILL_P99_MS:g} ms (to the exit event, action `kill`); freeze with evidence p99 ≤ "
        f"{TARGET_FREEZE_P99_MS:g} ms. " + "; ".join(verdicts) + ".",
    ]
    if notes:
        lines += ["", *notes]
    return lines


if __name__ == "__main__":
    sys.exit(main())
