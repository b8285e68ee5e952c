"""The exec guard on the real kernel: denied execs die before their image runs.

Every "miner" here is a harmless stand-in whose first action is to create a
marker file: a missing marker proves the new image never ran.  Nothing here
touches the network (the argv patterns name documentation addresses only).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.respond import prevent
from corral.respond.prevent import DEFAULT_EXEC_DENY, DeniedExec, DenyKind, ExecDenyList, ExecGuard
from corral.sensor.cgroups import ScratchCgroup, cgroup_id

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, BPF)"),
    pytest.mark.skipif(not prevent.object_path().exists(),
                       reason="the exec guard's BPF object is not built: run `make setup`"),
]

KILLED = -signal.SIGKILL
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def guard() -> Iterator[ExecGuard]:
    with ExecGuard() as g:
        yield g


def _scratch() -> ScratchCgroup:
    return ScratchCgroup(f"test-prevent-{os.getpid()}-{next(_ids)}")


@pytest.fixture
def cgroup() -> Iterator[ScratchCgroup]:
    cg = _scratch()
    yield cg
    cg.remove()


@pytest.fixture
def sandbox(guard: ExecGuard, cgroup: ScratchCgroup) -> Iterator[int]:
    """An enforcing sandbox bound to the scratch cgroup, denying the name xmrig."""
    sandbox_id = 7000 + next(_ids)
    guard.add_sandbox(sandbox_id, enforce=True, cgroup_ids=[cgroup.id])
    guard.deny_name(sandbox_id, "xmrig")
    yield sandbox_id
    guard.remove_sandbox(sandbox_id)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory with a "miner": a script named xmrig whose first action is to touch MARKER."""
    miner = tmp_path / "xmrig"
    miner.write_text(f"#!/bin/sh\ntouch {tmp_path / 'MARKER'}\n")
    miner.chmod(0o755)
    return tmp_path


def run(cg: ScratchCgroup | Path, argv: Sequence[str], cwd: Path) -> int:
    """Run argv in the cgroup (joined before exec); its exit status, -9 when SIGKILLed."""
    procs = cg / "cgroup.procs" if isinstance(cg, Path) else cg.path / "cgroup.procs"

    def join() -> None:
        procs.write_text(f"{os.getpid()}\n")

    return subprocess.run(list(argv), cwd=cwd, preexec_fn=join, capture_output=True, timeout=30).returncode


_unclaimed: list[DeniedExec] = []  # read from the guard, not yet asked for


def records(guard: ExecGuard, cgroup_id: int, want: int = 1, timeout: float = 3.0) -> list[DeniedExec]:
    """The guard's reports for one cgroup: wait for `want` of them, then for stragglers briefly."""
    def claim() -> list[DeniedExec]:
        mine = [r for r in _unclaimed if r.cgroup_id == cgroup_id]
        _unclaimed[:] = [r for r in _unclaimed if r.cgroup_id != cgroup_id]
        return mine

    found = claim()
    deadline = time.monotonic() + timeout
    while len(found) < want and time.monotonic() < deadline:
        _unclaimed.extend(guard.read(timeout=0.1))
        found += claim()
    _unclaimed.extend(guard.read(timeout=0.1))
    return found + claim()


def test_layouts_match_btf() -> None:
    """prevent.py packs keys and decodes records by hand: check them against the object's BTF."""
    from corral.sensor.libbpf import BpfObject

    obj = BpfObject(str(prevent.object_path()))
    try:
        assert obj.struct_layout("prevent_sandbox") == (
            prevent._SANDBOX.size, {"mode": 0, "argv_count": 4, "argv_len": 8, "argv": 16})
        assert obj.struct_layout("deny_name_key") == (prevent._NAME_KEY.size, {"sandbox_id": 0, "name": 4})
        assert obj.struct_layout("deny_path_key") == (
            prevent._PATH_KEY.size, {"prefixlen": 0, "sandbox_id": 4, "path": 8})
        size, offsets = obj.struct_layout("denied_exec")
        assert size == prevent._RECORD.size
        assert offsets == {"ts_ns": 0, "cgroup_id": 8, "sandbox_id": 16, "pid": 20, "tid": 24, "uid": 28,
                           "kind": 32, "rule_index": 36, "enforced": 40, "_pad": 44, "comm": 48,
                           "filename": 64, "path": 320}
    finally:
        obj.close()


