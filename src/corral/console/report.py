"""Incident reports: what an episode (or one sandbox) did, step by step, and what corral did about it.

``build_report(store, ident)`` reads the store and returns a plain dict (which
is also the JSON format); ``render_markdown`` and ``render_html`` turn that dict
into a document.  They hold no state, so `corral report` and the API server
(`GET /api/report/ID`) produce the same report.

Everything an agent controls (commands, argv, alert outputs, paths) reaches a
terminal or a browser through ``printable`` (control characters shown as
escapes: an argv holding terminal escape sequences must not drive the reader's
terminal) and, in HTML, ``html.escape``.
"""

from __future__ import annotations

import datetime
import html
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from corral import events as ev
from corral.console.tree import process_tree
from corral.detect.engine import SEVERITIES
from corral.detect.risk import risk
from corral.errors import CorralError
from corral.sensor.host import owner_alive
from corral.store.base import Store

#: Processes listed per step; a step that ran a whole build would drown the alerts.
MAX_PROCESSES_PER_STEP = 200
#: Alerts read per sandbox (storms are folded by the engine, so real sandboxes stay far below).
MAX_ALERTS = 100_000
EVENT_PAGE = 5000
#: Stored events that rebuild the process tree.
TREE_KINDS = ("fork", "exec", "exit")


class NotFound(CorralError):
    """No episode or sandbox of that name in the store."""


# -- formatting shared with the CLI queries ----------------------------------------------

def printable(text: str) -> str:
    """`text` with control characters (newlines included) written as escapes."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            escaped = repr(ch)[1:-1]  # '\n', '\t', '\x1b', '\u2028'...
            out.append(escaped if escaped != ch else f"\\x{ord(ch):02x}")
    return "".join(out)


def ellipsize(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    flat = printable(text)
    return flat if len(flat) <= width else flat[:max(width - 1, 0)] + "…"


def moment(when: str | int) -> datetime.datetime:
    """An RFC 3339 time (as stored) or ns since the epoch, in local time."""
    if isinstance(when, int):
        return datetime.datetime.fromtimestamp(when / 1e9).astimezone()
    return datetime.datetime.fromisoformat(when).astimezone()


def short_time(when: str | int, *, ms: bool = False, today: datetime.date | None = None) -> str:
    """Local time, as short as is unambiguous: 14:05:03 today, Nov 26 14:05:03 this year, else the date."""
    at = moment(when)
    today = today or datetime.date.today()
    fraction = f".{at.microsecond // 1000:03d}" if ms else ""
    if at.date() == today:
        return at.strftime("%H:%M:%S") + fraction
    if at.year == today.year:
        return at.strftime("%b %d %H:%M:%S") + fraction
    return at.strftime("%Y-%m-%d %H:%M")


def human_duration(seconds: float | None) -> str:
    """350ms, 12.3s, 2m05s, 3h02m, 2d03h."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def sandbox_state(record: dict[str, Any]) -> str:
    """The state a sandbox is really in: 'lost' when it was never stopped and its owner is dead
    (the process that ran it died without closing it; its leftovers are reaped by the next run)."""
    state: str = record["state"]
    owner = record.get("owner_pid")
    if state != "stopped" and owner and not owner_alive(int(owner), int(record["created_ns"])):
        return "lost"
    return state


# -- building ------------------------------------------------------------------------------

def build_report(store: Store, ident: str) -> dict[str, Any]:
    """The report of episode `ident`, else of sandbox `ident` (a name or a unique prefix of one).

    Raises NotFound when neither exists."""
    subject, records = _subject(store, ident)
    sandboxes = [_sandbox_section(store, record) for record in records]
    return {
        "title": f"Incident report: {subject} {ident}",
        "subject": subject,
        "id": ident if subject == "episode" else records[0]["name"],
        "generated": ev.rfc3339(time.time_ns()),
        "summary": _summary(sandboxes),
        "sandboxes": sandboxes,
    }


def _subject(store: Store, ident: str) -> tuple[str, list[dict[str, Any]]]:
    episode = store.sandboxes(episode=ident)
    if episode and store.sandbox(ident) is None:
        return "episode", episode
    return "sandbox", [resolve_sandbox(store, ident, missing=f"no episode or sandbox {ident!r} in the store")]


