"""The sandbox's cgroups, on real cgroups with real processes.

Every sandbox a test makes is destroyed, and every process it starts is killed by pid and reaped, even
when the test fails.  On a hybrid host (v1 controllers + v2 unified) this exercises the v1 controllers;
`test_v2_only_layout` runs the pure-v2 code on the unified hierarchy by hiding the v1 mounts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from corral.errors import CorralError
from corral.sandbox import cgroups
from corral.sandbox.cgroups import Limits, SandboxCgroup, StepCgroup, parse_size, reap_stale, sandbox_name
from corral.sensor.host import cgroup2_root

MakeSandbox = Callable[..., SandboxCgroup]


class Spawn(Protocol):
    def __call__(self, step: StepCgroup, code: str, *args: str) -> subprocess.Popen[bytes]: ...


# Every helper process ends by itself after this long, whatever happens to the test.
SELF_LIMIT_S = 20
COUNTER = f"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
end = time.time() + {SELF_LIMIT_S}
while time.time() < end:
    os.write(fd, b"x")
    time.sleep(0.01)
"""


@pytest.fixture
def make() -> Iterator[MakeSandbox]:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    made: list[SandboxCgroup] = []

    def make(limits: Limits | None = None, name: str | None = None) -> SandboxCgroup:
        sb = SandboxCgroup(name or sandbox_name(), limits or Limits())
        made.append(sb)
        return sb

    try:
        yield make
    finally:
        for sb in made:
            sb.destroy()


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a Python snippet inside a step, the way the runner will: the child writes its own pid
    into every cgroup.procs file before exec, so nothing it does escapes the step."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(step: StepCgroup, code: str, *args: str) -> subprocess.Popen[bytes]:
        files = step.procs_files()

        def enter() -> None:
            for f in files:
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))

        proc = subprocess.Popen([sys.executable, "-c", code, *args], preexec_fn=enter,
                                stderr=subprocess.DEVNULL)
        started.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def all_dirs(sb: SandboxCgroup) -> list[Path]:
    """The sandbox's directory in every hierarchy: v2 first, then each v1 mount once."""
    v1 = dict.fromkeys(m / "corral" / sb.name for m in cgroups._v1_mounts().values())
    return [cgroup2_root() / "corral" / sb.name, *v1]


def cgroup_paths(pid: int) -> dict[str, str]:
    """/proc/PID/cgroup as {controllers: path}; v2's line has controllers ""."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return {ctrls: path for _, ctrls, path in (line.split(":", 2) for line in lines)}


# ---------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(("text", "expected"), [
    ("1048576", 1048576), ("512M", 512 << 20), ("1G", 1 << 30), ("1.5g", 3 << 29), ("64k", 65536),
    ("2 GiB", 2 << 30), ("10MB", 10 << 20), (" 7 ", 7), (".5K", 512), ("100b", 100),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("junk", ["", "M", "12Q", "1.2.3G", "-5M", "1e6", "lots", "100ib", "5Ki"])
def test_parse_size_rejects_junk(junk: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(junk)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cpus": 0.001}, "at least 0.01"), ({"memory_bytes": 0}, "positive"), ({"pids": -1}, "positive"),
])
def test_limits_are_validated(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_sandbox_name_records_the_owner() -> None:
    name = sandbox_name()
    assert name.startswith(f"sb-{os.getpid()}-") and len(name.rsplit("-", 1)[1]) == 8
    assert sandbox_name(1234).startswith("sb-1234-")
    assert sandbox_name() != name


# ---------------------------------------------------------------------------- real cgroups


def test_creates_a_dir_in_every_hierarchy_with_limits_on_the_sandbox(make: MakeSandbox) -> None:
    sb = make(Limits(cpus=1.5, memory_bytes=parse_size("256M"), pids=100))
    assert sb.path == cgroup2_root() / "corral" / sb.name
    assert sb.id == sb.path.stat().st_ino
    for d in all_dirs(sb):
        assert (d / "cgroup.procs").is_file()
    v1 = cgroups._v1_mounts()
    cpu = v1["cpu"] / "corral" / sb.name if "cpu" in v1 else sb.path
    mem = v1["memory"] / "corral" / sb.name if "memory" in v1 else sb.path
    pids = v1["pids"] / "corral" / sb.name if "pids" in v1 else sb.path
    if "cpu" in v1:
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "150000"
        assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
    else:
        assert (cpu / "cpu.max").read_text().split() == ["150000", "100000"]
    limit_file = "memory.limit_in_bytes" if "memory" in v1 else "memory.max"
    assert int((mem / limit_file).read_text()) == 256 << 20
    assert (pids / "pids.max").read_text().strip() == "100"


def test_fork_bomb_stops_at_the_pids_limit(make: MakeSandbox, spawn: Spawn) -> None:
    # cpus too, so the bomb's retries cannot starve the people sharing this host
    sb = make(Limits(pids=50, cpus=0.5))
    bomb = spawn(sb.new_step(1), f"""
