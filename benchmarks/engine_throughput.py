"""Rule engine throughput: recorded events through ``Engine.process()``, default ruleset, one core.

Real events are recorded first: a ``Monitor`` watches a scratch cgroup in which a shell script
does what a coding agent does (looks around, reads its shell start-up files, builds a small C
project with make and gcc, edits a file and rebuilds, runs a Python test suite with pytest, makes
git commits, and fetches files with curl from a ``python3 -m http.server`` on 127.0.0.1), and the
decoded events are kept, each with its process and ancestry as the process table had them when it
was read.  Then the recording, repeated to ~200,000 events (each repetition shifted later in time,
so the detectors' windows see one stream that goes on), is fed to a fresh ``Engine()`` (the
default ruleset and every detector) one event at a time, timed by this thread's CPU time and by
the wall clock.  Each repeat also times the rules alone (``engine.rules.match``), the rules
without their index (every rule of the event's kind evaluated, as a baseline for the index) and the
detectors alone (``engine.detectors.feed``), in rotating order; the cost per event kind is measured
last.

    .venv/bin/python benchmarks/engine_throughput.py            # ~1 minute, updates the doc
    .venv/bin/python benchmarks/engine_throughput.py --quick    # ~10 seconds, prints only
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import _bench

from corral import events as ev
from corral.detect.detectors import Detectors
from corral.detect.engine import Engine, SandboxContext
from corral.enrich.proctable import Process
from corral.monitor import Monitor
from corral.sandbox.runner import WORKSPACE_ENTRIES
from corral.sensor.cgroups import ScratchCgroup

TARGET = 250_000  # events/s on one core, rules + detectors
SANDBOX_ID, STEP = 1, 1
MODES = ("full", "rules", "unindexed", "detectors")
MODE_TEXT = {"full": "rules + detectors (`engine.process`)", "rules": "rules only (`engine.rules.match`)",
             "unindexed": "rules without the index: every rule of the kind evaluated (baseline)",
             "detectors": "detectors only (`engine.detectors.feed`)"}

# The agent's session.  Run by bash in the watched cgroup, in the project directory; the project's
# files are written beforehand.  Network: 127.0.0.1 only.
WORKLOAD_SH = r"""
set -eu
export HOME=/root GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@localhost
export GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@localhost
# look around
ls -la . src tests >/dev/null
cat "$HOME/.bashrc" "$HOME/.profile" >/dev/null 2>&1 || true
head -n 20 Makefile >/dev/null
grep -rn "int f" src | wc -l >/dev/null
find . -name '*.c' | xargs wc -l >/dev/null
# build, run, edit, rebuild
make -s -j2
./app >/dev/null
sed -i 's/\* 1;/* 3;/' src/mod1.c
make -s -j2
./app >/dev/null
# tests
"$PY" -m pytest -q -p no:cacheprovider tests >/dev/null
# version control
git init -q .
git add -A
git commit -qm initial
git status --short >/dev/null
echo "more" >> README.md
git diff >/dev/null
git commit -qam "second"
git log --oneline >/dev/null
# fetch from a local web server
/usr/bin/python3 -m http.server --bind 127.0.0.1 "$PORT" --directory . >/dev/null 2>&1 &
srv=$!
for i in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
for i in $(seq 1 "$CURLS"); do curl -s -o /dev/null "http://127.0.0.1:$PORT/src/mod1.c"; done
kill "$srv"
wait "$srv" || true
cat "$HOME/.bashrc" >/dev/null 2>&1 || true
make -s clean
"""

CALC_PY = """\
def add(a, b):
    return a + b


def mean(xs):
    return sum(xs) / len(xs)
"""

TEST_PY = """\
import calc


def test_add():
    assert calc.add(2, 3) == 5


def test_mean():
    assert calc.mean([1, 2, 3]) == 2
