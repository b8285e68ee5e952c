"""How the monitor scales with the number of sandboxes it watches at once.

N sandboxes (1, 10, 100 and 500; --quick: 1 and 10) live in this one process and share one Monitor
and its pipeline thread, as `corral.Sandbox` does by default.  At each level:

  1. make the N sandboxes, 8 at a time (a thread pool), and time it;
  2. idle for 2 s: what the pipeline thread costs with N sandboxes and nothing happening;
  3. three pairs of rounds, of loop length K and 3K (in turn K first, 3K first, K first): in each
     round every sandbox runs one step at once
     (a thread per sandbox, as an RL trainer would), each blocked at first on `read go <
     /workspace/go` (a FIFO) until all N are running and their launch has been read, then
     released together:

         for i in $(seq K); do cat /etc/hostname >/dev/null; done; cat "$HOME/.aws/credentials" >/dev/null

     K = max(8, 4000 / N), so every level does about the same work (each `cat` is a fork, an exec
     and an exit: three events), and each step ends by opening its canary credentials, a critical
     alert ("Canary credential opened", action cut_network);
  4. close the N sandboxes, 8 at a time, and time it.

Measured over each release-to-last-event window: the pipeline thread's CPU time (its own thread
CPU clock, user + system), the events it read from the ring (Monitor.read, wrapped to count), the
events delivered to the sandboxes, records dropped, this process's VmRSS (sampled every 50 ms) and
VmHWM, and for each canary alert the latency from the kernel's timestamp of the open
(CLOCK_BOOTTIME) to the sandbox's on_alert callback (after the response action).

Two costs per event: the CPU per event read in the K rounds (all the window's work / its events,
N steps' ends and 2N alerts included, which at 500 sandboxes and K = 8 are a good part of it), and
the marginal cost: what the 2K more loop iterations of a 3K round cost over the K round of its pair,
per extra event read: the work each event adds with N sandboxes watched, which is what "flat in the
number of sandboxes" asks of the pipeline.  The rest of a K round, over N, is the fixed cost of a step.

    .venv/bin/python benchmarks/scale.py              # ~4 minutes, updates the doc
    .venv/bin/python benchmarks/scale.py --quick      # ~20 seconds, prints only
    .venv/bin/python benchmarks/scale.py --levels 1,50,200 --no-doc
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import _bench

from corral import Sandbox
from corral.detect.engine import Alert

LEVELS = (1, 10, 100, 500)
QUICK_LEVELS = (1, 10)
TOTAL_ITERATIONS = 4000  # `cat`s per round, over all sandboxes
QUICK_ITERATIONS = 600
MIN_ITERATIONS = 8
ROUNDS = 3
LONG = 3  # the second round of each pair runs LONG * K iterations
STEP_COST_MIN_N = 100  # fewer steps per round, and the fixed cost per step is mostly the round's noise
IDLE_S = 2.0
CREATE_WORKERS = 8
RSS_TARGET_MB = 300
FLAT_TARGET = 1.5  # per-event cost at every level within 1.5x of the lowest level's
CANARY_RULE = "Canary credential opened"
GO_TIMEOUT_S = 120.0
STEP = ('read go < /workspace/go && for i in $(seq {k}); do cat /etc/hostname >/dev/null; done; '
        'cat "$HOME/.aws/credentials" >/dev/null')


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class RssSampler:
    """The highest VmRSS of this process while it runs (every 50 ms)."""

    def __init__(self) -> None:
        self.peak_kb = status_kb("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, status_kb("VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, status_kb("VmRSS"))
        return self.peak_kb


@dataclass
class Counter:
    """Events the pipeline read from the ring: Monitor.read, wrapped."""

    read: int = 0
    largest: int = 0  # the largest batch one read returned

    def wrap(self, read: Callable[..., list]) -> Callable[..., list]:  # type: ignore[type-arg]
        def counting(timeout: float = 0.0) -> list:  # type: ignore[type-arg]
            batch = read(timeout)
            self.read += len(batch)
            self.largest = max(self.largest, len(batch))
            return batch
        return counting


@dataclass
class Round:
    k: int
    wall_s: float
    monitor_cpu_s: float
    process_cpu_s: float
    monitor_wait_s: float  # runnable but waiting for a CPU (schedstat)
    read: int
    delivered: int
    drops: int
    rss_peak_kb: int
    latencies_ms: list[float]
    alerts: int
    fds: int
    largest_batch: int

    @property
    def per_event_us(self) -> float:
        return self.monitor_cpu_s / self.read * 1e6 if self.read else float("nan")


@dataclass
class Level:
    n: int
    k: int
    create_s: float = 0.0
    close_s: float = 0.0
    idle_cpu_pct: float = 0.0
    rss_after_create_kb: int = 0
    rounds: list[Round] = field(default_factory=list)  # loop length K
    long_rounds: list[Round] = field(default_factory=list)  # LONG * K, each right after rounds[i]
    error: str = ""

    @property
    def all_rounds(self) -> list[Round]:
        return self.rounds + self.long_rounds

    def marginal_us(self) -> list[float]:
        """Per pair of rounds: the monitor CPU the extra events of the long round cost, per event."""
        return [(b.monitor_cpu_s - a.monitor_cpu_s) / (b.read - a.read) * 1e6
                for a, b in zip(self.rounds, self.long_rounds, strict=False) if b.read > a.read]

    def per_step_us(self) -> list[float]:
        """Per pair: the K round's monitor CPU less its events at the marginal cost, per step."""
        return [(a.monitor_cpu_s * 1e6 - m * a.read) / self.n
                for a, m in zip(self.rounds, self.marginal_us(), strict=False)]


