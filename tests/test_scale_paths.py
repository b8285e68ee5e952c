"""What keeps one pipeline cheap with many sandboxes: limit counters looked at only when they may have
moved (cgroups.LimitWatch), v1 step counters kept once a step is over, a step's first process learned
from its exec (not from /proc), the CPU detector reading /proc only for processes old enough to
conclude, and Sandbox.exec sleeping until its step ends, an alert or its timeout wakes it.

Every cgroup, sandbox and process a test makes is removed or killed by the test (by pid, or with the
cgroup it made), also when it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from corral import Monitor, Sandbox
from corral import events as ev
from corral.detect.detectors import cpu as cpu_mod
from corral.detect.detectors.cpu import CpuSaturationDetector
from corral.detect.detectors.cred import CredThenEgressDetector
from corral.enrich import proctable
from corral.sandbox import cgroups
from corral.sandbox.cgroups import Limits, LimitWatch, SandboxCgroup, sandbox_name
from corral.sandbox.runner import STATE_DIR, SandboxFrozen
from corral.sensor import host

NS = 1_000_000_000
RULES = Path(__file__).parent / "rules" / "respond.yaml"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, the sensor, sandboxes)")


# ---------------------------------------------------------------------------- LimitWatch, on its own


class FakeCgroup:
    """What LimitWatch asks of a SandboxCgroup, with the answers set by the test."""

    def __init__(self, counters: dict[str, Path] | None = None, pids_max: int | None = 32, current: int = 3,
                 kept: tuple[str, ...] = ("oom_kill", "pids_max"), peak: int | None = 3) -> None:
        self.counters = counters or {}
        self.pids_max = pids_max
        self.current = current
        self.kept = kept
        self.peak = peak

    def notifying_counters(self) -> dict[str, Path]:
        return self.counters

    def events(self) -> dict[str, int]:
        return dict.fromkeys(self.kept, 0)

    def pids_limit(self) -> int | None:
        return self.pids_max

    def pids_current(self) -> int:
        return self.current

    def pids_peak(self) -> int | None:
        return self.peak


def add(watch: LimitWatch, key: int, fake: FakeCgroup) -> FakeCgroup:
    watch.add(key, cast(SandboxCgroup, fake))
    return fake


@pytest.fixture
def watch() -> Iterator[LimitWatch]:
    w = LimitWatch(sweep=10**6)  # no sweep within a test unless it asks for one
    yield w
    w.close()


def test_forks_near_the_pids_limit_make_a_sandbox_due_until_it_is_below(watch: LimitWatch) -> None:
    fake = add(watch, 1, FakeCgroup(pids_max=32, current=3))  # near from 24 on (32 - 8)
    for _ in range(20):
        watch.forked(1)
    assert watch.due() == []  # 23 tasks: no fork can have been refused
    watch.forked(1)
    fake.current = 32  # what the kernel counts when it is looked at
    assert watch.due() == [1]
    assert watch.due() == [1]  # still at the limit: looked at every tick
    fake.current = 5
    assert watch.due() == [1]  # (the look that finds it below)
    assert watch.due() == []
    for _ in range(10):
        watch.exited(1, killed=False)
        watch.forked(1)
    assert watch.due() == []  # busy, but nowhere near the limit


def test_a_sigkill_exit_makes_a_sandbox_due_for_its_oom_counter(watch: LimitWatch) -> None:
    add(watch, 1, FakeCgroup())
    add(watch, 2, FakeCgroup(kept=("pids_max",)))  # no memory counter on this "host"
    watch.exited(1, killed=False)
    assert watch.due() == []
    watch.exited(1, killed=True)
    watch.exited(2, killed=True)
    assert watch.due() == [1]


def test_the_sweep_looks_at_sandboxes_whose_pids_peak_reached_their_limit() -> None:
    """Threads make no fork events: every `sweep` ticks each sandbox with a pids limit has its
    pids.peak read, and is looked at if it was ever at its limit (where a refusal can have been)."""
    watch = LimitWatch(sweep=5)
    try:
        for key in range(1, 13):  # 1-6 were at their limit once, 7-12 never
            add(watch, key, FakeCgroup(pids_max=32, peak=32 if key <= 6 else 10))
        add(watch, 13, FakeCgroup(pids_max=None))  # no limit of its own: nothing to refuse
        add(watch, 14, FakeCgroup(peak=None))  # a kernel without pids.peak: looked at each time
        seen = [key for _ in range(5) for key in watch.due()]
        assert sorted(seen) == [1, 2, 3, 4, 5, 6, 14]
        watch.remove(3)
        seen = [key for _ in range(5) for key in watch.due()]
        assert sorted(seen) == [1, 2, 4, 5, 6, 14]
    finally:
        watch.close()


def test_everything_after_lost_records(watch: LimitWatch) -> None:
    for key in (1, 2, 3):
        add(watch, key, FakeCgroup())
    watch.remove(2)
    watch.everything()
    assert sorted(watch.due()) == [1, 3]
    assert watch.due() == []


def test_lost_records_look_at_oom_counters_only_if_the_host_killed_something(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost exit record may have been an OOM victim's: the host's OOM kill count says whether any
    process was OOM-killed since (lost forks are the sweep's)."""
    host_ooms = [7]
    monkeypatch.setattr(cgroups, "_host_oom_kills", lambda: host_ooms[0])
    watch = LimitWatch(sweep=10**6)
    try:
        add(watch, 1, FakeCgroup())
        add(watch, 2, FakeCgroup(kept=("pids_max",)))
        watch.records_lost()
        assert watch.due() == []
        host_ooms[0] = 8
        watch.records_lost()
        assert watch.due() == [1]
        watch.records_lost()
        assert watch.due() == []
    finally:
        watch.close()


