"""Watched paths reached in every roundabout way the kernel allows, and the syscalls' own arguments.

The sensor decides in the kernel whether an open, unlink or rename touches a watched path, and
reports nothing otherwise.  These tests pin down what it must still catch: the canonical path of
an opened file however it was named (a renamed directory, a deep relative name, `..`, a bind
mount, a symlink, a directory fd), prefixes added while processes run, and the arguments each
open syscall was called with, now that they are read at the syscall's exit.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Run, python, run_in_cgroup

from corral import events as ev
from corral.monitor import Monitor
from corral.sensor.cgroups import ScratchCgroup

O_WRONLY, O_CREAT, O_TRUNC, O_APPEND = 0o1, 0o100, 0o1000, 0o2000


@pytest.fixture
def watched_dir(monitor: Monitor) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="corral-watched-") as d:
        monitor.watch_prefix(d + "/")
        yield Path(d)


@pytest.fixture
def outside_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="corral-outside-") as d:
        yield Path(d)


def opens(run: Run) -> list[ev.FileEvent]:
    return [e for e in run.of("open") if isinstance(e, ev.FileEvent)]


def test_open_through_a_directory_renamed_into_a_watched_place(monitor: Monitor, watched_dir: Path,
                                                               outside_dir: Path) -> None:
    # The process sits in a directory outside, holds an fd of it, then moves it into the watched
    # place: relative names, the fd and the new absolute name now all lead to watched files.
    inner = outside_dir / "proj" / "inner"
    inner.mkdir(parents=True)
    (inner / "secret").write_text("x")
    moved = watched_dir / "moved"
    run = run_in_cgroup(monitor, python(
        "import os\n"
        f"fd = os.open({str(outside_dir / 'proj')!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        f"os.rename({str(outside_dir / 'proj')!r}, {str(moved)!r})\n"
        "open('secret').close()\n"
        "os.close(os.open('inner/secret', os.O_RDONLY, dir_fd=fd))\n"
        f"open({str(moved / 'inner' / 'secret')!r}).close()\n"
        "try:\n    os.open('inner/absent', os.O_RDONLY, dir_fd=fd)\nexcept FileNotFoundError:\n    pass\n"),
        cwd=inner)
    assert run.returncode == 0, run.stderr
    secret = str(moved / "inner" / "secret")
    assert [e.path for e in opens(run) if e.result >= 0].count(secret) == 3
    assert all(e.match == ["prefix"] for e in opens(run))
    # a failed open is resolved against the directory fd's path as it is now
    (failed,) = [e for e in opens(run) if e.path.endswith("/absent")]
    assert failed.path == str(moved / "inner" / "absent") and failed.result == -2
    renames = [(e.path, e.path2) for e in run.of("rename") if isinstance(e, ev.FileEvent)]
    assert renames == [(str(outside_dir / "proj"), str(moved))]


def test_open_by_relative_names_from_a_deep_cwd_and_through_dotdot(monitor: Monitor, watched_dir: Path,
                                                                   outside_dir: Path) -> None:
    deep = watched_dir.joinpath(*[f"level{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "here").write_text("x")
    (watched_dir / "top").write_text("x")
    up = "/".join([".."] * 12)
    run = run_in_cgroup(monitor, ["/bin/sh", "-c",
                                  f"cat here {up}/top ./here > /dev/null; cd {outside_dir} && "
                                  f"cat ../{watched_dir.name}/top {outside_dir}/../{watched_dir.name}/level0/../top"
                                  " > /dev/null"], cwd=deep)
    assert run.returncode == 0, run.stderr
    paths = [e.path for e in opens(run) if e.result >= 0]
    assert paths.count(str(deep / "here")) == 2
    assert paths.count(str(watched_dir / "top")) == 3  # "..", from outside, and a ".." inside the name


def test_open_through_symlinks_reports_the_target(monitor: Monitor, watched_dir: Path, outside_dir: Path) -> None:
    (watched_dir / "sub").mkdir()
    (watched_dir / "sub" / "secret").write_text("x")
    (outside_dir / "file-link").symlink_to(watched_dir / "sub" / "secret")
    (outside_dir / "dir-link").symlink_to(watched_dir / "sub")
    (outside_dir / "relative-link").symlink_to(os.path.relpath(watched_dir / "sub" / "secret", outside_dir))
    run = run_in_cgroup(monitor, ["/bin/cat", str(outside_dir / "file-link"), str(outside_dir / "dir-link/secret"),
                                  str(outside_dir / "relative-link")])
    assert run.returncode == 0, run.stderr
    assert [e.path for e in opens(run)].count(str(watched_dir / "sub" / "secret")) == 3


def test_open_across_a_bind_mount_reports_the_path_the_process_sees(monitor: Monitor, watched_dir: Path,
                                                                    outside_dir: Path) -> None:
    # As bubblewrap mounts a sandbox's home and workspace: the files live elsewhere on the host, and
    # the watched prefix is the place they are mounted at.  Crossing the mount must give that name.
    (outside_dir / "real").mkdir()
    (outside_dir / "real" / "deeper").mkdir()
    (outside_dir / "real" / "deeper" / "secret").write_text("x")
    target = watched_dir / "mnt"
    target.mkdir()
    run = run_in_cgroup(monitor, [
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        f"mount --bind {outside_dir}/real {target} && cat {target}/deeper/secret > /dev/null && "
        f"cd {target}/deeper && cat secret > /dev/null && cat nothere 2> /dev/null; true"])
    assert run.returncode == 0, run.stderr
    seen = [(e.path, e.result >= 0) for e in opens(run)]
    assert seen.count((f"{target}/deeper/secret", True)) == 2
    assert (f"{target}/deeper/nothere", False) in seen


def test_a_prefix_watched_after_the_process_started(monitor: Monitor, outside_dir: Path) -> None:
    # Sandbox.watch_prefix is called while the sandbox's processes run: no verdict may be cached.
    late = outside_dir / "late"
    late.mkdir()
    (late / "secret").write_text("x")
    code = ("import sys\n"
            f"open({str(late / 'secret')!r}).close()\n"  # before: not watched yet
            "print('ready', flush=True)\nsys.stdin.readline()\n"
            f"open({str(late / 'secret')!r}).close()\n")
    cg = ScratchCgroup(f"test-late-{os.getpid()}")
    monitor.read()
    monitor.watch_cgroup(cg.id, sandbox_id=77, step_id=1)
    events: list[ev.Event] = []
    try:
        proc = subprocess.Popen(python(code), preexec_fn=lambda: cg.add(os.getpid()), text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        monitor.watch_prefix(f"{late}/")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 30  # a bound on waiting, not a measurement
        while time.monotonic() < deadline and not any(
                isinstance(e, ev.ExitEvent) and e.pid == proc.pid for e in events):
            events += [e for e in monitor.read(timeout=0.05) if e.cgroup_id == cg.id]
    finally:
        monitor.unwatch_cgroup(cg.id)
        cg.remove()
    hits = [e for e in events if isinstance(e, ev.FileEvent) and e.kind == "open"]
    assert [e.path for e in hits] == [str(late / "secret")]  # the second open only


def test_unwatched_unlinks_and_renames_report_nothing(monitor: Monitor, outside_dir: Path) -> None:
    # What git does per object it writes: write a temporary file, rename or link it, unlink it.
    run = run_in_cgroup(monitor, ["/bin/sh", "-c",
                                  "for i in 1 2 3 4 5 6 7 8; do echo x > t$i; mv t$i u$i; rm u$i; done"],
                        cwd=outside_dir)
    assert run.returncode == 0, run.stderr
    assert run.of("unlink") == [] and run.of("rename") == [] and run.of("open") == []


def test_rename_out_of_a_watched_place_keeps_both_names(monitor: Monitor, watched_dir: Path,
                                                        outside_dir: Path) -> None:
    (watched_dir / "loot").write_text("x")
    run = run_in_cgroup(monitor, ["/bin/mv", "loot", f"{outside_dir}/taken"], cwd=watched_dir)
    assert run.returncode == 0, run.stderr
    renames = [(e.path, e.path2, e.match) for e in run.of("rename") if isinstance(e, ev.FileEvent)]
    assert renames == [(f"{watched_dir}/loot", f"{outside_dir}/taken", ["prefix"])]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers below are x86-64's")
def test_each_open_syscall_reports_its_own_name_and_flags(monitor: Monitor, watched_dir: Path) -> None:
    # The arguments are read from the registers at the syscall's exit: check each call's layout
    # (open: name, flags; creat: name; openat: dfd, name, flags; openat2: dfd, name, how).
    w = str(watched_dir)
    code = f"""
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
SYS_open, SYS_creat, SYS_openat, SYS_openat2 = 2, 85, 257, 437
AT_FDCWD = -100
def b(p): return p.encode()
fds = [libc.syscall(SYS_open, b("{w}/by-open"), {O_WRONLY | O_CREAT | O_APPEND}, 0o600),
       libc.syscall(SYS_creat, b("{w}/by-creat"), 0o600),
       libc.syscall(SYS_openat, AT_FDCWD, b("by-openat"), {O_WRONLY | O_CREAT | O_TRUNC}, 0o600)]
