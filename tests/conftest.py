"""Shared fixtures: one loaded sensor for the session, and a way to run a real
command in a fresh cgroup and collect exactly the events it caused."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral import events as ev
from corral.monitor import Monitor
from corral.sandbox.runner import STATE_DIR
from corral.sensor.cgroups import ScratchCgroup

_counter = itertools.count(1)


@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`corral run` and Sandboxes record into the store: the tests' go to a store of their own."""
    path = tmp_path_factory.mktemp("corral-data")
    old = os.environ.get("CORRAL_DATA")
    os.environ["CORRAL_DATA"] = str(path)
    yield path
    if old is None:
        del os.environ["CORRAL_DATA"]
    else:
        os.environ["CORRAL_DATA"] = old


@pytest.fixture(autouse=True)
def _no_evidence_left() -> Iterator[None]:
    """The evidence bundles that a test's freezes wrote (under STATE_DIR/evidence/SANDBOX) are
    removed after it: nothing of a test run stays on the machine."""
    before = _evidence_dirs()
    yield
    for directory in _evidence_dirs() - before:
        shutil.rmtree(directory, ignore_errors=True)


def _evidence_dirs() -> set[Path]:
    try:
        return set((STATE_DIR / "evidence").iterdir())
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="session")
def monitor() -> Iterator[Monitor]:
    if os.geteuid() != 0:
        pytest.skip("the sensor tests need root")
    with Monitor() as mon:
        yield mon


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    """A listener on 127.0.0.1 that accepts and closes connections in the background."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def accept_loop() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join()
    srv.close()


@dataclass
class Run:
    pid: int
    returncode: int
    stdout: str
    stderr: str
    cgroup_id: int
    sandbox_id: int
    events: list[ev.Event] = field(default_factory=list)

    def of(self, kind: str) -> list[ev.Event]:
        return [e for e in self.events if e.kind == kind]

    def pids(self) -> set[int]:
        return {e.pid for e in self.events}


def run_in_cgroup(mon: Monitor, argv: Sequence[str], *, watch: bool = True, cwd: str | Path | None = None,
                  timeout: float = 30.0, input: str | None = None) -> Run:
    """Run argv in a fresh cgroup (watched or not) and return the events of that cgroup.

    Events are collected until the command has exited, the cgroup is empty and
    the exit record of the command has been read (bounded by `timeout`).
    """
    n = next(_counter)
    cg = ScratchCgroup(f"test-{os.getpid()}-{n}")
    sandbox_id = 1000 + n
    mon.read()  # start from an empty ring
    if watch:
        mon.watch_cgroup(cg.id, sandbox_id=sandbox_id, step_id=n)
    try:
        proc = subprocess.Popen(list(argv), preexec_fn=lambda: cg.add(os.getpid()), cwd=cwd, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(input=input, timeout=timeout)
        run = Run(proc.pid, proc.returncode, out, err, cg.id, sandbox_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run.events += [e for e in mon.read(timeout=0.05) if e.cgroup_id == cg.id]
            done = any(isinstance(e, ev.ExitEvent) and e.pid == proc.pid for e in run.events)
            if (done or not watch) and not cg.pids():
                run.events += [e for e in mon.read(timeout=0.05) if e.cgroup_id == cg.id]
                break
        return run
    finally:
        if watch:
            mon.unwatch_cgroup(cg.id)
        cg.remove()


def python(code: str) -> list[str]:
    """argv that runs a Python snippet with the interpreter running the tests."""
    import sys

    return [sys.executable, "-c", code]