def test_notified_counters_need_no_inference_and_no_sweep(tmp_path: Path) -> None:
    """Files the kernel notifies (v2's memory.events and pids.events; regular files here, which
    inotify treats alike): a change makes the sandbox due, and nothing else does."""
    files = {"memory": tmp_path / "memory.events", "pids": tmp_path / "pids.events"}
    for f in files.values():
        f.write_text("max 0\n")
    watch = LimitWatch(sweep=1)  # would sweep every sandbox every tick, if it had to
    try:
        add(watch, 1, FakeCgroup(counters=files, pids_max=4, current=4))
        for _ in range(10):
            watch.forked(1)
        watch.exited(1, killed=True)
        assert watch.due() == []
        files["pids"].write_text("max 1\n")
        assert watch.due() == [1]
        assert watch.due() == []
        files["memory"].write_text("oom_kill 1\n")
        watch.remove(1)
        assert watch.due() == []
    finally:
        watch.close()


# ---------------------------------------------------------------------------- v1 step counters, for real


@pytest.fixture
def made() -> Iterator[list[SandboxCgroup]]:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    made: list[SandboxCgroup] = []
    try:
        yield made
    finally:
        for sb in made:
            sb.destroy()  # kills what the test started in it


BOMB = """
import os, time
kids = []
try:
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(0.5)
            os._exit(0)
        kids.append(pid)
except OSError:
    pass
for pid in kids:
    os.waitpid(pid, 0)
"""


def run_in(step: cgroups.StepCgroup, code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], preexec_fn=step.joiner(), timeout=60).returncode


def test_refused_forks_stay_counted_once_a_step_is_over(made: list[SandboxCgroup]) -> None:
    sb = SandboxCgroup(sandbox_name(), Limits(pids=12))
    made.append(sb)
    first, second = sb.new_step(1), sb.new_step(2)
    assert sb.events().get("pids_max", 0) == 0  # (both empty: the second is not over, only not started)
    assert run_in(first, BOMB) == 0
    after_first = sb.events()["pids_max"]
    assert after_first > 0
    assert sb.events()["pids_max"] == after_first  # over: read once, kept
    assert run_in(second, BOMB) == 0
    assert sb.events()["pids_max"] > after_first