import os, time
end = time.time() + {SELF_LIMIT_S}
while time.time() < end:
    try:
        os.fork()  # parent and child both go on forking
    except OSError:
        time.sleep(0.05)  # at the limit: back off, try again
""")
    assert wait_until(lambda: len(sb.pids()) >= 50)
    most = 0
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        most = max(most, len(sb.pids()))
        time.sleep(0.02)
    assert most == 50
    assert sb.events()["pids_max"] > 0
    # The host can still start processes.
    assert subprocess.run(["true"], timeout=5).returncode == 0
    sb.destroy()
    assert bomb.wait(timeout=5) == -signal.SIGKILL
    assert not any(d.exists() for d in all_dirs(sb))


def test_memory_balloon_is_oom_killed(make: MakeSandbox, spawn: Spawn) -> None:
    sb = make(Limits(memory_bytes=parse_size("64M")))
    balloon = spawn(sb.new_step(1), """
b = bytearray(300 << 20)
for i in range(0, len(b), 4096):  # touch every page, so it is really charged
    b[i] = 1
""")
    assert balloon.wait(timeout=15) == -signal.SIGKILL
    assert sb.events()["oom_kill"] >= 1


def test_cpu_limit_caps_a_busy_loop(make: MakeSandbox, spawn: Spawn) -> None:
    sb = make(Limits(cpus=0.2))
    spawn(sb.new_step(1), f"import time\nend = time.time() + {SELF_LIMIT_S}\nwhile time.time() < end: pass")
    time.sleep(0.2)  # past interpreter start-up
    used0, t0 = sb.cpu_usage_ns(), time.monotonic_ns()
    time.sleep(1.0)
    used1, t1 = sb.cpu_usage_ns(), time.monotonic_ns()
    ratio = (used1 - used0) / (t1 - t0)
    assert 0 < ratio < 0.5, f"busy loop used {ratio:.2f} CPUs under a 0.2 CPU limit"
    assert sb.memory_bytes() > 0


def test_a_process_stays_in_the_step_that_started_it(make: MakeSandbox, spawn: Spawn) -> None:
    sb = make()
    step1 = sb.new_step(1)
    old = spawn(step1, f"import time; time.sleep({SELF_LIMIT_S})")
    step2 = sb.new_step(2)
    new = spawn(step2, f"import time; time.sleep({SELF_LIMIT_S})")
    assert step1.id != step2.id != sb.id
    assert step1.pids() == [old.pid] and step2.pids() == [new.pid]
    assert sb.pids() == sorted([old.pid, new.pid])
    used = {"", *cgroups._v1_mounts()}
    for proc, step in ((old, "step-1"), (new, "step-2")):
        paths = cgroup_paths(proc.pid)
        mine = {ctrls: path for ctrls, path in paths.items() if used & set(ctrls.split(","))}
        assert mine and all(path == f"/corral/{sb.name}/{step}" for path in mine.values()), paths


def test_add_puts_a_running_process_in_every_hierarchy(make: MakeSandbox, spawn: Spawn) -> None:
    sb = make()
    outside = sb.new_step(1)
    proc = spawn(outside, f"import time; time.sleep({SELF_LIMIT_S})")
    step = sb.new_step(2)
    files = step.procs_files()
    assert files[0] == step.path / "cgroup.procs"  # v2 first: the sensor scopes by its id
    assert {f.parent for f in files} == {d / "step-2" for d in all_dirs(sb)} and len(files) == len(set(files))
    step.add(proc.pid)
    assert step.pids() == [proc.pid] and outside.pids() == []
    assert all(f.read_text().split() == [str(proc.pid)] for f in step.procs_files())


@pytest.mark.parametrize("freezer", ["v2", "v1"])
def test_freeze_stops_a_process_and_thaw_resumes_it(make: MakeSandbox, spawn: Spawn, tmp_path: Path, freezer: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With v2's freezer (used wherever the kernel has cgroup.freeze) and with v1's, the fallback
    for older kernels, forced here on a host that mounts both."""
    if freezer == "v1":
        if "freezer" not in cgroups._v1_mounts():
            pytest.skip("this host mounts no v1 freezer")
        monkeypatch.setattr(SandboxCgroup, "_v1_freezer", lambda self: self._v1["freezer"])
    sb = make()
    out = tmp_path / "count"
    out.touch()
    spawn(sb.new_step(1), COUNTER, str(out))
    assert wait_until(lambda: out.stat().st_size > 0)
    assert not sb.frozen
    sb.freeze()
    assert sb.frozen
    size = out.stat().st_size
    time.sleep(0.3)
    assert out.stat().st_size == size
    sb.thaw()
    assert not sb.frozen
    assert wait_until(lambda: out.stat().st_size > size)