how = ctypes.create_string_buffer(struct.pack("QQQ", {O_WRONLY | O_CREAT}, 0o600, 0))
fds.append(libc.syscall(SYS_openat2, AT_FDCWD, b("{w}/by-openat2"), how, 24))
assert min(fds) >= 0, fds
assert libc.syscall(SYS_open, b("{w}/absent-open"), 0, 0) < 0
assert libc.syscall(SYS_openat, AT_FDCWD, b("absent-openat"), 0, 0) < 0
assert libc.syscall(SYS_openat2, AT_FDCWD, b("absent-openat2"), ctypes.create_string_buffer(24), 24) < 0
"""
    run = run_in_cgroup(monitor, python(code), cwd=watched_dir)
    assert run.returncode == 0, run.stderr
    got = {e.path.removeprefix(w + "/"): (e.flags & ~0o2000000, e.result >= 0) for e in opens(run)}
    assert got == {
        "by-open": (O_WRONLY | O_CREAT | O_APPEND, True),
        "by-creat": (O_WRONLY | O_CREAT | O_TRUNC, True),
        "by-openat": (O_WRONLY | O_CREAT | O_TRUNC, True),
        "by-openat2": (O_WRONLY | O_CREAT, True),
        "absent-open": (0, False),
        "absent-openat": (0, False),
        "absent-openat2": (0, False),
    }


def test_netlink_and_unix_traffic_is_not_reported_as_network(monitor: Monitor, outside_dir: Path) -> None:
    # getaddrinfo() talks to the kernel over netlink with sendto(); a unix socket pair is local IPC.
    path = str(outside_dir / "s.sock")
    run = run_in_cgroup(monitor, python(
        "import socket\n"
        "n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n"
        "n.sendto(b'\\0' * 16, (0, 0)); n.connect((0, 0))\n"
        f"srv = socket.socket(socket.AF_UNIX); srv.bind({path!r}); srv.listen()\n"
        f"c = socket.socket(socket.AF_UNIX); c.connect({path!r}); a, _ = srv.accept()\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b'x', ('127.0.0.1', 9))\n"))
    assert run.returncode == 0, run.stderr
    assert run.of("accept") == []
    assert [e.addr for e in run.of("send") if isinstance(e, ev.NetEvent)] == ["127.0.0.1"]
    assert [(e.family, e.unix_path) for e in run.of("connect") if isinstance(e, ev.NetEvent)] == [("unix", path)]