"""


def write_project(root: Path, modules: int) -> None:
    """A small C project (``modules`` files and a main), a Python module with tests, a README."""
    (root / "src").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "src" / "mod.h").write_text("".join(f"int f{i}(int x);\n" for i in range(1, modules + 1)))
    for i in range(1, modules + 1):
        (root / "src" / f"mod{i}.c").write_text(
            f'#include "mod.h"\nint f{i}(int x)\n{{\n\tint s = 0;\n\tfor (int i = 0; i < x; i++)\n'
            f"\t\ts += i * {i if i > 1 else 1};\n\treturn s;\n}}\n")
    calls = " + ".join(f"f{i}(argc + 10)" for i in range(1, modules + 1))
    (root / "src" / "main.c").write_text(
        f'#include <stdio.h>\n#include "mod.h"\nint main(int argc, char **argv)\n{{\n'
        f'\t(void)argv;\n\tprintf("%d\\n", {calls});\n\treturn 0;\n}}\n')
    objs = " ".join(f"src/mod{i}.o" for i in range(1, modules + 1))
    (root / "Makefile").write_text(
        f"CFLAGS = -O2 -Wall\nOBJS = src/main.o {objs}\n\napp: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n\n"
        "src/%.o: src/%.c src/mod.h\n\t$(CC) $(CFLAGS) -c -o $@ $<\n\nclean:\n\trm -f app $(OBJS)\n")
    (root / "calc.py").write_text(CALC_PY)
    (root / "tests" / "test_calc.py").write_text(TEST_PY)
    (root / "tests" / "conftest.py").write_text("import sys, os\nsys.path.insert(0, os.path.dirname("
                                                "os.path.dirname(__file__)))\n")
    (root / "README.md").write_text("# app\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Recording:
    events: list[ev.Event]
    ancestry: dict[int, tuple[Process, ...]]
    seconds: float
    drops: int


def record(wd: _bench.Workdir, modules: int, curls: int) -> Recording:
    """Run the agent-like session in a watched scratch cgroup and keep its decoded events."""
    proj = wd.path / "proj"
    write_project(proj, modules)
    script = wd.path / "session.sh"
    script.write_text(WORKLOAD_SH)
    env = dict(os.environ, PY=sys.executable, PORT=str(free_port()), CURLS=str(curls))
    events: list[ev.Event] = []
    ancestry: dict[int, tuple[Process, ...]] = {}
    cg: ScratchCgroup | None = None
    with Monitor() as mon:
        # what a sandbox watches under its workspace (git hooks and config, Python start-up hooks)
        for entry in WORKSPACE_ENTRIES:
            mon.watch_prefix(f"{proj}/{entry}")
        try:
            cg = ScratchCgroup(f"bench-engine-{os.getpid()}")
            mon.watch_cgroup(cg.id, SANDBOX_ID, STEP)
            watched = cg

            def keep(batch: list[ev.Event]) -> None:
                for e in batch:
                    if e.type == ev.DROP:
                        continue
                    events.append(e)
                    if e.pid:  # as the pipeline's engine would see it, right after the read
                        ancestry[e.pid] = tuple(mon.ancestors(e.pid))

            t0 = time.monotonic()
            proc = subprocess.Popen(["/bin/bash", str(script)], cwd=proj, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    preexec_fn=lambda: watched.add(os.getpid()))
            try:
                while proc.poll() is None:
                    keep(mon.read(timeout=0.05))
                _out, err = proc.communicate(timeout=120)
            finally:
                _bench.kill_and_reap(proc)
            seconds = time.monotonic() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"the agent session failed (exit {proc.returncode}):\n{err.decode()[-2000:]}")
            time.sleep(0.05)
            while True:
                batch = mon.read()
                keep(batch)
                if not batch and not mon.sensor.ring.pending():
                    break
            mon.sensor.check_drops()
            drops = mon.drops
        finally:
            if cg is not None:
                _bench.empty_cgroup(cg)
    return Recording(events, ancestry, seconds, drops)


def replay(events: Sequence[ev.Event], n: int) -> list[ev.Event]:
    """``events`` repeated to at least ``n``, each repetition a new set of event objects shifted
    later by the recording's span, so time-based state sees one stream that goes on."""
    span = events[-1].ts_ns - events[0].ts_ns + 1_000_000
    out: list[ev.Event] = []
    k = 0
    while len(out) < n:
        shift = k * span
        for e in events:
            c = type(e).from_tuple((e._t[0] + shift, *e._t[1:]))
            c.proc = e.proc
            out.append(c)
        k += 1
    return out