class Scale:
    def __init__(self) -> None:
        self.latencies: dict[int, float] = {}  # sandbox id -> ms, for the current round
        self.alerts = 0
        self.counter = Counter()
        self._lock = threading.Lock()
        with Sandbox() as warm:  # loads the shared Monitor, guards and pipeline once
            warm.exec("true")
            self.monitor = warm.monitor
            self.pipeline = warm.pipeline
        self.monitor.read = self.counter.wrap(self.monitor.read)  # type: ignore[method-assign]
        self.clock = time.pthread_getcpuclockid(self.pipeline.ident or 0)

    def monitor_cpu_s(self) -> float:
        return time.clock_gettime(self.clock)

    def monitor_wait_s(self) -> float:
        """Time the pipeline thread was runnable but waiting for a CPU (its schedstat); 0 if unknown."""
        found = _bench.schedstat(self.pipeline.native_id)
        return found[1] / 1e9 if found is not None else 0.0

    def on_alert(self, alert: Alert) -> None:
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        with self._lock:
            self.alerts += 1
            if alert.rule == CANARY_RULE and alert.sandbox_id not in self.latencies:
                self.latencies[alert.sandbox_id] = (now - alert.event.ts_ns) / 1e6

    # -- one level ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def sandboxes(self, level: Level) -> Iterator[list[Sandbox]]:
        made: list[Sandbox] = []
        lock = threading.Lock()

        def make() -> None:
            sb = Sandbox(on_alert=self.on_alert)
            sb.start()
            with lock:
                made.append(sb)
            fifo = sb.workspace / "go"
            os.mkfifo(fifo, 0o600)
            host_uid, host_gid = sb.layout.host_uid, sb.layout.host_gid
            os.chown(fifo, host_uid, host_gid)

        # The pool's threads must outlive the sandboxes they made: bwrap's --die-with-parent is the
        # kernel's PR_SET_PDEATHSIG, which fires when the *thread* that started the holder exits.
        pool = ThreadPoolExecutor(CREATE_WORKERS, thread_name_prefix="create")
        t0 = time.monotonic()
        try:
            for f in [pool.submit(make) for _ in range(level.n)]:
                f.result()
            level.create_s = time.monotonic() - t0
            yield made
        finally:
            t0 = time.monotonic()
            list(pool.map(lambda sb: sb.close(), made))
            level.close_s = time.monotonic() - t0
            pool.shutdown()

    def idle(self, seconds: float) -> float:
        self.pipeline.flush()
        c0, t0 = self.monitor_cpu_s(), time.monotonic()
        time.sleep(seconds)
        return (self.monitor_cpu_s() - c0) / (time.monotonic() - t0) * 100

    def round(self, boxes: list[Sandbox], k: int) -> Round:
        command = STEP.format(k=k)
        self.latencies = {}
        alerts0 = self.alerts

        def step(sb: Sandbox) -> int:
            res = sb.exec(command)
            if res.exit_code != 0:
                raise RuntimeError(f"a step failed (exit {res.exit_code}): {res.stderr.strip()[-500:]}")
            return 0

        delivered0 = sum(len(sb.events) for sb in boxes)
        pool = ThreadPoolExecutor(len(boxes), thread_name_prefix="step")
        futures: list[Future[int]] = []
        fds: list[int] = []
        try:
            futures = [pool.submit(step, sb) for sb in boxes]
            fds = self.open_fifos(boxes, futures)  # returns once every step waits on its FIFO
            corral_fds = open_fds() - len(fds)
            self.pipeline.flush()  # the launchers' events are read: what follows is the loop's
            sampler = RssSampler()
            read0, drops0 = self.counter.read, self.monitor.drops
            self.counter.largest = 0
            c0, p0, w0, t0 = self.monitor_cpu_s(), time.process_time(), self.monitor_wait_s(), time.perf_counter()
            for fd in fds:
                os.write(fd, b"go\n")
            for fd in fds:
                os.close(fd)
            fds = []
            codes = [f.result() for f in futures]
            self.pipeline.flush()
            wall = time.perf_counter() - t0
            cpu, process_cpu = self.monitor_cpu_s() - c0, time.process_time() - p0
            waited = self.monitor_wait_s() - w0
            rss = sampler.stop()
        finally:
            for fd in fds:
                os.close(fd)
            if any(not f.done() for f in futures):
                for sb in boxes:  # an interrupted round: end its steps so the threads return
                    with contextlib.suppress(Exception):
                        sb.cgroup.kill_all()
            pool.shutdown(wait=True)
        bad = [c for c in codes if c != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(boxes)} steps failed (exit {bad[0]})")
        return Round(k=k, wall_s=wall, monitor_cpu_s=cpu, process_cpu_s=process_cpu, monitor_wait_s=waited,
                     read=self.counter.read - read0,
                     delivered=sum(len(sb.events) for sb in boxes) - delivered0,
                     drops=self.monitor.drops - drops0, rss_peak_kb=rss,
                     latencies_ms=sorted(self.latencies.values()), alerts=self.alerts - alerts0,
                     fds=corral_fds, largest_batch=self.counter.largest)

    @staticmethod
    def open_fifos(boxes: list[Sandbox], futures: list[Future[int]]) -> list[int]:
        """Open each sandbox's FIFO for writing once its step is reading it (non-blocking: ENXIO
        until then); all held open, so that the steps are released together."""
        pending = {sb.workspace / "go" for sb in boxes}
        fds: list[int] = []
        deadline = time.monotonic() + GO_TIMEOUT_S
        try:
            while pending:
                for path in list(pending):
                    try:
                        fds.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                        pending.discard(path)
                    except OSError as e:
                        if e.errno != 6:  # ENXIO: no reader yet
                            raise
                if pending:
                    ended = next((f for f in futures if f.done()), None)
                    if ended is not None:  # a step that ended before its release: it failed
                        error = ended.exception()
                        raise RuntimeError(f"a step ended before it was released: "
                                           f"{error or f'exit {ended.result()}'}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{len(pending)} steps did not start within {GO_TIMEOUT_S:.0f} s")
                    time.sleep(0.01)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def level(self, n: int, k: int, rounds: int) -> Level:
        level = Level(n, k)
        try:
            with self.sandboxes(level) as boxes:
                level.rss_after_create_kb = status_kb("VmRSS")
                level.idle_cpu_pct = self.idle(IDLE_S)
                for i in range(rounds):
                    # each pair's order alternates: a drift over the level (warming up, other
                    # people's load) then biases the marginal cost one way as much as the other
                    for length in (k, LONG * k) if i % 2 == 0 else (LONG * k, k):
                        (level.rounds if length == k else level.long_rounds).append(self.round(boxes, length))
                        # A sandbox keeps what it saw: its events (Sandbox.events, up to 200,000) and
                        # for every step it ran the last 500 as evidence (Sandbox._recent, until it
                        # closes).  That is the sandboxes' memory, not the monitor's, and it grows with
                        # the steps run: let go of each round's, so that RSS measures the monitor with
                        # one round's events kept at most, whatever the number of rounds.
                        for sb in boxes:
                            sb.events.clear()
                            sb._recent.clear()
        except Exception as e:  # a level that cannot be made or run: report it, stop going up
            level.error = f"{type(e).__name__}: {e}"
        return level