def resolve_sandbox(store: Store, ident: str, *, missing: str | None = None) -> dict[str, Any]:
    """The record of the sandbox `ident` names: itself, or the one sandbox whose name starts with it."""
    exact = store.sandbox(ident)
    if exact is not None:
        return exact
    matches = [s for s in store.sandboxes() if s["name"].startswith(ident)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(s["name"] for s in matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise CorralError(f"{ident!r} names {len(matches)} sandboxes ({names}): give more of the name")
    raise NotFound(f"{missing or f'no sandbox {ident!r} in the store'} (`corral ps --all` lists the sandboxes; "
                   "pass --data DIR for another store)")


def _stored_events(store: Store, sandbox: str, kinds: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Every stored event of these kinds of a sandbox, oldest first, read a page at a time."""
    after = 0
    while True:
        page = store.events(sandbox=sandbox, kinds=kinds, after=after, limit=EVENT_PAGE)
        yield from page
        if len(page) < EVENT_PAGE:
            return
        after = page[-1]["seq"]


def _sandbox_section(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    name = record["name"]
    alerts = store.alerts(sandbox=name, limit=MAX_ALERTS)
    roots = process_tree(_stored_events(store, name, TREE_KINDS), alerts)
    steps = []
    numbers = set()
    for step in store.steps(name):
        number = step["step"]
        numbers.add(number)
        processes, omitted = _capped([r for r in roots if r["step"] == number], MAX_PROCESSES_PER_STEP)
        steps.append({
            "step": number, "command": step["command"],
            "started": _iso(step["started_ns"]), "ended": _iso(step["ended_ns"]),
            "duration_s": _seconds(step["started_ns"], step["ended_ns"]), "exit_code": step["exit_code"],
            "alerts": [a for a in alerts if a.get("step") == number],
            "processes": processes, "processes_omitted": omitted,
        })
    return {
        "name": name, "episode": record["episode"], "policy": record["policy"], "mode": record["mode"],
        "state": sandbox_state(record), "recorded_state": record["state"], "owner_pid": record["owner_pid"],
        "created": _iso(record["created_ns"]), "ended": _iso(record["ended_ns"]),
        "duration_s": _seconds(record["created_ns"], record["ended_ns"]), "limits": record["limits"],
        "steps": steps,
        # Alerts outside any recorded step (step 0: before the first one, e.g. a DNS question).
        "other_alerts": [a for a in alerts if a.get("step") not in numbers],
        "evidence": [_evidence(e) for e in store.evidence(name)],
    }


def _capped(roots: list[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], int]:
    """The tree cut to its first `limit` processes (depth first), and how many were left out."""
    kept = 0
    omitted = 0

    def cut(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal kept, omitted
        out = []
        for n in nodes:
            if kept >= limit:
                omitted += 1 + _count(n["children"])
                continue
            kept += 1
            out.append({**n, "children": cut(n["children"])})
        return out

    return cut(roots), omitted


def _count(nodes: list[dict[str, Any]]) -> int:
    return sum(1 + _count(n["children"]) for n in nodes)


def _evidence(stored: dict[str, Any]) -> dict[str, Any]:
    """What an investigator first wants of a bundle; the bundle itself stays at its path."""
    bundle = stored["bundle"] or {}
    workspace = [f for f in bundle.get("workspace", []) if "path" in f]
    return {
        "alert_id": stored["alert_id"], "rule": bundle.get("alert", {}).get("rule"), "path": stored["path"],
        "time": _iso(stored["time_ns"]), "error": bundle.get("error"),
        "processes": [{"pid": p.get("pid"), "ppid": p.get("ppid"), "step": p.get("step"),
                       "cmdline": " ".join(p.get("argv") or []) or p.get("comm", ""), "exe": p.get("exe"),
                       "gone": bool(p.get("gone"))} for p in bundle.get("processes", [])],
        "sockets": bundle.get("sockets", []),
        "binaries": bundle.get("binaries", []),
        "workspace_files": len(workspace),
        "workspace_truncated": any(f.get("truncated") for f in bundle.get("workspace", [])),
        "recent_events": len(bundle.get("recent_events", [])),
    }


def _summary(sandboxes: list[dict[str, Any]]) -> dict[str, Any]:
    """The episode's verdict: the fields of Sandbox.verdict() that a store can give, and a headline."""
    alerts = [a for s in sandboxes for a in _alerts_of(s)]
    by_severity = Counter(a["severity"] for a in alerts)
    rule_counts = Counter((a["rule"], a["severity"]) for a in alerts)
    steps = [st for s in sandboxes for st in s["steps"]]
    starts = [s["created"] for s in sandboxes]
    ends = [s["ended"] for s in sandboxes]
    ended = max(ends) if ends and None not in ends else None  # still running: no end yet
    return {
        "worst_severity": max(by_severity, key=SEVERITIES.index) if alerts else None,
        "risk": risk((a["rule"], a["severity"]) for a in alerts),
        "alerts": len(alerts),
        "alerts_by_severity": {s: by_severity[s] for s in reversed(SEVERITIES) if by_severity[s]},
        "categories": sorted({a["category"] for a in alerts}),
        "rules": sorted({a["rule"] for a in alerts}),
        "rule_counts": [{"rule": r, "severity": sev, "count": n} for (r, sev), n in
                        sorted(rule_counts.items(), key=lambda kv: (-SEVERITIES.index(kv[0][1]), -kv[1], kv[0][0]))],
        "sandboxes": len(sandboxes),
        "steps": len(steps),
        "steps_with_alerts": sum(1 for st in steps if st["alerts"]),
        "modes": sorted({s["mode"] for s in sandboxes}),
        "started": min(starts) if starts else None,
        "ended": ended,
        "duration_s": round((moment(ended) - moment(min(starts))).total_seconds(), 3) if ended and starts else None,
        "actions": [{"sandbox": a.get("sandbox"), "step": a.get("step"), "time": a["time"], "rule": a["rule"],
                     "action": a["action"], "taken": a["action_taken"], "result": a["action_result"]}
                    for a in sorted(alerts, key=lambda a: str(a["time"])) if a["action"] != "alert"],
        "headline": _headline(sandboxes, alerts, by_severity),
    }


def _alerts_of(section: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for step in section["steps"]:
        yield from step["alerts"]
    yield from section["other_alerts"]


def _headline(sandboxes: list[dict[str, Any]], alerts: list[dict[str, Any]], by_severity: Counter[str]) -> str:
    steps = sum(len(s["steps"]) for s in sandboxes)
    where = f"{steps} step{_s(steps)}" + (f" in {len(sandboxes)} sandboxes" if len(sandboxes) > 1 else "")
    if not alerts:
        return f"No alerts in {where}."
    counts = ", ".join(f"{n} {sev}" for sev, n in sorted(by_severity.items(), key=lambda kv: -SEVERITIES.index(kv[0])))
    guilty = len({(a.get("sandbox"), a.get("step")) for a in alerts})
    line = (f"{len(alerts)} alert{_s(len(alerts))} ({counts}) in "
            f"{', '.join(sorted({a['category'] for a in alerts}))}, raised in {guilty} of {where}.")
    acted = [a for a in alerts if a["action"] != "alert"]
    if acted:
        done = Counter(a["action_taken"] for a in acted)
        line += " Response: " + ", ".join(f"{t}" + (f" ×{n}" if n > 1 else "") for t, n in done.items()) + "."
    return line


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _iso(ns: int | None) -> str | None:
    return ev.rfc3339(ns) if ns is not None else None


def _seconds(start_ns: int | None, end_ns: int | None) -> float | None:
    return round((end_ns - start_ns) / 1e9, 3) if start_ns is not None and end_ns is not None else None


# -- Markdown --------------------------------------------------------------------------------

def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown that also reads well as plain text in a terminal."""
    today = _report_day(report)
    out: list[str] = [f"# {printable(report['title'])}", "",
                      f"Generated {_long_time(report['generated'])}; times are local.", "", "## Summary", ""]
    s = report["summary"]
    out += [f"**Verdict: {(s['worst_severity'] or 'clean').upper()}.** {printable(s['headline'])}", ""]
    if s["alerts"]:
        out.append(f"- Worst severity: **{s['worst_severity']}**; categories: {', '.join(s['categories'])}")
        out.append(f"- Risk: {s['risk']} (1 - product of (1 - weight) over the distinct rules that fired)")
        out.append("- Rules: " + "; ".join(f"{_code(r['rule'])} ({r['severity']}"
                                           + (f", ×{r['count']})" if r["count"] > 1 else ")")
                                           for r in s["rule_counts"]))
    out.append("- Sandboxes: " + ", ".join(f"{_code(sb['name'])} ({sb['mode']}, {sb['state']})"
                                          for sb in report["sandboxes"]))
    out.append(f"- Steps: {s['steps']}, {s['steps_with_alerts']} with alerts")
    if s["started"]:
        end = f" to {short_time(s['ended'], today=today)}" if s["ended"] else ", still running"
        out.append(f"- When: {_long_time(s['started'])}{end} ({human_duration(s['duration_s'])})")
    out += ["", "## What happened"]
    for sb in report["sandboxes"]:
        out += _md_sandbox(sb, today)
    out += ["", "## What was done", ""]
    if s["actions"]:
        for a in s["actions"]:
            out.append(f"- {short_time(a['time'], today=today)} {_code(a['sandbox'] or '?')} step {a['step']}, "
                       f"{_code(a['rule'])}: {printable(_action(a['taken'], a['result']))}")
    else:
        out.append("- No rule asked for more than an alert." if s["alerts"] else "- Nothing needed doing.")
    for sb in report["sandboxes"]:
        out.append(f"- {_code(sb['name'])} is now {_state_words(sb)}.")
    return "\n".join(out) + "\n"


def _md_sandbox(sb: dict[str, Any], today: datetime.date) -> list[str]:
    out = ["", f"### Sandbox {_code(sb['name'])}", ""]
    ran = f"ran {short_time(sb['created'], today=today)}"
    ran += (f" to {short_time(sb['ended'], today=today)} ({human_duration(sb['duration_s'])})"
            if sb["ended"] else ", not ended")
    episode = f"episode {_code(sb['episode'])}, " if sb["episode"] else ""
    out.append(f"{episode}{sb['mode']} mode, policy {_code(sb['policy'])}, {_state_words(sb)}; {ran}; "
               f"limits: {_limits(sb['limits'])}")
    if not sb["steps"]:
        out += ["", "No steps were run."]
    for step in sb["steps"]:
        when = f", at {short_time(step['started'], today=today)}" if step["started"] else ""
        out += ["", f"#### Step {step['step']}: {_step_outcome(step, sb)}{when}", ""]
        out += ["    " + printable(line) for line in (step["command"] or "").split("\n")]
        out += ["", "Processes:", ""] if step["processes"] else ["", "No process was recorded (events pruned?)."]
        out += _md_tree(step["processes"], 0, today)
        if step["processes_omitted"]:
            out.append(f"- ... and {step['processes_omitted']} more")
        out += _md_alerts(step["alerts"], today, "Alerts:", "No alerts.")
    if sb["other_alerts"]:
        out += _md_alerts(sb["other_alerts"], today, "Alerts outside any step:", "")
    for bundle in sb["evidence"]:
        out += _md_evidence(bundle, today)
    return out


def _md_tree(nodes: list[dict[str, Any]], depth: int, today: datetime.date) -> list[str]:
    out = []
    for n in nodes:
        when = short_time(n["started"], today=today) + " " if n.get("started") else ""
        flag = " **<- " + ", ".join(printable(a["rule"]) for a in n["alerts"]) + "**" if n["alerts"] else ""
        out.append(f"{'  ' * depth}- {when}pid {n['pid']} {_code(ellipsize(n['cmdline'], 160))} "
                   f"{_exit_words(n['exit'])}{flag}")
        out += _md_tree(n["children"], depth + 1, today)
    return out


def _md_alerts(alerts: list[dict[str, Any]], today: datetime.date, title: str, none: str) -> list[str]:
    if not alerts:
        return ["", none] if none else []
    out = ["", title, ""]
    for i, a in enumerate(alerts, 1):
        folded = f" (+{a['folded']} folded)" if a.get("folded") else ""
        out.append(f"{i}. {short_time(a['time'], today=today)} **{a['severity'].upper()}** {_code(a['rule'])} "
                   f"[{a['category']}], pid {a['pid']} {_code(ellipsize(a.get('cmdline') or '', 120))}{folded}")
        out.append(f"   {_code(a['output'])}")
        out.append(f"   Action: {printable(_action(a['action_taken'], a['action_result']))}")
    return out


def _md_evidence(bundle: dict[str, Any], today: datetime.date) -> list[str]:
    out = ["", f"#### Evidence: {_code(bundle['rule'] or bundle['alert_id'])}, "
               f"{short_time(bundle['time'], today=today)}" if bundle["time"] else "#### Evidence", "",
           f"Bundle: {_code(bundle['path'])}"]
    if bundle["error"]:
        return [*out, f"({printable(bundle['error'])})"]
    out.append("")
    out += _md_list("Processes", [
        f"pid {p['pid']} (parent {p['ppid']}, step {p['step']}) {_code(ellipsize(p['cmdline'], 120))}"
        + (" (gone)" if p["gone"] else "") for p in bundle["processes"]])
    out += _md_list("Sockets", [f"pid {k.get('pid')} {k.get('proto')} {printable(str(k.get('local')))} -> "
                                f"{printable(str(k.get('remote')))} {k.get('state')}" for k in bundle["sockets"]])
    out += _md_list("Executables run from writable places", [
        f"{_code(b.get('path', ''))} " + (f"copied, sha256 {b.get('sha256', '')[:16]}…, {b.get('size')} bytes"
                                          if b.get("copied") else "not copied (gone)") for b in bundle["binaries"]])
    more = " (listing truncated)" if bundle["workspace_truncated"] else ""
    out.append(f"- Workspace: {bundle['workspace_files']} files listed with hashes{more}; "
               f"{bundle['recent_events']} recent events of the step kept")
    return out


def _md_list(title: str, items: list[str]) -> list[str]:
    if not items:
        return [f"- {title}: none"]
    return [f"- {title} ({len(items)}):", *(f"  - {item}" for item in items)]


def _code(text: str) -> str:
    """An inline code span that survives backticks in `text`."""
    flat = printable(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", flat)), default=0) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


# -- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:70em;
color:#1d2230;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccd;padding-bottom:.2em;margin-top:1.6em}
h3{margin-top:1.4em}h4{margin:1.2em 0 .4em}
code,pre{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f3f4f8;padding:.5em .7em;border-radius:4px;white-space:pre-wrap;word-break:break-all;margin:.3em 0}
.headline{font-size:1.1em;font-weight:600;padding:.6em .8em;border-radius:4px;background:#eef1f6}
.sev{display:inline-block;min-width:5.5em;text-align:center;border-radius:3px;font-size:.8em;font-weight:700;
padding:0 .4em;color:#fff;text-transform:uppercase}
.critical{background:#a4161a}.high{background:#d9480f}.medium{background:#e0a800;color:#222}
.low{background:#5c7cfa}.info{background:#868e96}.clean{background:#2b8a3e}
table{border-collapse:collapse;width:100%;margin:.4em 0}
td,th{border-bottom:1px solid #e3e5ee;padding:.25em .5em;text-align:left;vertical-align:top}
th{font-weight:600;color:#555}.muted{color:#777}.hit{color:#a4161a;font-weight:600}
ul.tree{list-style:none;padding-left:1.2em;margin:.2em 0}
.step{border-left:3px solid #ccd;padding-left:1em;margin:1em 0}.step.alerted{border-left-color:#a4161a}
"""


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS, nothing fetched)."""
    today = _report_day(report)
    s = report["summary"]
    worst = s["worst_severity"] or "clean"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(report['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_h(report['title'])}</h1>",
        f'<p class="muted">Generated {_h(_long_time(report["generated"]))}; times are local.</p>',
        "<h2>Summary</h2>",
        f'<p class="headline"><span class="sev {worst}">{_h(worst)}</span> {_h(s["headline"])}</p>',
        "<table>",
    ]
    rows = [("Risk", f"{s['risk']}"), ("Categories", _h(", ".join(s["categories"])) or "none"),
            ("Rules", "<br>".join(f'{_sev(r["severity"])} {_h(r["rule"])}' + (f' ×{r["count"]}' if r["count"] > 1
                                                                                else "") for r in s["rule_counts"])
             or "none"),
            ("Sandboxes", "<br>".join(f"<code>{_h(sb['name'])}</code> {_h(sb['mode'])}, {_h(sb['state'])}"
                                      for sb in report["sandboxes"])),
            ("Steps", f"{s['steps']}, {s['steps_with_alerts']} with alerts")]
    if s["started"]:
        end = f" to {_h(short_time(s['ended'], today=today))}" if s["ended"] else ", still running"
        rows.append(("When", f"{_h(_long_time(s['started']))}{end} ({_h(human_duration(s['duration_s']))})"))
    parts += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows]
    parts += ["</table>", "<h2>What happened</h2>"]
    for sb in report["sandboxes"]:
        parts += _html_sandbox(sb, today)
    parts.append("<h2>What was done</h2><ul>")
    for a in s["actions"]:
        parts.append(f"<li>{_h(short_time(a['time'], today=today))} <code>{_h(a['sandbox'] or '?')}</code> step "
                     f"{a['step']}, {_h(a['rule'])}: <b>{_h(_action(a['taken'], a['result']))}</b></li>")
    if not s["actions"]:
        parts.append("<li>" + ("No rule asked for more than an alert." if s["alerts"] else "Nothing needed doing.")
                     + "</li>")
    parts += [f"<li><code>{_h(sb['name'])}</code> is now {_h(_state_words(sb))}.</li>" for sb in report["sandboxes"]]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


def _html_sandbox(sb: dict[str, Any], today: datetime.date) -> list[str]:
    ran = f"ran {short_time(sb['created'], today=today)}"
    ran += (f" to {short_time(sb['ended'], today=today)} ({human_duration(sb['duration_s'])})"
            if sb["ended"] else ", not ended")
    episode = f"episode <code>{_h(sb['episode'])}</code>, " if sb["episode"] else ""
    out = [f"<h3>Sandbox <code>{_h(sb['name'])}</code></h3>",
           f'<p class="muted">{episode}{_h(sb["mode"])} mode, policy <code>{_h(sb["policy"])}</code>, '
           f"{_h(_state_words(sb))}; {_h(ran)}; limits: {_h(_limits(sb['limits']))}</p>"]
    if not sb["steps"]:
        out.append("<p>No steps were run.</p>")
    for step in sb["steps"]:
        when = f", at {_h(short_time(step['started'], today=today))}" if step["started"] else ""
        out += [f'<div class="step{" alerted" if step["alerts"] else ""}">',
                f"<h4>Step {step['step']}: {_h(_step_outcome(step, sb))}{when}</h4>",
                f"<pre>{_h(step['command'] or '', keep_newlines=True)}</pre>"]
        if step["processes"]:
            out += ["<p>Processes:</p>", *_html_tree(step["processes"], today)]
            if step["processes_omitted"]:
                out.append(f"<p class=\"muted\">... and {step['processes_omitted']} more</p>")
        else:
            out.append('<p class="muted">No process was recorded (events pruned?).</p>')
        out += _html_alerts(step["alerts"], today) if step["alerts"] else ['<p class="muted">No alerts.</p>']
        out.append("</div>")
    if sb["other_alerts"]:
        out += ["<h4>Alerts outside any step</h4>", *_html_alerts(sb["other_alerts"], today)]
    for bundle in sb["evidence"]:
        out += _html_evidence(bundle, today)
    return out


def _html_tree(nodes: list[dict[str, Any]], today: datetime.date) -> list[str]:
    out = ['<ul class="tree">']
    for n in nodes:
        when = _h(short_time(n["started"], today=today)) + " " if n.get("started") else ""
        hit = ('<span class="hit"> &larr; ' + _h(", ".join(a["rule"] for a in n["alerts"])) + "</span>"
               if n["alerts"] else "")
        out.append(f'<li><span class="muted">{when}pid {n["pid"]}</span> <code>{_h(n["cmdline"])}</code> '
                   f'<span class="muted">{_h(_exit_words(n["exit"]))}</span>{hit}')
        if n["children"]:
            out += _html_tree(n["children"], today)
        out.append("</li>")
    return [*out, "</ul>"]


def _html_alerts(alerts: list[dict[str, Any]], today: datetime.date) -> list[str]:
    out = ["<table><tr><th>Time</th><th>Severity</th><th>Rule</th><th>What</th><th>Action</th></tr>"]
    for a in alerts:
        folded = f" (+{a['folded']} folded)" if a.get("folded") else ""
        out.append(f"<tr><td>{_h(short_time(a['time'], today=today))}</td><td>{_sev(a['severity'])}</td>"
                   f"<td>{_h(a['rule'])}<br><span class=\"muted\">{_h(a['category'])}</span></td>"
                   f"<td><code>{_h(a['output'])}</code><br><span class=\"muted\">pid {a['pid']}{_h(folded)}</span></td>"
                   f"<td>{_h(_action(a['action_taken'], a['action_result']))}</td></tr>")
    return [*out, "</table>"]


def _html_evidence(bundle: dict[str, Any], today: datetime.date) -> list[str]:
    when = f", {_h(short_time(bundle['time'], today=today))}" if bundle["time"] else ""
    out = [f"<h4>Evidence: {_h(bundle['rule'] or bundle['alert_id'])}{when}</h4>",
           f"<p>Bundle: <code>{_h(bundle['path'])}</code></p>"]
    if bundle["error"]:
        return [*out, f"<p>{_h(bundle['error'])}</p>"]
    out.append("<table><tr><th>Processes</th><td>" + ("<br>".join(
        f"pid {p['pid']} (parent {p['ppid']}, step {p['step']}) <code>{_h(ellipsize(p['cmdline'], 160))}</code>"
        + (" (gone)" if p["gone"] else "") for p in bundle["processes"]) or "none") + "</td></tr>")
    out.append("<tr><th>Sockets</th><td>" + ("<br>".join(
        f"pid {_h(str(k.get('pid')))} {_h(str(k.get('proto')))} {_h(str(k.get('local')))} &rarr; "
        f"{_h(str(k.get('remote')))} {_h(str(k.get('state')))}" for k in bundle["sockets"]) or "none") + "</td></tr>")
    out.append("<tr><th>Executables from writable places</th><td>" + ("<br>".join(
        f"<code>{_h(b.get('path', ''))}</code> "
        + (f"sha256 {_h(b.get('sha256', ''))}, {b.get('size')} bytes" if b.get("copied") else "not copied (gone)")
        for b in bundle["binaries"]) or "none") + "</td></tr>")
    more = " (listing truncated)" if bundle["workspace_truncated"] else ""
    out.append(f"<tr><th>Workspace</th><td>{bundle['workspace_files']} files listed with hashes{more}; "
               f"{bundle['recent_events']} recent events of the step kept</td></tr></table>")
    return out


def _h(text: str, *, keep_newlines: bool = False) -> str:
    """Text for HTML: escaped, control characters shown as escapes (newlines kept in <pre>)."""
    if keep_newlines:
        return "\n".join(html.escape(printable(line)) for line in text.split("\n"))
    return html.escape(printable(text))


def _sev(severity: str) -> str:
    return f'<span class="sev {html.escape(severity)}">{html.escape(severity)}</span>'


# -- words shared by both renderers --------------------------------------------------------

def _report_day(report: dict[str, Any]) -> datetime.date:
    """The day times in the report are shown relative to: its first sandbox's (so times stay short)."""
    started = report["summary"]["started"]
    return moment(started).date() if started else datetime.date.today()


def _long_time(when: str) -> str:
    return moment(when).strftime("%Y-%m-%d %H:%M:%S %Z")


def _action(taken: str, result: str) -> str:
    if taken == "alert":
        return "alert only"
    return f"{taken} ({result})" if result else taken


def _step_outcome(step: dict[str, Any], sb: dict[str, Any]) -> str:
    frozen = any(a["action_taken"] == "freeze" for a in step["alerts"])
    if step["exit_code"] is not None:
        ended = f"exit {step['exit_code']} after {human_duration(step['duration_s'])}"
        if not frozen:
            return ended
        return f"frozen by a rule, then killed ({ended})" if step["exit_code"] == 137 else \
            f"frozen by a rule, released, then {ended}"
    if frozen:
        return "frozen by a rule, no exit status yet"
    return "still running" if sb["state"] in ("running", "frozen") else "no exit status recorded"


def _exit_words(exit: dict[str, Any] | None) -> str:
    if exit is None:
        return "(no exit seen)"
    if exit.get("signal"):
        try:
            return f"killed by {signal.Signals(exit['signal']).name}"
        except ValueError:
            return f"killed by signal {exit['signal']}"
    return f"exit {exit.get('code')}"


def _state_words(sb: dict[str, Any]) -> str:
    if sb["state"] == "lost":
        return (f"lost (recorded {sb['recorded_state']}, but its owner, pid {sb['owner_pid']}, died without "
                "stopping it)")
    return str(sb["state"])


def _limits(limits: dict[str, Any]) -> str:
    named = {"cpus": "{} CPUs", "memory_bytes": "{} bytes of memory", "pids": "{} processes"}
    shown = [fmt.format(limits[k]) for k, fmt in named.items() if limits.get(k)]
    return ", ".join(shown) or "none"