class Bench:
    def __init__(self, rec: Recording) -> None:
        self.ancestry = rec.ancestry
        self.context = SandboxContext()
        self.context.add_sandbox(SANDBOX_ID, "bench", "enforce", None)
        self.context.add_step(SANDBOX_ID, STEP, "/bin/bash session.sh")

    def engine(self) -> Engine:
        """A fresh engine: default rules, fresh detectors and storm-control state."""
        get = self.ancestry.get

        def ancestors(pid: int) -> Sequence[Process]:
            return get(pid, ())
        return Engine(context=self.context, ancestors=ancestors)

    def time(self, mode: str, stream: Sequence[ev.Event], engine: Engine | None = None) -> tuple[float, float, int]:
        """Feed ``stream`` to ``engine`` (by default a fresh one) in ``mode``: (thread CPU s, wall s,
        what it returned)."""
        if engine is None:
            engine = self.engine()
        fn: Callable[[ev.Event], Sequence[object]]
        if mode == "full":
            fn = engine.process
        elif mode == "rules":
            fn = engine.rules.match
        elif mode == "unindexed":
            fn = unindexed(engine)
        else:
            fn = engine.detectors.feed
        gc.collect()
        out = 0
        w0, c0 = time.perf_counter(), time.thread_time()
        for e in stream:
            r = fn(e)
            if r:
                out += len(r)
        cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        return cpu, wall, out


def unindexed(engine: Engine) -> Callable[[ev.Event], Sequence[object]]:
    """``engine.rules.match`` without its index: each rule of the event's kind evaluated."""
    tests = {kind: [(rule, rule.tests[kind]) for rule in engine.rules.rules_for(kind)] for kind in ev.KINDS}

    def match(e: ev.Event) -> list[object]:
        return [rule for rule, test in tests[e.kind] if test(e)]
    return match


def main() -> int:
    parser = _bench.common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, help="repeats (default 7; 2 with --quick)")
    parser.add_argument("--events", type=int, help="events per timed run (default 200,000; 20,000 with --quick)")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 7)
    n_events = args.events or (20_000 if args.quick else 200_000)
    _bench.require_host()
    m = _bench.machine()

    with _bench.terminate_as_exit(), _bench.Workdir() as wd:
        rec = record(wd, modules=3 if args.quick else 8, curls=5 if args.quick else 20)
    if not rec.events:
        sys.exit("no events were recorded")
    print(f"  recorded {len(rec.events)} events in {rec.seconds:.1f} s ({rec.drops} dropped)", file=sys.stderr)

    b = Bench(rec)
    stream = replay(rec.events, n_events)
    gc.collect()
    gc.freeze()  # the recording and the stream: not the engine's garbage to scan
    try:
        result = run(b, rec, stream, reps, per_kind_events=2_000 if args.quick else 20_000)
    finally:
        gc.unfreeze()

    lines = report(result, rec, m, reps, len(stream))
    print("\n".join(lines))
    if not (args.quick or args.no_doc):
        _bench.update_doc("engine_throughput", lines)
        print(f"\nupdated {_bench.DOC.relative_to(_bench.REPO)}")
    return 1 if args.strict and result.rates["full"].median < TARGET else 0


