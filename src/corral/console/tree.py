"""A sandbox's process tree, rebuilt from its stored fork, exec and exit events."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def process_tree(events: Iterable[dict[str, Any]], alerts: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The roots of the tree (each node: pid, ppid, step, exe, cmdline, started, exit, alerts, children).

    `events` are stored events (Event.to_dict()) oldest first; a process
    appears when it forks or execs; a node's `alerts` are the rules that fired
    on it with their severity, so a console can mark the offending processes.
    """
    nodes: dict[int, dict[str, Any]] = {}

    def node(pid: int, ppid: int, event: dict[str, Any]) -> dict[str, Any]:
        if pid not in nodes:
            nodes[pid] = {"pid": pid, "ppid": ppid, "step": event.get("step_id"), "exe": "",
                                  "cmdline": event.get("comm", ""), "started": event.get("time"), "exit": None,
                                  "alerts": [], "children": []}
        return nodes[pid]

    for e in events:
        kind, pid = e.get("kind"), e.get("pid", 0)
        if kind == "fork":
            child = node(int(e.get("child_pid", 0)), pid, e)
            child["cmdline"] = child["cmdline"] or e.get("comm", "")
        elif kind == "exec":
            n = node(pid, e.get("ppid", 0), e)
            n["exe"] = e.get("filename", "")
            n["cmdline"] = " ".join(e.get("argv") or []) or n["exe"]
        elif kind == "exit" and pid in nodes:
            nodes[pid]["exit"] = {"code": e.get("exit_code"), "signal": e.get("signal")}
    for a in alerts:
        offender = nodes.get(int(a.get("pid", 0)))
        if offender is not None:
            offender["alerts"].append({"rule": a.get("rule"), "severity": a.get("severity")})
    roots = []
    for n in nodes.values():
        parent = nodes.get(n["ppid"])
        if parent is not None and parent is not n:
            parent["children"].append(n)
        else:
            roots.append(n)
    return roots
