"""What the monitor costs real agent workloads: contained only vs contained and watched.

Four workloads an agent runs all day, prepared once in a temporary directory (nothing is
downloaded: the wheels are built here, by hand, as zip files) and copied afresh into each run's
workspace:

  make     a C project of 40 files (plus main.c) built with `make -j2`
  pytest   a Python project's unittest suite, 200 small tests (`python3 -m unittest`)
  pip      `pip install --no-index --find-links wheels --target site alpha`: four local wheels
           (alpha needs beta and gamma, beta needs delta), 25 modules each, byte-compiled
  git      a repository of 4,000 files at the workspace root: init, add, commit, status, change
           100 files, status, diff, commit, log

Each runs, as one step (`/bin/sh -c COMMAND`) in a fresh sandbox, two ways:

  contained  the containment alone, built the way corral.Sandbox builds it but with no BPF
             loaded by us at all (no Monitor, no EgressGuard, no flow sniffer, no exec guard, no
             rules): a sandbox cgroup (every hierarchy, no limits, as the default policy), a
             corral network namespace (loopback and a veth to the host, no route out), a holder
             `sleep infinity` started with fs.sandbox_argv (setpriv + bubblewrap: same mounts,
             same uid), and the step entered with fs.enter_argv (nsenter + setpriv + setsid),
             waited for the way Sandbox.exec waits.  No canaries are planted in its home.
  monitored  the normal corral.Sandbox(workdir=...): the same, plus the sensor, egress guard,
             flow sniffer and exec guard loaded and watching, and the pipeline thread reading
             and enriching every event and running the default rules on it.  It runs in a child
             process, so that when it exits everything it loaded is unloaded again before the
             next contained block.

Rounds alternate the order (contained block then monitored block, then the other way round), and
each round's ratio is monitored / contained for the same workload; the median and min-max of the
ratios over rounds are reported, by wall clock and by the sandbox cgroup's CPU time.

    .venv/bin/python benchmarks/workload_overhead.py            # ~3 minutes, updates the doc
    .venv/bin/python benchmarks/workload_overhead.py --quick    # ~15 seconds, prints only
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _bench

from corral.sandbox import cgroups, fs
from corral.sandbox.netns import NetNamespace
from corral.sandbox.runner import STATE_DIR, start_holder

TARGET = 1.03  # at most 3% more wall time, median
STEP_POLL_S = 0.05  # as Sandbox.exec
#: A round is *quiet* when, during each of its runs, processes other than the step and this
#: benchmark's own used less than this share of the machine's CPUs (see others_cpu_since).
QUIET_SHARE = 0.10


# -- the workloads ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    c_files: int
    tests: int
    wheel_modules: int
    git_files: int


FULL = Sizes(c_files=40, tests=200, wheel_modules=25, git_files=4000)
QUICK = Sizes(c_files=12, tests=60, wheel_modules=8, git_files=800)

C_FILE = """\
#include "common.h"

static unsigned long mix_{i}(unsigned long x, unsigned long k)
{{
	for (int r = 0; r < 8; r++)
		x = (x ^ (x >> 13)) * (k | 1UL) + (unsigned long)r;
	return x;
}}
{funcs}
unsigned long unit_{i}(unsigned long seed)
{{
	unsigned long acc = seed;
{calls}	return acc;
}}
"""
C_FUNC = """
struct rec_{i}_{j} {{ unsigned long a, b; char name[16]; }};

static unsigned long step_{i}_{j}(unsigned long x)
{{
	struct rec_{i}_{j} r = {{ x, x * {j}UL, "r{i}_{j}" }};
	unsigned long t = 0;
	for (unsigned long n = 0; n < (r.a & 63); n++) {{
		t += mix_{i}(r.b + n, {k}UL);
		if (t % 7 == {m})
			t ^= (unsigned long)r.name[n % 8];
	}}
	return t + r.a;
}}
"""
MAKEFILE = """\
CC ?= cc
CFLAGS = -O2 -Wall -Isrc
SRCS = $(wildcard src/unit_*.c) src/main.c
OBJS = $(SRCS:src/%.c=build/%.o)