class TestEnforce:
    def test_denied_name_never_runs(self, guard: ExecGuard, sandbox: int, cgroup: ScratchCgroup,
                                    work: Path) -> None:
        assert run(cgroup, ["./xmrig"], work) == KILLED  # the caller dies in execve()
        assert not (work / "MARKER").exists()           # ... before the new image ran
        [rec] = records(guard, cgroup.id)
        assert (rec.kind, rec.rule, rec.rule_index, rec.enforced) == (DenyKind.NAME, "xmrig", 0, True)
        assert (rec.sandbox_id, rec.filename, rec.path) == (sandbox, "./xmrig", str(work / "xmrig"))
        assert rec.pid == rec.tid and rec.uid == 0 and rec.comm  # the caller's (python's) comm
        # other names run: the match is exact
        shutil.copy(work / "xmrig", work / "xmrig2")
        assert run(cgroup, [str(work / "xmrig2")], work) == 0
        assert (work / "MARKER").exists()
        assert records(guard, cgroup.id, want=0) == []

    def test_fexecve_is_judged_by_the_file(self, guard: ExecGuard, sandbox: int, cgroup: ScratchCgroup,
                                           work: Path) -> None:
        """execveat(fd, "", AT_EMPTY_PATH) names no file: the fd's path gives the basename."""
        (work / "bin").mkdir()
        shutil.copy("/usr/bin/touch", work / "bin" / "xmrig")
        code = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                "os.execve(fd, ['innocent', sys.argv[2]], {})")
        assert run(cgroup, [sys.executable, "-c", code, "bin/xmrig", str(work / "MARKER")], work) == KILLED
        assert not (work / "MARKER").exists()
        [rec] = records(guard, cgroup.id)
        assert (rec.kind, rec.filename, rec.path) == (DenyKind.NAME, "", str(work / "bin" / "xmrig"))

    def test_argv_pattern(self, guard: ExecGuard, sandbox: int, cgroup: ScratchCgroup, work: Path) -> None:
        guard.deny_argv(sandbox, "stratum+tcp")
        guard.deny_argv(sandbox, "--donate-level")
        marker = work / "MARKER"
        argv = ["/usr/bin/touch", str(marker), "stratum+tcp://198.51.100.10:3333"]
        assert run(cgroup, argv, work) == KILLED
        assert run(cgroup, ["/usr/bin/touch", str(marker), "--donate-level=1"], work) == KILLED
        assert not marker.exists()
        recs = records(guard, cgroup.id, want=2)
        assert [(r.kind, r.rule_index, r.rule) for r in recs] == [
            (DenyKind.ARGV, 0, "stratum+tcp"), (DenyKind.ARGV, 1, "--donate-level")]
        assert recs[0].filename == "/usr/bin/touch" and all(r.enforced for r in recs)
        # a pattern never spans two arguments; a harmless argv runs
        assert run(cgroup, ["/usr/bin/touch", str(marker), "stratum+", "tcp"], work) == 0
        assert marker.exists()

    def test_path_prefix(self, guard: ExecGuard, sandbox: int, cgroup: ScratchCgroup, work: Path) -> None:
        for d in ("evil", "evilness"):
            (work / d).mkdir()
            shutil.copy(work / "xmrig", work / d / "tool")  # an innocent name: only the path is denied
        guard.deny_path(sandbox, f"{work}/evil/")
        assert run(cgroup, [str(work / "evil" / "tool")], work) == KILLED  # absolute
        assert run(cgroup, ["evil/tool"], work) == KILLED                  # relative to the cwd
        assert run(cgroup, ["./tool"], work / "evil") == KILLED
        assert not (work / "MARKER").exists()
        recs = records(guard, cgroup.id, want=3)
        assert [r.filename for r in recs] == [str(work / "evil" / "tool"), "evil/tool", "./tool"]
        assert {(r.kind, r.rule, r.path) for r in recs} == {
            (DenyKind.PATH, f"{work}/evil/", str(work / "evil" / "tool"))}
        assert run(cgroup, [str(work / "evilness" / "tool")], work) == 0  # the prefix ends in "/"
        assert (work / "MARKER").exists()

    def test_child_cgroup_stays_in_the_sandbox(self, guard: ExecGuard, sandbox: int, cgroup: ScratchCgroup,
                                               work: Path) -> None:
        child = cgroup.path / "escape"  # made by the sandboxed process itself, say
        child.mkdir()
        try:
            assert run(child, ["./xmrig"], work) == KILLED
            [rec] = records(guard, cgroup_id(child))
        finally:
            child.rmdir()
        assert not (work / "MARKER").exists()
        assert rec.sandbox_id == sandbox

    def test_default_list(self, guard: ExecGuard, sandbox: int, cgroup: ScratchCgroup, work: Path) -> None:
        guard.deny(sandbox, DEFAULT_EXEC_DENY)
        rules = guard.rules(sandbox)
        assert rules.names[0] == "xmrig" and set(DEFAULT_EXEC_DENY.names) <= set(rules.names)
        assert rules.argv == DEFAULT_EXEC_DENY.argv
        assert run(cgroup, ["/usr/bin/touch", str(work / "MARKER"), "stratum2+tcp://203.0.113.10:1"],
                   work) == KILLED
        shutil.copy(work / "xmrig", work / "ngrok")
        assert run(cgroup, ["./ngrok"], work) == KILLED
        assert not (work / "MARKER").exists()