@dataclass
class Result:
    rates: dict[str, _bench.Stats]  # by thread CPU time
    wall_rates: dict[str, _bench.Stats]
    alerts_per_run: int
    fired: Counter[str]
    per_kind: dict[str, tuple[int, float, float, float]]  # kind -> (recorded, µs full, µs rules, µs detectors)
    rules_for: dict[str, int]  # kind -> the rules its events may be tried against
    tried: dict[str, float]  # kind -> the rules the index leaves to evaluate, per event (mean)
    rules: int  # enabled rules loaded


def run(b: Bench, rec: Recording, stream: Sequence[ev.Event], reps: int, per_kind_events: int) -> Result:
    cpu: dict[str, list[float]] = {k: [] for k in MODES}
    wall: dict[str, list[float]] = {k: [] for k in MODES}
    alerts = 0
    for rep in range(reps):
        order = MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]
        for mode in order:
            c, w, out = b.time(mode, stream)
            cpu[mode].append(len(stream) / c)
            wall[mode].append(len(stream) / w)
            if mode == "full":
                alerts = out
            print(f"  rep {rep + 1}/{reps} {mode:9s} {len(stream)} events: {len(stream) / c:10,.0f}/s CPU, "
                  f"{len(stream) / w:10,.0f}/s wall", file=sys.stderr)

    # Which rules the recorded session itself sets off (one pass, a fresh engine).
    engine = b.engine()
    fired: Counter[str] = Counter()
    for e in rec.events:
        for a in engine.process(e):
            fired[a.rule] += 1 + a.folded
    for a in engine.flush_folds():
        fired[a.rule] += a.folded

    per_kind: dict[str, tuple[int, float, float, float]] = {}
    by_kind: dict[str, list[ev.Event]] = {}
    for e in rec.events:
        by_kind.setdefault(e.kind, []).append(e)
    for kind, evs in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        sub = replay(evs, per_kind_events)
        engine = b.engine()  # one per kind; fresh detectors for each mode that feeds them
        us = {}
        for mode in ("rules", "detectors", "full"):
            engine.detectors = Detectors()
            us[mode] = b.time(mode, sub, engine)[0] / len(sub) * 1e6
        per_kind[kind] = (len(evs), us["full"], us["rules"], us["detectors"])
        print(f"  {kind:12s} {len(evs):6d} recorded: {us['full']:6.2f} µs/event "
              f"(rules {us['rules']:.2f}, detectors {us['detectors']:.2f})", file=sys.stderr)
    rules_for = {kind: len(engine.rules.rules_for(kind)) for kind in by_kind}
    tried = {kind: sum(len(engine.rules.candidates(e)) for e in evs) / len(evs) for kind, evs in by_kind.items()}
    return Result({k: _bench.stats(v) for k, v in cpu.items()}, {k: _bench.stats(v) for k, v in wall.items()},
                  alerts, fired, per_kind, rules_for, tried, sum(r.enabled for r in engine.rules.rules))