app: $(OBJS)
\t$(CC) -o $@ $(OBJS)

build/%.o: src/%.c src/common.h | build
\t$(CC) $(CFLAGS) -c -o $@ $<

build:
\tmkdir -p build
"""

PY_CORE = '''\
"""Small, real-looking helpers for the test suite to exercise."""
import json
import re


def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def primes(n):
    sieve = bytearray([1]) * (n + 1)
    sieve[0:2] = b"\\0\\0"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(sieve[i * i::i]))
    return [i for i, v in enumerate(sieve) if v]


def roundtrip(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def parse_csv(text):
    return [line.split(",") for line in text.strip().splitlines()]
'''
PY_TEST_HEAD = '''\
import os
import tempfile
import unittest

from mathlib import core


class Test{k}(unittest.TestCase):
'''
PY_TEST = '''\
    def test_{j}(self):
        self.assertEqual(core.slugify("Hello World {j} of {k}"), "hello-world-{j}-of-{k}")
        self.assertEqual(len(core.primes({n})), {primes})
        data = [{{"k": {k}, "j": i, "tags": ["x", str(i)]}} for i in range(800)]
        self.assertEqual(core.roundtrip(data), data)
        for i in range(3):
            with tempfile.NamedTemporaryFile("w+", dir=os.environ.get("TMPDIR", "/tmp")) as f:
                f.write("a,b\\n{j},%d\\n" % i)
                f.flush()
                f.seek(0)
                self.assertEqual(core.parse_csv(f.read())[1], ["{j}", str(i)])

'''

WHEELS = {"alpha": ("beta", "gamma"), "beta": ("delta",), "gamma": (), "delta": ()}
WHEEL_MODULE = '''\
"""Module {m} of {name}."""


class Thing{m}:
    def __init__(self, value):
        self.value = value

    def double(self):
        return self.value * 2


def compute_{m}(items):
    return sorted((i * {m}) % 97 for i in items)


TABLE_{m} = {{str(i): i * i for i in range(40)}}
'''

GIT_SCRIPT = """\
set -e
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@localhost GIT_COMMITTER_NAME=bench \
GIT_COMMITTER_EMAIL=bench@localhost
git init -q -b main
git add -A
git commit -q -m initial
git status --short >/dev/null
for f in d0*/f00*.txt; do echo changed >> "$f"; done
git status --short >/dev/null
git diff --stat >/dev/null
git diff >/dev/null
git commit -q -a -m change
git log --oneline >/dev/null
git log -p -1 >/dev/null
"""


def prepare_make(root: Path, s: Sizes) -> str:
    src = root / "src"
    src.mkdir(parents=True)
    protos = []
    for i in range(s.c_files):
        funcs = "".join(C_FUNC.format(i=i, j=j, k=2654435761 + i * 31 + j, m=(i + j) % 7) for j in range(12))
        calls = "".join(f"\tacc += step_{i}_{j}(acc + {j}UL);\n" for j in range(12))
        (src / f"unit_{i:02d}.c").write_text(C_FILE.format(i=i, funcs=funcs, calls=calls))
        protos.append(f"unsigned long unit_{i}(unsigned long seed);")
    (src / "common.h").write_text("#pragma once\n" + "\n".join(protos) + "\n")
    body = "".join(f"\tacc += unit_{i}(acc);\n" for i in range(s.c_files))
    (src / "main.c").write_text('#include <stdio.h>\n#include "common.h"\n\nint main(void)\n{\n'
                                f'\tunsigned long acc = 1;\n{body}\tprintf("%lu\\n", acc);\n\treturn 0;\n}}\n')
    (root / "Makefile").write_text(MAKEFILE)
    return "make -s -j2 && ./app >/dev/null"


def _count_primes(n: int) -> int:
    sieve = bytearray([1]) * (n + 1)
    sieve[0:2] = b"\0\0"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(sieve[i * i::i]))
    return sum(sieve)


def prepare_pytest(root: Path, s: Sizes) -> str:
    (root / "mathlib").mkdir(parents=True)
    (root / "mathlib" / "__init__.py").write_text("")
    (root / "mathlib" / "core.py").write_text(PY_CORE)
    (root / "tests").mkdir()
    (root / "tests" / "__init__.py").write_text("")
    per_file = 20
    for k in range(s.tests // per_file):
        tests = []
        for j in range(per_file):
            n = 60_000 + 37 * j + k
            tests.append(PY_TEST.format(j=j, k=k, n=n, primes=_count_primes(n)))
        (root / "tests" / f"test_mod{k:02d}.py").write_text(PY_TEST_HEAD.format(k=k) + "".join(tests))
    return "python3 -m unittest discover -s tests -t . -q"


def build_wheel(out: Path, name: str, requires: tuple[str, ...], modules: int) -> None:
    """A pure-Python wheel written as the zip file it is (no build backend, no network)."""
    dist = f"{name}-1.0.dist-info"
    files: dict[str, bytes] = {f"{name}/__init__.py": f'"""{name}."""\n__version__ = "1.0"\n'.encode()}
    for m in range(modules):
        files[f"{name}/mod_{m:02d}.py"] = WHEEL_MODULE.format(m=m, name=name).encode()
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nSummary: benchmark package {name}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files[f"{dist}/METADATA"] = meta.encode()
    files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: corral-bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist}/top_level.txt"] = f"{name}\n".encode()
    record = io.StringIO()
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{path},sha256={digest},{len(data)}\n")
    record.write(f"{dist}/RECORD,,\n")
    files[f"{dist}/RECORD"] = record.getvalue().encode()
    with zipfile.ZipFile(out / f"{name}-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)


def prepare_pip(root: Path, s: Sizes) -> str:
    (root / "wheels").mkdir(parents=True)
    for name, requires in WHEELS.items():
        build_wheel(root / "wheels", name, requires, s.wheel_modules)
    return ("python3 -m pip install --quiet --no-index --find-links wheels --target site --no-cache-dir "
            "--disable-pip-version-check alpha && PYTHONPATH=site python3 -c 'import alpha, beta, gamma, delta'")


def prepare_git(root: Path, s: Sizes) -> str:
    per_dir = 100
    for n in range(s.git_files):
        d = root / f"d{n // per_dir:02d}"
        if n % per_dir == 0:
            d.mkdir(parents=True)
        lines = "".join(f"line {i} of file {n}: the quick brown fox jumps over the lazy dog\n" for i in range(12))
        (d / f"f{n % per_dir:03d}.txt").write_text(lines)
    return GIT_SCRIPT


WORKLOADS: dict[str, Callable[[Path, Sizes], str]] = {
    "make": prepare_make, "pytest": prepare_pytest, "pip": prepare_pip, "git": prepare_git,
}
WHAT = {
    "make": "`make -j2` of {c} C files + main.c, then run the program",
    "pytest": "`python3 -m unittest` of {t} tests (modules of 20; a sieve, JSON, 3 temp files each)",
    "pip": "`pip install --no-index --target` of 4 local wheels ({w} modules each), then import them",
    "git": "git init/add/commit/status/diff/commit/log on {g} files, 100 of them changed",
}


def prepare_all(base: Path, s: Sizes) -> dict[str, tuple[Path, str]]:
    out = {}
    for name, prepare in WORKLOADS.items():
        root = base / "src" / name
        command = prepare(root, s)
        out[name] = (root, command)
    return out


def fresh_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


# -- (a) contained only -----------------------------------------------------------------------------

class Contained:
    """A sandbox's containment without anything of the monitor (see the module docstring)."""

    def __init__(self, workspace: Path) -> None:
        self._stack = contextlib.ExitStack()
        try:
            self._build(workspace)
        except BaseException:
            self.close()
            raise

    def _build(self, workspace: Path) -> None:
        stack = self._stack
        self.name = cgroups.sandbox_name()  # sb-<our pid>-...: reapable by corral if we die
        state = STATE_DIR / "sandboxes" / self.name
        state.mkdir(parents=True)
        stack.callback(shutil.rmtree, state, True)
        self.cgroup = cgroups.SandboxCgroup(self.name, cgroups.Limits())
        stack.callback(self.cgroup.destroy)
        self.netns = NetNamespace(self.name)
        stack.callback(self.netns.destroy)
        self.layout = fs.FsLayout(workspace=workspace, home=state / "home", etc_dir=state / "etc")
        fs.prepare_dirs(self.layout)
        holder, self.holder_pid = start_holder(self.netns.exec_prefix(), self.layout, self.cgroup.new_step(0))
        stack.callback(_bench.kill_and_reap, holder)
        self.step = 0

    def exec(self, command: str) -> tuple[int, str]:
        self.step += 1
        step_cg = self.cgroup.new_step(self.step)
        full = fs.enter_argv(self.holder_pid, ["/bin/sh", "-c", command])
        proc = subprocess.Popen(full, preexec_fn=step_cg.joiner(), text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            while True:
                try:
                    _out, err = proc.communicate(timeout=STEP_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            _bench.kill_and_reap(proc)
            raise
        return proc.returncode, err

    def close(self) -> None:
        self._stack.close()


# -- one run of each kind ---------------------------------------------------------------------------

def machine_busy_s() -> float:
    """CPU seconds all CPUs have spent not idle since boot (/proc/stat), time stolen by the
    hypervisor included: what this guest's CPUs did not give to whoever wanted them."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_cpu_since(busy0: float, own0: float, step_cpu_s: float) -> float:
    """CPU seconds used since (busy0, own0) by everything but the step (its cgroup) and this
    process: other people's work on this shared machine, which slows a run down by chance."""
    return max(0.0, machine_busy_s() - busy0 - step_cpu_s - (time.process_time() - own0))


@dataclass
class Run:
    wall_s: float
    cpu_s: float  # the sandbox cgroup's
    monitor_cpu_s: float = 0.0  # the pipeline thread's, meanwhile (monitored runs)
    events: int = 0  # delivered to the sandbox
    read: int = 0  # read from the ring (corral's launcher included)
    drops: int = 0
    alerts: tuple[str, ...] = ()
    others_cpu_s: float = 0.0  # used meanwhile by processes that are neither the step nor ours

    @property
    def others_share(self) -> float:
        """Of the machine's CPUs, the share other people's processes took during the run."""
        return self.others_cpu_s / (self.wall_s * (os.cpu_count() or 1))


def run_contained(src: Path, command: str, ws: Path) -> Run:
    fresh_copy(src, ws)
    box = Contained(ws)
    try:
        cpu0 = box.cgroup.cpu_usage_ns()
        busy0, own0 = machine_busy_s(), time.process_time()
        t0 = time.perf_counter()
        code, err = box.exec(command)
        wall = time.perf_counter() - t0
        cpu = (box.cgroup.cpu_usage_ns() - cpu0) / 1e9
        others = others_cpu_since(busy0, own0, cpu)
    finally:
        box.close()
        shutil.rmtree(ws, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"contained run of {command!r} failed ({code}): {err[-2000:]}")
    return Run(wall, cpu, others_cpu_s=others)


def child_main(spec_path: Path) -> int:
    """A monitored block: a process that loads everything, runs each workload once, and exits."""
    from corral import Sandbox  # only here: the parent never loads the monitor

    spec = json.loads(spec_path.read_text())
    read_total = [0]
    out: dict[str, dict[str, object]] = {}
    with _bench.terminate_as_exit():
        with Sandbox() as warm:  # loads the sensor, guards and pipeline, outside the timing
            warm.exec("true")
            monitor = warm.monitor
            pipeline = warm.pipeline
            read = monitor.read

            def counting_read(timeout: float = 0.0) -> list:  # type: ignore[type-arg]
                batch = read(timeout)
                read_total[0] += len(batch)
                return batch

            monitor.read = counting_read  # type: ignore[method-assign]
        pipeline_clock = time.pthread_getcpuclockid(pipeline.ident or 0)
        for name, (src, command) in spec["workloads"].items():
            ws = Path(spec["dir"]) / f"ws-{name}"
            fresh_copy(Path(src), ws)
            try:
                with Sandbox(workdir=ws) as sb:
                    sb.flush_events()
                    drops0, read0 = monitor.drops, read_total[0]
                    cpu0, mon0 = sb.cgroup.cpu_usage_ns(), time.clock_gettime_ns(pipeline_clock)
                    busy0, own0 = machine_busy_s(), time.process_time()
                    t0 = time.perf_counter()
                    res = sb.exec(command)
                    wall = time.perf_counter() - t0
                    cpu, mon = sb.cgroup.cpu_usage_ns() - cpu0, time.clock_gettime_ns(pipeline_clock) - mon0
                    others = others_cpu_since(busy0, own0, cpu / 1e9)
                    sb.flush_events()
                    if res.exit_code != 0:
                        raise RuntimeError(f"monitored run of {name} failed ({res.exit_code}): {res.stderr[-2000:]}")
                    out[name] = {"wall_s": wall, "cpu_s": cpu / 1e9, "monitor_cpu_s": mon / 1e9,
                                 "events": len(sb.events), "read": read_total[0] - read0,
                                 "drops": monitor.drops - drops0, "alerts": [a.rule for a in sb.alerts],
                                 "others_cpu_s": others}
            finally:
                shutil.rmtree(ws, ignore_errors=True)
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


def run_monitored(work: Path, workloads: dict[str, tuple[Path, str]]) -> dict[str, Run]:
    """One monitored block, in a child process: when it has exited, nothing of it is loaded any more
    (the sensor's programs take seconds to detach, which is why a block is not one run)."""
    spec, result = work / "monitored.json", work / "monitored-result.json"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"dir": str(work), "result": str(result),
                                "workloads": {n: (str(s), c) for n, (s, c) in workloads.items()}}))
    child = subprocess.Popen([sys.executable, __file__, "--child", str(spec)])
    try:
        rc = child.wait()
    except BaseException:
        # Let it close its sandbox (it unwinds on SIGTERM as on Ctrl-C), then make sure it is gone.
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=15)
        _bench.kill_and_reap(child)
        raise
    if rc != 0:
        raise RuntimeError(f"the monitored block failed (exit {rc})")
    return {n: Run(d["wall_s"], d["cpu_s"], d["monitor_cpu_s"], d["events"], d["read"], d["drops"],
                   tuple(d["alerts"]), d["others_cpu_s"]) for n, d in json.loads(result.read_text()).items()}