class TestScope:
    def test_observe_runs_and_reports(self, guard: ExecGuard, cgroup: ScratchCgroup, work: Path) -> None:
        sid = 7000 + next(_ids)
        guard.add_sandbox(sid, enforce=False, cgroup_ids=[cgroup.id])
        try:
            guard.deny_name(sid, "xmrig")
            assert run(cgroup, ["./xmrig"], work) == 0
            assert (work / "MARKER").exists()
            [rec] = records(guard, cgroup.id)
            assert (rec.kind, rec.rule, rec.enforced) == (DenyKind.NAME, "xmrig", False)
            (work / "MARKER").unlink()
            guard.set_enforce(sid, True)
            assert run(cgroup, ["./xmrig"], work) == KILLED
            assert not (work / "MARKER").exists()
        finally:
            guard.remove_sandbox(sid)

    def test_unwatched_cgroup_is_unaffected(self, guard: ExecGuard, sandbox: int, work: Path) -> None:
        other = _scratch()  # also below <v2root>/corral, but bound to no sandbox
        try:
            assert run(other, ["./xmrig"], work) == 0
            assert (work / "MARKER").exists()
            assert records(guard, other.id, want=0) == []
        finally:
            other.remove()

    def test_sandboxes_are_separate(self, guard: ExecGuard, sandbox: int, cgroup: ScratchCgroup,
                                    work: Path) -> None:
        other_cg = _scratch()
        other = 7000 + next(_ids)
        guard.add_sandbox(other, enforce=True, cgroup_ids=[other_cg.id])
        try:
            guard.deny_name(other, "cpuminer")
            guard.deny_argv(other, "stratum+ssl")
            shutil.copy(work / "xmrig", work / "cpuminer")
            assert run(other_cg, ["./xmrig"], work) == 0  # xmrig is denied in `sandbox` only
            assert (work / "MARKER").exists()
            (work / "MARKER").unlink()
            assert run(cgroup, ["./cpuminer"], work) == 0  # cpuminer in `other` only
            assert run(cgroup, ["/usr/bin/touch", str(work / "M2"), "stratum+ssl://x"], work) != KILLED
            assert (work / "M2").exists()  # (touch ran, and failed on its last argument)
            assert run(other_cg, ["./cpuminer"], work) == KILLED
            assert run(cgroup, ["./xmrig"], work) == KILLED
            assert [r.rule for r in records(guard, other_cg.id)] == ["cpuminer"]
            assert [r.rule for r in records(guard, cgroup.id)] == ["xmrig"]
        finally:
            guard.remove_sandbox(other)
            other_cg.remove()

    def test_remove_sandbox_clears_it(self, guard: ExecGuard, cgroup: ScratchCgroup, work: Path) -> None:
        sid = 7000 + next(_ids)
        guard.add_sandbox(sid, enforce=True, cgroup_ids=[cgroup.id])
        guard.deny(sid, ExecDenyList(names=("xmrig",), paths=(f"{work}/",), argv=("stratum+tcp",)))
        assert run(cgroup, ["./xmrig"], work) == KILLED
        guard.remove_sandbox(sid)
        with pytest.raises(CorralError, match="add_sandbox"):
            guard.rules(sid)
        assert run(cgroup, ["./xmrig", "stratum+tcp://x"], work) == 0  # unbound: untouched
        assert (work / "MARKER").exists()
        # nothing of it is left in the kernel: the id starts afresh
        guard.add_sandbox(sid, enforce=True, cgroup_ids=[cgroup.id])
        try:
            assert guard.rules(sid) == ExecDenyList()
            assert run(cgroup, ["./xmrig", "stratum+tcp://x"], work) == 0
        finally:
            guard.remove_sandbox(sid)
        sandbox_keys = [k for k in guard._sandbox_of.keys(8) if int.from_bytes(k, "little") == cgroup.id]
        assert sandbox_keys == []