def report(r: Result, rec: Recording, m: dict[str, str], reps: int, n: int) -> list[str]:
    head = r.rates["full"]
    met = head.median >= TARGET
    total = len(rec.events)

    def row(mode: str) -> str:
        s, w = r.rates[mode], r.wall_rates[mode]
        return (f"| {MODE_TEXT[mode]} | {_bench.rate(s.median)} | {_bench.rate(s.lo)} – {_bench.rate(s.hi)} | "
                f"{1e6 / s.median:.2f} µs | {_bench.rate(w.median)} |")

    kind_rows = []
    total_us = sum(cnt * full for cnt, full, _, _ in r.per_kind.values()) or 1.0
    for kind, (cnt, full, rules, dets) in r.per_kind.items():
        kind_rows.append(f"| {kind} | {cnt / total:.1%} | {r.rules_for[kind]} | {r.tried[kind]:.1f} | {full:.2f} | "
                         f"{rules:.2f} | {dets:.2f} | {cnt * full / total_us:.0%} |")
    fired = ", ".join(f"{rule} ({count})" for rule, count in r.fired.most_common())
    fired_text = (f"Alerts the recorded session sets off (rule and count, before storm folding): {fired}; in a "
                  f"timed run of {n:,} events the engine returned {r.alerts_per_run} (storm control folds the "
                  "rest)." if fired else "The recorded session sets off no alert: every event is benign, as "
                  "most of an agent's are.")
    verdict = "met" if met else "**MISSED**"
    lines = [
        "## Engine throughput: recorded events through the default ruleset",
        "",
        f"`.venv/bin/python benchmarks/engine_throughput.py`: an agent-like session (a look around the "
        "project, shell start-up files read, a C project built with make and gcc, edited and rebuilt, a "
        "pytest run, git init and two commits, curl fetching from a `python3 -m http.server` on 127.0.0.1) "
        f"ran in a watched scratch cgroup under a `Monitor`; its {total:,} decoded events "
        f"({rec.seconds:.1f} s of activity, {rec.drops} dropped) were kept with each one's process and "
        f"ancestry, then replayed, repeated to {n:,} events (each repetition shifted later in time), "
        f"into a fresh `Engine()` ({r.rules} default rules and every detector) on one thread; {reps} repeats, "
        "modes rotating. Events/s by the thread's CPU time (what one core does; the wall clock, which "
        "also counts time other people's processes had the core, is the last column).",
        "",
        *_bench.machine_lines(m),
        "",
        "| mode | events/s (CPU, median) | min – max | per event | events/s (wall, median) |",
        "|---|---:|---:|---:|---:|",
        row("full"), row("rules"), row("unindexed"), row("detectors"),
        "",
        f"**Rules + detectors: {_bench.rate(head.median)} events/s on one core** (spread "
        f"{head.spread_pct:.0f}%; target ≥ {_bench.rate(TARGET)}: {verdict}).",
        "",
        fired_text,
        "",
        "Cost per event kind (each kind's recorded events replayed alone into a fresh engine, CPU time):",
        "",
        "| kind | share of events | rules for the kind | rules evaluated per event (index) | µs/event, rules + "
        "detectors | rules only | detectors only | share of time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *kind_rows,
        "",
        *where_time_goes(r, total, head.median),
        "Not in the recording: `flow` and `dns` events (they come from the flow sniffer and corral's "
        "resolver in a sandbox, not from the sensor). Ancestry is looked up from what the process table "
        "said at recording time (a dict lookup), not walked again. Answers that the engine remembers by "
        "value (the `in_cidr` tests' memo) are found more often in a recording replayed many times than in "
        "a live stream; the index remembers only which rules to try for each set of screen clauses that "
        "held (a few dozen sets here), nothing about values.",
    ]
    return lines


def where_time_goes(r: Result, total: int, rate: float) -> list[str]:
    """A line on what dominates, from the per-kind costs."""
    if not r.per_kind:
        return []
    cost = {k: cnt * full for k, (cnt, full, _, _) in r.per_kind.items()}
    whole = sum(cost.values()) or 1.0
    top = max(cost, key=lambda k: cost[k])
    cnt, full, rules, _ = r.per_kind[top]
    rules_share = sum(c * ru for c, _, ru, _ in r.per_kind.values()) / whole
    budget = 1e6 / TARGET
    return [
        f"Where the time goes: `{top}` events are {cnt / total:.0%} of the events and {cost[top] / whole:.0%} of "
        f"the time ({full:.1f} µs each, {rules:.1f} of them in the rules: of the {r.rules_for[top]} rules for the "
        f"kind the index leaves {r.tried[top]:.1f} per event to evaluate); "
        f"the rules take {rules_share:.0%} of all the time, the detectors most of the rest. The target allows "
        f"{budget:.1f} µs per event on average; this mix takes {1e6 / rate:.1f}.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
