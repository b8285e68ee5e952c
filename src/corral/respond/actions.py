"""Respond: do what a rule's action says, within milliseconds of its alert.

Actions: alert (nothing more), kill (the process), kill_tree (it and its
descendants), freeze (the whole sandbox, then an evidence bundle), cut_network
(egress to deny-all, established flows included), stop (kill everything in the
sandbox).  In observe mode nothing is done and the alert records what would
have been.  Every alert records the action taken and how it went.

Processes are signalled through pidfds opened while their membership of the
sandbox is checked, so a pid reused by someone else is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from corral.detect.engine import Alert
from corral.errors import CorralError
from corral.sandbox.cgroups import SandboxCgroup
from corral.sensor.host import proc_stat

ACTIONS = ("alert", "kill", "kill_tree", "freeze", "cut_network", "stop")


class Target(Protocol):
    """What the responder needs of a sandbox."""

    cgroup: SandboxCgroup

    @property
    def observe(self) -> bool: ...

    def cut_network(self) -> None: ...

    def collect_evidence(self, alert: Alert) -> Path: ...


def respond(alert: Alert, target: Target) -> None:
    """Carry out the alert's action on its sandbox; fill action_taken/_result."""
    action = alert.action
    if action == "alert":
        return
    if target.observe:
        alert.action_taken = f"would {action}"
        alert.action_result = "observe mode: nothing done"
        return
    handler: Callable[[Alert, Target], str] = _HANDLERS[action]
    alert.action_taken = action
    try:
        alert.action_result = handler(alert, target)
    except Exception as exc:  # an action failing must still leave its alert recorded
        alert.action_result = f"failed: {exc}"


def _kill(alert: Alert, target: Target) -> str:
    pid = alert.pid
    if not pid:
        return "no process to kill"
    return "killed" if _signal_all([pid], target.cgroup) else f"pid {pid} already gone"


def _kill_tree(alert: Alert, target: Target) -> str:
    pid = alert.pid
    if not pid:
        return "no process to kill"
    # Frozen, nothing in the sandbox can fork while its tree is read and killed.  A freeze that
    # could not finish (it is undone) still leaves the tree to kill as it is, forks racing.
    try:
        target.cgroup.freeze()
        frozen, unfrozen_why = True, ""
    except CorralError as e:
        frozen, unfrozen_why = False, f", without freezing first ({e})"
    try:
        killed = _signal_all([pid, *descendants(pid, target.cgroup.pids())], target.cgroup)
    finally:
        if frozen:
            target.cgroup.thaw()  # (a process frozen by v1's freezer dies only once thawed)
    return f"killed {killed} process{'es' if killed != 1 else ''}{unfrozen_why}"


def _freeze(alert: Alert, target: Target) -> str:
    target.cgroup.freeze()
    bundle = target.collect_evidence(alert)
    return f"frozen; evidence in {bundle}"


def _cut_network(alert: Alert, target: Target) -> str:
    target.cut_network()
    return "egress denied, established flows dropped"


def _stop(alert: Alert, target: Target) -> str:
    target.cgroup.kill_all()
    return "every process in the sandbox killed"


_HANDLERS: dict[str, Callable[[Alert, Target], str]] = {
    "kill": _kill, "kill_tree": _kill_tree, "freeze": _freeze, "cut_network": _cut_network, "stop": _stop,
}


def descendants(root: int, candidates: list[int]) -> list[int]:
    """Processes among `candidates` whose parent chain reaches `root`."""
    parent: dict[int, int] = {}
    for pid in candidates:
        ppid = _ppid(pid)
        if ppid is not None:
            parent[pid] = ppid
    out = []
    for pid in candidates:
        seen, p = set(), parent.get(pid)
        while p is not None and p not in seen and p != root:
            seen.add(p)
            p = parent.get(p)
        if p == root and pid != root:
            out.append(pid)
    return out


def _ppid(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[1]) if fields is not None else None


def _signal_all(pids: list[int], cgroup: SandboxCgroup) -> int:
    """SIGKILL each pid that is (still) in this sandbox; returns how many."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
    # Checked after the pidfds pin the processes: a pid reused meanwhile by a
    # process outside the sandbox is not a member, and is left alone.  (Each
    # process's own /proc/PID/cgroup: reading every step's member list costs
    # ms per kill in a sandbox of hundreds of steps.)
    killed = 0
    for pid, fd in fds.items():
        try:
            if cgroup.holds(pid):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed += 1
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)
    return killed