def test_a_shell_pipeline_always_freezes(make: MakeSandbox) -> None:
    """v1's freezer can miss a shell that enters vfork() just as the freeze starts: its child is
    frozen before it execs and the shell, parked in vfork, is never frozen, so the freeze never
    finishes (about one in a hundred freezes of this pipeline, on this host, with v1's freezer).
    v2's counts a shell parked in vfork as frozen; the sandbox uses it wherever the kernel has it.
    A stress test: 150 freezes at random moments of a pipeline that forks and vforks."""
    sb = make()
    fifo = f"/tmp/corral-test-fifo-{os.getpid()}"
    script = f"rm -f {fifo}; mkfifo {fifo}; cat {fifo} | sh -i 2>&1 | cat > {fifo}"
    try:
        for n in range(1, 151):
            files = sb.new_step(n).procs_files()

            def enter(files: list[Path] = files) -> None:
                for f in files:
                    f.write_text(str(os.getpid()))

            shell = subprocess.Popen(["/bin/sh", "-c", script], preexec_fn=enter, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(random.uniform(0, 0.02))
            sb.freeze()  # a freeze that does not finish raises (and is undone)
            sb.thaw()
            sb.kill_all()
            shell.wait(timeout=5)
    finally:
        Path(fifo).unlink(missing_ok=True)


def test_a_freeze_meeting_a_thaw_is_not_an_error(make: MakeSandbox, spawn: Spawn, tmp_path: Path) -> None:
    """A freeze action (pipeline thread) and a release (the user's) at the same moment: each writes
    its state and waits for it, so they must take turns, or one waits out the other."""
    sb = make()
    out = tmp_path / "count"
    out.touch()
    spawn(sb.new_step(1), COUNTER, str(out))
    assert wait_until(lambda: out.stat().st_size > 0)
    errors: list[BaseException] = []

    def run(op: Callable[[], None]) -> None:
        try:
            op()
        except BaseException as exc:  # reported below
            errors.append(exc)

    for _ in range(30):
        sb.freeze()
        threads = [threading.Thread(target=run, args=(op,)) for op in (sb.thaw, sb.freeze)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        sb.thaw()
    assert not sb.frozen


def test_a_freeze_that_cannot_finish_is_undone(make: MakeSandbox, spawn: Spawn, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault: a process the kernel cannot freeze (in uninterruptible sleep on a hung file
    system), stood in for by a freezer that never reports done.  The freeze fails naming what it
    waited for, and is undone: the sandbox runs on rather than staying half frozen."""
    sb = make()
    out = tmp_path / "count"
    out.touch()
    counter = spawn(sb.new_step(1), COUNTER, str(out))
    assert wait_until(lambda: out.stat().st_size > 0)
    monkeypatch.setattr(cgroups, "_TIMEOUT_S", 0.3)
    with monkeypatch.context() as m:
        m.setattr(cgroups, "_v1_state", lambda cgroup: "FREEZING")
        m.setattr(cgroups, "_v2_frozen", lambda cgroup: False)
        with pytest.raises(CorralError, match=r"did not freeze within 0.3 s.*\(undone: thawed\); not frozen: "):
            sb.freeze()
    assert not sb.frozen
    size = out.stat().st_size
    assert wait_until(lambda: out.stat().st_size > size), "the sandbox stayed frozen"
    assert counter.poll() is None


@pytest.mark.parametrize("how", ["cgroup.kill", "freeze-and-kill-each"])
def test_kill_all_empties_the_sandbox(make: MakeSandbox, spawn: Spawn, how: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "freeze-and-kill-each":  # what kernels before 5.14, without cgroup.kill, get
        monkeypatch.setattr(cgroups, "_kill_file", lambda cgroup: None)
    sb = make(Limits(pids=20))
    procs = [spawn(sb.new_step(n), f"""
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
end = time.time() + {SELF_LIMIT_S}
while time.time() < end:  # keeps starting short-lived children
    try:
        if os.fork() == 0:
            time.sleep(0.05)
            os._exit(0)
    except OSError:
        pass
    time.sleep(0.01)
""") for n in (1, 2)]
    assert wait_until(lambda: len(sb.pids()) > 2)
    sb.kill_all()
    assert sb.pids() == []
    assert not sb.frozen
    assert [p.wait(timeout=5) for p in procs] == [-signal.SIGKILL] * 2


def test_destroy_removes_every_dir_and_can_be_repeated(make: MakeSandbox, spawn: Spawn) -> None:
    sb = make(Limits(pids=10))
    proc = spawn(sb.new_step(1), f"import time; time.sleep({SELF_LIMIT_S})")
    sb.new_step(2)
    dirs = all_dirs(sb)
    assert len(dirs) >= 1 and all((d / "step-2").is_dir() for d in dirs)
    sb.destroy()
    assert not any(d.exists() for d in dirs)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    sb.destroy()  # already gone: nothing to do, no error
    assert sb.pids() == []


def test_reap_stale_removes_only_sandboxes_of_dead_owners(make: MakeSandbox, spawn: Spawn) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names nobody now
    stale = make(name=f"sb-{gone.pid}-deadbeef")
    victim = spawn(stale.new_step(1), f"import time; time.sleep({SELF_LIMIT_S})")
    live = make()
    reaped = reap_stale()
    assert stale.name in reaped and live.name not in reaped
    assert not any(d.exists() for d in all_dirs(stale))
    assert victim.wait(timeout=5) == -signal.SIGKILL
    assert all(d.is_dir() for d in all_dirs(live))


def test_reap_stale_sees_through_a_reused_owner_pid(make: MakeSandbox) -> None:
    """pids wrap around on a busy host: a sandbox whose owner died is stale even when a newer
    process now has the owner's pid number.  Stood in for by a sandbox whose directories are
    backdated to before that process started; one made after it started is left alone."""
    newer = subprocess.Popen(["sleep", "30"])
    try:
        stale = make(name=f"sb-{newer.pid}-reused")
        kept = make(name=f"sb-{newer.pid}-current")
        hour_ago = time.time_ns() - 3600 * 10**9
        for d in all_dirs(stale):
            os.utime(d, ns=(hour_ago, hour_ago))
        reaped = reap_stale()
        assert stale.name in reaped and kept.name not in reaped
        assert not any(d.exists() for d in all_dirs(stale)) and all(d.is_dir() for d in all_dirs(kept))
    finally:
        newer.kill()
        newer.wait()


def test_v2_only_layout(make: MakeSandbox, spawn: Spawn, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pure-v2 code, run for real: with the v1 mounts hidden, everything lives on the v2
    hierarchy (here the unified one, which has cgroup.freeze, cgroup.kill and cpu.stat, but no
    controllers)."""
    monkeypatch.setattr(cgroups, "_v1_mounts", dict)
    offered = (cgroup2_root() / "cgroup.controllers").read_text().split()
    if "cpu" not in offered:
        name = sandbox_name()
        with pytest.raises(CorralError, match=r"cpu controller .*cgroup\.controllers"):
            make(Limits(cpus=1), name=name)
        assert not (cgroup2_root() / "corral" / name).exists()  # a failed start leaves nothing
    sb = make()
    assert all_dirs(sb) == [sb.path]
    step = sb.new_step(1)
    assert step.procs_files() == [step.path / "cgroup.procs"]
    out = tmp_path / "count"
    out.touch()
    proc = spawn(step, COUNTER, str(out))
    assert wait_until(lambda: out.stat().st_size > 0)
    sb.freeze()
    assert sb.frozen and (sb.path / "cgroup.freeze").read_text().strip() == "1"
    size = out.stat().st_size
    time.sleep(0.3)
    assert out.stat().st_size == size
    sb.thaw()
    assert wait_until(lambda: out.stat().st_size > size)
    assert sb.cpu_usage_ns() > 0
    sb.kill_all()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    sb.destroy()
    assert not sb.path.exists()