class TestLimits:
    def test_misuse_is_refused_clearly(self, guard: ExecGuard, sandbox: int, cgroup: ScratchCgroup) -> None:
        with pytest.raises(CorralError, match="already guarded"):
            guard.add_sandbox(sandbox, enforce=True)
        with pytest.raises(CorralError, match="add_sandbox"):
            guard.deny_name(999_999, "xmrig")
        other = 7000 + next(_ids)
        guard.add_sandbox(other, enforce=False)
        try:
            with pytest.raises(CorralError, match="one sandbox only"):
                guard.bind_cgroup(cgroup.id, other)
        finally:
            guard.remove_sandbox(other)

    def test_entries_past_the_limits(self, guard: ExecGuard, sandbox: int) -> None:
        with pytest.raises(CorralError, match="at most 31"):
            guard.deny_name(sandbox, "x" * 32)
        with pytest.raises(CorralError, match="basenames"):
            guard.deny_name(sandbox, "bin/xmrig")
        with pytest.raises(CorralError, match="non-empty"):
            guard.deny_name(sandbox, "")
        with pytest.raises(CorralError, match="absolute"):
            guard.deny_path(sandbox, "tmp/evil/")
        with pytest.raises(CorralError, match="at most 252"):
            guard.deny_path(sandbox, "/" + "d" * 252)
        with pytest.raises(CorralError, match="at most 32"):
            guard.deny_argv(sandbox, "p" * 33)
        for i in range(8):
            guard.deny_argv(sandbox, f"pattern-{i}")
        guard.deny_argv(sandbox, "pattern-0")  # a duplicate is no new entry
        with pytest.raises(CorralError, match="PREVENT_ARGV_MAX"):
            guard.deny_argv(sandbox, "pattern-8")
        assert len(guard.rules(sandbox).argv) == 8

    def test_close(self, cgroup: ScratchCgroup, work: Path) -> None:
        g = ExecGuard()
        try:
            g.add_sandbox(1, enforce=True, cgroup_ids=[cgroup.id])
            g.deny_name(1, "xmrig")
            assert run(cgroup, ["./xmrig"], work) == KILLED
        finally:
            g.close()
        g.close()  # twice is fine
        assert run(cgroup, ["./xmrig"], work) == 0
        with pytest.raises(CorralError, match="closed"):
            g.deny_name(1, "xmrig")