# -- main ----------------------------------------------------------------------------------------------

def main() -> int:
    p = _bench.common_args(__doc__ or "")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, help="pairs of runs per workload; default 7, 1 with --quick")
    args = p.parse_args()
    if args.child is not None:
        return child_main(args.child)
    _bench.require_host()
    for tool in ("make", "git", "bwrap"):
        if shutil.which(tool) is None:
            sys.exit(f"this benchmark needs `{tool}` on the host")
    rounds = args.rounds or (1 if args.quick else 7)
    sizes = QUICK if args.quick else FULL
    m = _bench.machine()
    contained: dict[str, list[Run]] = {n: [] for n in WORKLOADS}
    monitored: dict[str, list[Run]] = {n: [] for n in WORKLOADS}
    others_bpf: list[int] = []
    t_start = time.monotonic()
    with _bench.terminate_as_exit(), _bench.Workdir() as work:
        work.path.chmod(0o711)  # the sandbox's unprivileged uid must reach the workspaces below
        workloads = prepare_all(work.path, sizes)
        for r in range(rounds):
            for kind in ("contained", "monitored") if r % 2 == 0 else ("monitored", "contained"):
                if kind == "monitored":
                    for name, run in run_monitored(work.path, workloads).items():
                        monitored[name].append(run)
                    continue
                n = _bench.bpf_programs()  # none of ours: the last monitored block has exited
                if n is not None:
                    others_bpf.append(n)
                for name, (src, command) in workloads.items():
                    contained[name].append(run_contained(src, command, work.path / f"ws-{name}"))
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {contained[n][-1].wall_s:.2f}/{monitored[n][-1].wall_s:.2f} s" for n in WORKLOADS)
                + " (contained/monitored)", flush=True)
    elapsed = time.monotonic() - t_start
    lines, missed = report(contained, monitored, rounds, sizes, m, others_bpf, elapsed)
    print("\n".join(lines))
    if not args.quick and not args.no_doc:
        _bench.update_doc("workload_overhead", lines)
        print(f"\nupdated {_bench.DOC.relative_to(_bench.REPO)}")
    return 1 if args.strict and missed else 0