# -- main --------------------------------------------------------------------------------------------

def pct_of(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> int:
    p = _bench.common_args(__doc__ or "")
    p.add_argument("--levels", help="comma-separated numbers of sandboxes (default 1,10,100,500; --quick 1,10)")
    args = p.parse_args()
    _bench.require_host()
    levels = tuple(int(x) for x in args.levels.split(",")) if args.levels else (
        QUICK_LEVELS if args.quick else LEVELS)
    total = QUICK_ITERATIONS if args.quick else TOTAL_ITERATIONS
    rounds = 1 if args.quick else ROUNDS
    m = _bench.machine()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    results: list[Level] = []
    t_start = time.monotonic()
    with _bench.terminate_as_exit():
        scale = Scale()
        for n in levels:
            k = max(MIN_ITERATIONS, total // n)
            level = scale.level(n, k, rounds)
            results.append(level)
            print(summary_line(level), flush=True)
            if level.error:
                break
    elapsed = time.monotonic() - t_start
    lines, missed = report(results, m, (soft, hard), elapsed, rounds)
    print("\n".join(lines))
    if not args.quick and not args.no_doc:
        _bench.update_doc("scale", lines)
        print(f"\nupdated {_bench.DOC.relative_to(_bench.REPO)}")
    return 1 if args.strict and missed else 0


def summary_line(level: Level) -> str:
    if not level.rounds:
        return f"{level.n} sandboxes: FAILED {level.error}"
    r = level.rounds
    per_event = statistics.median(x.per_event_us for x in r)
    marginal = level.marginal_us()
    lat = [v for x in level.all_rounds for v in x.latencies_ms]
    return (f"{level.n} sandboxes: made in {level.create_s:.1f} s, closed in {level.close_s:.1f} s; "
            f"{statistics.median(x.read / x.wall_s for x in r):,.0f} events/s, {per_event:.1f} µs/event "
            f"(marginal {statistics.median(marginal) if marginal else float('nan'):.1f}), "
            f"RSS {max(x.rss_peak_kb for x in level.all_rounds) / 1024:.0f} MB, alert latency median "
            f"{statistics.median(lat) if lat else float('nan'):.1f} ms, idle {level.idle_cpu_pct:.1f}%"
            + (f"; FAILED {level.error}" if level.error else ""))


def report(results: list[Level], m: dict[str, str], nofile: tuple[int, int], elapsed: float,
           rounds: int) -> tuple[list[str], bool]:
    cost_rows, scale_rows = [], []
    per_event_medians: list[tuple[int, float]] = []
    marginal_medians: list[tuple[int, float]] = []
    rss_at: dict[int, float] = {}
    for lv in results:
        if not lv.rounds or not lv.marginal_us():
            cost_rows.append(f"| {lv.n} | failed: {lv.error} | | | | | | | |")
            scale_rows.append(f"| {lv.n} | failed | | | | | |")
            continue
        r, every = lv.rounds, lv.all_rounds
        pe = _bench.stats([x.per_event_us for x in r])
        mg = _bench.stats(lv.marginal_us())
        step = _bench.stats(lv.per_step_us())
        eps = _bench.stats([x.read / x.wall_s for x in r])
        cpu_share = _bench.stats([x.monitor_cpu_s / x.wall_s * 100 for x in every])
        proc_share = _bench.stats([x.process_cpu_s / x.wall_s * 100 for x in every])
        wait_share = _bench.stats([x.monitor_wait_s / x.wall_s * 100 for x in every])
        lat = [v for x in every for v in x.latencies_ms]
        expected = lv.n * len(every)
        rss = max(x.rss_peak_kb for x in every) / 1024
        rss_at[lv.n] = rss
        per_event_medians.append((lv.n, pe.median))
        marginal_medians.append((lv.n, mg.median))
        base, mbase = per_event_medians[0][1], marginal_medians[0][1]
        # (one step's share of a whole round's noise: only readable with many steps)
        step_text = f"{step.median:,.0f} µs ({step.lo:,.0f} – {step.hi:,.0f})" if lv.n >= STEP_COST_MIN_N else "–"
        lat_text = (f"{statistics.median(lat):.1f} / {pct_of(lat, 0.9):.1f} / {max(lat):.1f} ms"
                    + ("" if len(lat) == expected else f" ({len(lat)} of {expected} seen)")) if lat else "none seen"
        cost_rows.append(
            f"| {lv.n} | {lv.k} | {statistics.median(x.read for x in r):,.0f} in "
            f"{statistics.median(x.wall_s for x in r):.1f} s | {eps.median:,.0f} ({eps.lo:,.0f} – {eps.hi:,.0f}) | "
            f"{cpu_share.median:.0f}% | {pe.median:.1f} µs ({pe.lo:.1f} – {pe.hi:.1f}), {pe.median / base:.2f}× | "
            f"**{mg.median:.1f} µs** ({mg.lo:.1f} – {mg.hi:.1f}), {mg.median / mbase:.2f}× | "
            f"{step_text} | {lv.idle_cpu_pct:.1f}% |")
        scale_rows.append(
            f"| {lv.n} | {lv.create_s:.1f} s / {lv.close_s:.1f} s | {lv.rss_after_create_kb / 1024:.0f} MB / "
            f"{rss:.0f} MB | {proc_share.median:.0f}% | {wait_share.median:.0f}% | "
            f"{max(x.largest_batch for x in every):,} | {lat_text} |")
    ok_levels = [lv for lv in results if lv.rounds]
    base_n, base = per_event_medians[0] if per_event_medians else (0, float("nan"))
    mbase = marginal_medians[0][1] if marginal_medians else float("nan")
    worst = max((c / base for _n, c in per_event_medians), default=float("nan"))
    worst_marginal = max((c / mbase for _n, c in marginal_medians), default=float("nan"))
    flat_ok = bool(marginal_medians) and worst_marginal <= FLAT_TARGET
    worst_pair = max((x / mbase for lv in results for x in lv.marginal_us()), default=float("nan"))
    if 500 in rss_at:
        rss_ok = rss_at[500] <= RSS_TARGET_MB
        rss_text = (f"**Monitor RSS at 500 sandboxes: {rss_at[500]:.0f} MB** (target ≤ {RSS_TARGET_MB} MB): "
                    f"{'met' if rss_ok else 'MISSED'}.")
    elif any(lv.n >= 500 for lv in results) or not rss_at:
        rss_ok = False
        rss_text = (f"**500 sandboxes were not reached** (largest level run: {max(rss_at, default=0)}): the RSS "
                    f"target (≤ {RSS_TARGET_MB} MB at 500) is MISSED, as unmeasured.")
    else:
        rss_ok = True
        top = max(rss_at)
        rss_text = (f"RSS target (≤ {RSS_TARGET_MB} MB at 500 sandboxes) not measured at these levels "
                    f"({rss_at[top]:.0f} MB at {top}).")
    failed = [lv for lv in results if lv.error]
    drops = sum(x.drops for lv in ok_levels for x in lv.all_rounds)
    fds = max((x.fds for lv in ok_levels for x in lv.all_rounds), default=0)
    hwm = status_kb("VmHWM") / 1024
    lines = [
        "## Scale: one monitor, many sandboxes",
        "",
        f"`.venv/bin/python benchmarks/scale.py`: at each level N sandboxes share this process's one Monitor "
        f"and pipeline thread (the `Sandbox` default). All N run a step at once, {rounds} pair"
        f"{'s' if rounds != 1 else ''} of rounds per level, released together from a FIFO once every one is "
        "running: `for i in $(seq K); do cat /etc/hostname >/dev/null; done; cat \"$HOME/.aws/credentials\" "
        f">/dev/null` (K = max({MIN_ITERATIONS}, {TOTAL_ITERATIONS} / N): about the same work at every level; a "
        f"`cat` is a fork, an exec and an exit), ending with a canary read: a critical alert; each pair is a round "
        f"of K and one of {LONG}K, in turn K first and {LONG}K first. The whole run took {elapsed:.0f} s.",
        "",
        *_bench.machine_lines(m),
        "",
        "| N | K | events read per K round | events/s (min – max) | monitor CPU share | monitor CPU per event read "
        "(min – max), vs lowest N | **marginal CPU per event** (min – max), vs lowest N | fixed CPU per step "
        "| monitor idle |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *cost_rows,
        "",
        "| N | make / close all | RSS after making / peak while running | whole process CPU | monitor waiting "
        "for a CPU | largest batch read | canary alert latency median / p90 / max |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *scale_rows,
        "",
        "- *monitor*: the pipeline thread (sensor read and decode, process table, detectors, rules, delivery "
        "and responses, and the sandboxes' limit counters when they may have moved), by its own thread CPU "
        "clock over the window from release to the last event read. *CPU per event read*: that CPU time / the "
        "events it read from the ring, in the K rounds: it includes each step's fixed work (its release, its "
        "end, its two alerts and their cut_network response), N steps per round, which weighs more the fewer "
        "loop events each step has (K = 8 at 500). *Marginal CPU per event*: (CPU of the "
        f"{LONG}K round − CPU of the K round) / (events read − events read), per pair: what an "
        "event costs with N sandboxes watched, the fixed work cancelled out. *Fixed CPU per step*: the K "
        f"round's CPU less its events at the marginal cost, / N (shown from N = {STEP_COST_MIN_N} on: with fewer "
        "steps it is mostly the round's noise). *idle*: the monitor's CPU share with the N "
        "sandboxes made and nothing running. The kernel side of the sensor runs in the sandboxes' processes and "
        "is not in any of it. *events/s*: what the sandboxes produced on 2 shared cores (the demand, not the "
        "monitor's capacity). *whole process*: this process's CPU share over the windows, every thread (the "
        "pipeline, and per running step its `Sandbox.exec` thread and output collector, which sleep until "
        "woken). *waiting for a CPU*: the share of the windows the pipeline thread was runnable but not "
        "running (its schedstat); time it waited for the GIL is not in it. *largest batch*: the most events "
        "one `Monitor.read()` returned; the pipeline handles a whole batch, in order, before it reads again, "
        "so an event late in a large batch waits for all before it. Shares, RSS, batches and latencies are "
        "over all rounds.",
        f"- *RSS*: this process's VmRSS, sampled every 50 ms (VmHWM at the end: {hwm:.0f} MB); it includes "
        "what the sandboxes keep of one round at most (their events, `Sandbox.events`, and the last 500 events of "
        "each step, kept as evidence until the sandbox closes: the benchmark clears both after each round, as "
        "they grow with the steps run, not with the monitor), and what earlier levels left in the heap. "
        "*latency*: kernel timestamp of the canary `open` (CLOCK_BOOTTIME) to the sandbox's `on_alert` callback, "
        f"which runs after the response (cut_network); one per sandbox per round. {drops:,} records dropped by "
        "the kernel.",
        f"- File descriptors: up to {fds:,} open in this process while the steps ran (about 230 for the loaded "
        "BPF objects, one per sandbox for its holder's stderr, two per running step); the limit here is "
        f"{nofile[0]:,} (soft) / {nofile[1]:,} (hard). With the common default soft limit of 1,024 about "
        "260 sandboxes running a step at once would run out (`ulimit -n` must be raised first).",
        "- Sandboxes are made from a pool of 8 threads kept alive until they are closed: bwrap's "
        "`--die-with-parent` is `PR_SET_PDEATHSIG`, which fires when the *thread* that started the holder "
        "exits, so a sandbox made in a short-lived thread dies with it (and its next step fails in nsenter).",
        "",
        f"**Per-event cost vs number of sandboxes: worst level {worst_marginal:.2f}× the {base_n}-sandbox "
        f"marginal cost** (target: flat, within {FLAT_TARGET}×, by the medians): {'met' if flat_ok else 'MISSED'}"
        + (f" (but single pairs reached {worst_pair:.2f}×)" if flat_ok and worst_pair > FLAT_TARGET else "")
        + f"; CPU per event read, the steps' fixed work included: worst level {worst:.2f}×. {rss_text}",
    ]
    if failed:
        lines += ["", *(f"Level {lv.n} failed: {lv.error}" for lv in failed)]
    return lines, not flat_ok or not rss_ok or bool(failed)


if __name__ == "__main__":
    sys.exit(main())