def test_a_step_process_is_learned_from_its_exec(made: list[SandboxCgroup], monitor: Monitor,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """corral's child joins the v2 cgroup (which the sensor watches) last: nothing it does before its
    exec is reported, so the process table does not read /proc for it."""
    sb = SandboxCgroup(sandbox_name(), Limits())
    made.append(sb)
    step = sb.new_step(1)
    read: list[int] = []
    real = proctable._read_proc

    def recording(pid: int) -> proctable.Process | None:
        read.append(pid)
        return real(pid)

    monkeypatch.setattr(proctable, "_read_proc", recording)
    monitor.read()
    monitor.watch_cgroup(step.id, sandbox_id=4242, step_id=1)
    try:
        proc = subprocess.Popen(["/bin/true"], preexec_fn=step.joiner())
        proc.wait(timeout=30)
        mine: list[ev.Event] = []
        deadline = time.monotonic() + 10
        while not any(e.type == ev.EXIT for e in mine) and time.monotonic() < deadline:
            mine += [e for e in monitor.read(timeout=0.1) if e.pid == proc.pid]
    finally:
        monitor.unwatch_cgroup(step.id)
    assert [e.kind for e in mine][:1] == ["exec"] and mine[-1].kind == "exit"
    assert proc.pid not in read


# ---------------------------------------------------------------------------- the CPU detector's reads


def sys_event(kind: str, ts_ns: int, pid: int, *args: int, ppid: int = 1) -> ev.Event:
    values = (ts_ns, 77, ev.KIND_IDS[kind], pid, pid, ppid, 0, 5, 1, b"x", *args, *[0] * (4 - len(args)),
              b"", b"", b"")
    return {"fork": ev.ForkEvent, "exec": ev.ExecEvent}[kind].from_tuple(values)


def test_cpu_detector_reads_a_process_only_once_it_could_conclude(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes learned from their fork or exec are not read from /proc before the window could be
    full; one that was much older than it was taken to be (learned at an exec long after it started)
    is sampled from that first read on."""
    tick_ns = host.TICK_NS
    t0 = 1000 * NS
    started = {200: t0, 300: t0 - 10_000_000, 400: t0 - 100 * NS}  # 300: a step's command, seen at its exec
    reads: list[int] = []
    clock = [t0]

    def cpu_ns(pid: int) -> tuple[int, int]:  # each pinned a CPU since it started
        reads.append(pid)
        return started[pid] // tick_ns, clock[0] - started[pid]

    monkeypatch.setattr(cpu_mod, "_cpu_ns", cpu_ns)
    det = CpuSaturationDetector(percent=40, seconds=2.0)
    det.feed(sys_event("fork", t0, 100, 200))
    det.feed(sys_event("exec", t0, 300))
    det.feed(sys_event("exec", t0, 400))
    found: list[ev.DerivedEvent] = []
    for now in range(t0 + NS // 2, t0 + 2 * NS, NS // 2):
        clock[0] = now
        found += det.tick(now)
    assert reads == [] and found == []
    clock[0] = t0 + 2 * NS
    found += det.tick(clock[0])
    assert sorted(reads) == [200, 300, 400]
    assert sorted(e.pid for e in found) == [200, 300] and all(e.data["seconds"] >= 2.0 for e in found)
    for now in range(t0 + 5 * NS // 2, t0 + 9 * NS // 2, NS // 2):
        clock[0] = now
        found += det.tick(now)
    assert [e.pid for e in found].count(400) == 1  # 2 s after its first read


def open_event(ts_ns: int, step: int, path: str) -> ev.FileEvent:
    t = (ts_ns, 0, ev.OPEN, 41, 41, 1, 0, 3, step, b"cat", 3, 0, 1, 0, 0, path.encode(), b"")
    e = ev.FileEvent.from_tuple(t)
    assert isinstance(e, ev.FileEvent)
    return e


def flow_out(ts_ns: int, step: int) -> ev.DerivedEvent:
    return ev.DerivedEvent.make("flow", ts_ns=ts_ns, sandbox_id=3, step_id=step, pid=42, direction="out",
                                dip="203.0.113.10", dport=443, l7="tls")


def test_cred_reads_expire_by_their_time_not_by_a_scan_of_every_step() -> None:
    det = CredThenEgressDetector(seconds=10, before_s=0)
    t0 = 1000 * NS
    assert det.feed(open_event(t0, 1, "/home/a/.env")) == []
    assert det.feed(open_event(t0, 2, "/home/a/.env")) == []
    assert det.feed(open_event(t0 + 8 * NS, 1, "/home/a/.env")) == []  # read again: its window starts anew
    det.tick(t0 + 11 * NS)
    assert (3, 2, 0) not in det._steps  # step 2's only read is over: the step is forgotten
    (hit,) = det.feed(flow_out(t0 + 13 * NS, 1))
    assert hit.data["seconds"] == 5.0
    det.feed(open_event(t0 + 14 * NS, 1, "/home/a/.aws/credentials"))
    det.tick(t0 + 25 * NS)
    assert det.feed(flow_out(t0 + 26 * NS, 1)) == []  # both reads over
    assert (3, 1, 0) in det._steps  # (what was reported stays)


# ---------------------------------------------------------------------------- Sandbox.exec's wait


@needs_root
def test_a_timeout_kills_a_step_whose_children_hold_its_output() -> None:
    with Sandbox() as sb:
        res = sb.exec("sleep 60 & sleep 60", timeout=1.0)
        assert res.exit_code == 137
        assert sb.exec(["echo", "next"]).stdout == "next\n"


@pytest.fixture(scope="module")
def own_monitor() -> Iterator[Monitor]:
    """A monitor of this module's own, so its pipeline loads tests/rules/respond.yaml."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with Monitor() as mon:
        yield mon


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_step_frozen_by_a_rule_returns_while_its_processes_would_run_on(own_monitor: Monitor) -> None:
    sb = Sandbox(monitor=own_monitor, rules=[RULES])
    try:
        with sb:
            # frozen, the step's processes never end (nor close its output) until thawed: only the
            # wake after the alert ends the wait
            t, out = in_thread(lambda: sb.exec(["sh", "-c", "sleep 600", "corral-test-freeze"]))
            t.join(120)  # (a guard against hanging the suite, not a measurement)
            assert not t.is_alive() and isinstance(out[0], SandboxFrozen)
            assert sb.frozen and sb.cgroup.frozen
            sb.release()
            assert sb.exec("true").exit_code == 0
    finally:
        shutil.rmtree(STATE_DIR / "evidence" / sb.name, ignore_errors=True)  # the freeze's bundle


@needs_root
def test_a_thread_bomb_at_the_pids_limit_is_found_by_the_sweep() -> None:
    """Threads make no fork events, so only the sweep (every sandbox every few seconds) sees their
    refusals on a host whose pids counters do not notify (v1); on v2 inotify does."""
    code = ("import threading, time\nn = 0\ntry:\n    while True:\n"
            "        threading.Thread(target=time.sleep, args=(3,), daemon=True).start(); n += 1\n"
            "except RuntimeError:\n    pass\nprint(n)\ntime.sleep(8)\n")
    with Sandbox(mode="observe", pids=24) as sb:
        t, out = in_thread(lambda: sb.exec(["python3", "-c", code], timeout=60))
        deadline = time.monotonic() + 30  # (a guard: the sweep comes within seconds)
        while time.monotonic() < deadline and not [a for a in sb.alerts if a.event.kind == "limit_hit"]:
            time.sleep(0.1)
        t.join(60)
    hits = [a for a in sb.alerts if a.event.kind == "limit_hit"]
    assert hits and isinstance(hits[0].event, ev.DerivedEvent)
    assert hits[0].event.data["resource"] == "pids" and hits[0].step == 1
    assert not isinstance(out[0], BaseException)


def test_sigkill_reaches_the_pipeline_as_an_exit_signal(made: list[SandboxCgroup], monitor: Monitor) -> None:
    """What `LimitWatch.exited(killed=...)` is told from: an exit event's signal."""
    sb = SandboxCgroup(sandbox_name(), Limits())
    made.append(sb)
    step = sb.new_step(1)
    monitor.read()
    monitor.watch_cgroup(step.id, sandbox_id=4343, step_id=1)
    try:
        proc = subprocess.Popen(["sleep", "60"], preexec_fn=step.joiner())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        exits: list[ev.Event] = []
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            exits += [e for e in monitor.read(timeout=0.1) if e.pid == proc.pid and e.type == ev.EXIT]
    finally:
        monitor.unwatch_cgroup(step.id)
    assert isinstance(exits[0], ev.ExitEvent) and exits[0].signal == signal.SIGKILL