def report(contained: dict[str, list[Run]], monitored: dict[str, list[Run]], rounds: int, sizes: Sizes,
           m: dict[str, str], others_bpf: list[int], elapsed: float) -> tuple[list[str], bool]:
    rows = []
    missed_names = []
    for name in WORKLOADS:
        a, b = contained[name], monitored[name]
        wall = _bench.stats([y.wall_s / x.wall_s for x, y in zip(a, b, strict=True)])
        cpu = _bench.stats([y.cpu_s / x.cpu_s for x, y in zip(a, b, strict=True)])
        ta, tb = _bench.stats([x.wall_s for x in a]), _bench.stats([y.wall_s for y in b])
        mon = _bench.stats([y.monitor_cpu_s for y in b])
        events, read = _bench.stats([y.events for y in b]), _bench.stats([y.read for y in b])
        alerts = sorted({rule for y in b for rule in y.alerts})
        ok = wall.median <= TARGET
        if not ok:
            missed_names.append(name)
        what = WHAT[name].format(c=sizes.c_files, t=sizes.tests, w=sizes.wheel_modules, g=f"{sizes.git_files:,}")
        rows.append(f"| {name}: {what} | {ta.median:.2f} s | {tb.median:.2f} s | **{_bench.pct(wall.median)}** "
                    f"({_bench.pct(wall.lo)} – {_bench.pct(wall.hi)}) | {_bench.pct(cpu.median)} "
                    f"({_bench.pct(cpu.lo)} – {_bench.pct(cpu.hi)}) | {mon.median * 1000:.0f} ms | "
                    f"{events.median:,.0f} / {read.median:,.0f} | {', '.join(alerts) if alerts else 'none'} | "
                    f"{'met' if ok else 'MISSED'} |")
    total = _bench.stats([sum(monitored[n][i].wall_s for n in WORKLOADS)
                          / sum(contained[n][i].wall_s for n in WORKLOADS) for i in range(rounds)])
    total_cpu = _bench.stats([sum(monitored[n][i].cpu_s for n in WORKLOADS)
                              / sum(contained[n][i].cpu_s for n in WORKLOADS) for i in range(rounds)])
    total_ok = total.median <= TARGET
    drops = sum(y.drops for runs in monitored.values() for y in runs)
    bpf_note = (f"BPF programs loaded on the host by others at the start of each contained run: "
                f"{min(others_bpf)}–{max(others_bpf)} (they cost both kinds of run alike)."
                if others_bpf else "BPF programs loaded by others: unknown (no bpftool).")
    load = os.getloadavg()
    verdict = "met" if total_ok else "MISSED"
    lines = [
        "## Workload overhead: what watching costs real agent workloads",
        "",
        f"`.venv/bin/python benchmarks/workload_overhead.py`: {rounds} round{'s' if rounds != 1 else ''}; each is "
        "a block of the four workloads run *contained* and a block of them run *monitored* (contained first in "
        "odd rounds, monitored first in even ones), each run in a fresh sandbox with a fresh copy of its files. "
        "Timed is the step alone "
        "(`sb.exec(COMMAND)` and its contained equivalent), not making or removing the sandbox. Nothing is "
        f"downloaded: the wheels are built locally as zip files. The whole run took {elapsed:.0f} s.",
        "",
        *_bench.machine_lines(m),
        "",
        "- *contained*: the containment alone, with no BPF loaded by corral at all: a sandbox cgroup (every "
        "hierarchy, no limits, like the default policy), a corral network namespace (loopback and a veth to the "
        "host, no route out), a holder `sleep infinity` started with `fs.sandbox_argv` (setpriv + bubblewrap: "
        "the same mounts and uid) and the step entered with `fs.enter_argv` (nsenter + setpriv + setsid), "
        "waited for as `Sandbox.exec` waits. No canaries in its home. (`Sandbox` has no switch to leave the "
        "monitor out, so this is built from the same modules.)",
        "- *monitored*: the normal `corral.Sandbox(workdir=...)`: the same containment plus the sensor, egress "
        "guard, flow sniffer and exec guard loaded and watching the step, and the pipeline thread enriching every "
        "event and running the default rules. Each monitored block is a child process that loads all that, runs "
        "the four steps and exits, so nothing of it is loaded during the contained runs. (A process per run would "
        "pair runs more tightly, but unloading the sensor takes about 4 s here: `Monitor.close()` waits on the "
        "kernel detaching its tracepoint programs.)",
        "",
        "Added time is monitored / contained within a round, then the median (min – max) over rounds. CPU is the "
        "sandbox cgroup's CPU time: the kernel side of the sensor runs in the step's own processes and is in it; "
        "the pipeline thread (*monitor CPU*, its CPU time during the step) is not, though on 2 cores it competes "
        "with the step for them. *Events*: delivered to the sandbox / read from the ring (corral's own launcher "
        "included), medians per run.",
        "",
        "| workload | contained | monitored | wall time added | CPU time added | monitor CPU | events | alerts "
        "| target |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        f"**All four together: {_bench.pct(total.median)} wall time** ({_bench.pct(total.lo)} – "
        f"{_bench.pct(total.hi)}), {_bench.pct(total_cpu.median)} CPU time ({_bench.pct(total_cpu.lo)} – "
        f"{_bench.pct(total_cpu.hi)}); target ≤ {_bench.pct(TARGET)} wall time, median: **{verdict}** for the four "
        "together"
        + (f", **MISSED** by {', '.join(missed_names)} on its own." if missed_names else ", and met by each."),
        "",
        f"{drops:,} records dropped by the kernel. {bpf_note} Load average at the end: {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}. On this shared 2-core machine other people's work comes and goes within "
        "seconds, which is what the min – max spreads mostly show; CPU time is the cgroup's as this guest's "
        "kernel counts it, so time the hypervisor gives to other guests inflates it too.",
        "",
        *quiet_lines(contained, monitored, rounds),
    ]
    return lines, bool(missed_names) or not total_ok


def quiet_lines(contained: dict[str, list[Run]], monitored: dict[str, list[Run]], rounds: int) -> list[str]:
    """How busy other people kept the machine during the runs, and the figures over the rounds in
    which they did not: on a shared machine those are the closest to what a quiet host would see."""
    runs = [r for kind in (contained, monitored) for runs in kind.values() for r in runs]
    share = _bench.stats([r.others_share for r in runs])
    quiet = [i for i in range(rounds)
             if all(k[n][i].others_share < QUIET_SHARE for k in (contained, monitored) for n in WORKLOADS)]
    lines = [f"*Others*: during a run, processes other than the step and this benchmark's own (from /proc/stat, "
             f"time stolen by the hypervisor included) used {share.median:.0%} of the machine's CPUs (median; "
             f"{share.lo:.0%} – {share.hi:.0%}). "]
    if not quiet:
        lines[0] += f"No round was quiet (others under {QUIET_SHARE:.0%} during every run of the round)."
        return lines
    total = _bench.stats([sum(monitored[n][i].wall_s for n in WORKLOADS)
                          / sum(contained[n][i].wall_s for n in WORKLOADS) for i in quiet])
    per_workload = {n: _bench.stats([monitored[n][i].wall_s / contained[n][i].wall_s for i in quiet])
                    for n in WORKLOADS}
    per = ", ".join(f"{n} {_bench.pct(st.median)}" for n, st in per_workload.items())
    lines[0] += (f"Over the {len(quiet)} quiet round{'s' if len(quiet) != 1 else ''} (others under "
                 f"{QUIET_SHARE:.0%} during every run of the round): all four {_bench.pct(total.median)} wall time "
                 f"({_bench.pct(total.lo)} – {_bench.pct(total.hi)}); {per}.")
    return lines


if __name__ == "__main__":
    sys.exit(main())
