"""`corral alerts|events|ps|report`: questions answered from the store itself.

They open the store file directly (SQLite in WAL mode lets them read while a
sandbox or `corral serve` writes), so they work with no daemon running.
add_query_parsers() adds them to corral's command line.  --follow polls the
store for records past the last seq seen.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from corral import events as ev
from corral.console.report import (
    EVENT_PAGE,
    NotFound,
    build_report,
    ellipsize,
    human_duration,
    render_html,
    render_markdown,
    resolve_sandbox,
    sandbox_state,
    short_time,
)
from corral.detect.engine import SEVERITIES
from corral.errors import CorralError
from corral.store import DB_NAME, Store, default_data_dir, open_store

#: How often --follow looks for new records: well under a human's patience, a few cheap queries a second.
POLL_S = 0.3
#: `corral ps` without --all also lists sandboxes stopped this recently.
RECENT_S = 3600
#: Alerts read per poll by --follow: the store returns the newest `limit` past `after`, so a smaller page
#: could skip part of a burst that arrived between two polls.
FOLLOW_PAGE = 100_000
#: Width of tables written to a file or a pipe (on a terminal: the terminal's width).
PIPE_WIDTH = 120
MIN_WIDTH = 80
GAP = "  "

_DATA_HELP = "the store's directory (default: $CORRAL_DATA, else $XDG_STATE_HOME/corral, else ~/.local/state/corral)"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# -- the command line ---------------------------------------------------------------------

def add_query_parsers(sub: Any) -> None:
    """Add `alerts`, `events`, `ps` and `report` to `sub` (what ArgumentParser.add_subparsers returned)."""
    raw = argparse.RawDescriptionHelpFormatter

    alerts = sub.add_parser(
        "alerts", help="list alerts from the store (no daemon needed); --follow for new ones",
        description="List recorded alerts, oldest first (the newest --limit of them), in local time. "
                    "Filters combine. With --follow, keep printing new ones until Ctrl-C.",
        epilog="examples:\n  corral alerts --since 1h\n  corral alerts --severity high --episode rollout-17\n"
               "  corral alerts --since 09:00 --sandbox sb-4242\n"
               "  corral alerts --follow --json | jq .rule", formatter_class=raw)
    alerts.add_argument("--since", type=since_ns, metavar="DURATION|TIME",
                        help="only alerts since then: a duration back from now (90s, 10m, 2h, 1d, 1h30m) or a "
                             "local time (14:05, 2024-05-01, '2024-05-01 14:05')")
    alerts.add_argument("--severity", choices=SEVERITIES, metavar="MIN",
                        help=f"only this severity and worse ({', '.join(SEVERITIES)})")
    alerts.add_argument("--sandbox", metavar="ID", help="only this sandbox (its name, or a unique start of it)")
    alerts.add_argument("--episode", metavar="EP", help="only this episode")
    alerts.add_argument("-n", "--limit", type=_positive, default=1000, metavar="N",
                        help="at most the newest N (default: %(default)s)")
    alerts.add_argument("-f", "--follow", action="store_true", help="then print new alerts as they come, "
                        "until Ctrl-C")
    alerts.add_argument("--json", action="store_true", help="one JSON object per line, as stored "
                        "(Alert.to_dict() plus its seq)")
    alerts.add_argument("--data", metavar="DIR", help=_DATA_HELP)
    alerts.set_defaults(func=cmd_alerts)

    events = sub.add_parser(
        "events", help="list a sandbox's recorded events; --follow for new ones",
        description="List every recorded event of one sandbox, oldest first, in local time. With --follow, "
                    "keep printing new ones until Ctrl-C.",
        epilog="examples:\n  corral events --sandbox sb-4242\n  corral events --sandbox sb-4242 --kind exec "
               "--kind connect\n  corral events --sandbox sb-4242 --follow --json > events.jsonl",
        formatter_class=raw)
    events.add_argument("--sandbox", required=True, metavar="ID", help="the sandbox (its name, or a unique "
                        "start of it)")
    events.add_argument("--kind", action="append", default=[], metavar="K", choices=sorted(ev.KINDS),
                        help="only events of this kind (exec, connect, open, dns, flow, ...); repeatable")
    events.add_argument("-f", "--follow", action="store_true", help="then print new events as they come, "
                        "until Ctrl-C")
    events.add_argument("--json", action="store_true", help="one JSON object per line (Event.to_dict() plus "
                        "seq and sandbox)")
    events.add_argument("--data", metavar="DIR", help=_DATA_HELP)
    events.set_defaults(func=cmd_events)

    ps = sub.add_parser(
        "ps", help="list sandboxes: live, lost, and those stopped in the last hour",
        description="List recorded sandboxes, oldest first: those running or frozen, those lost (never stopped, "
                    "but the process that ran them is dead: it died without closing them), and those stopped "
                    f"in the last {RECENT_S // 60} minutes. --all lists every sandbox in the store.",
        epilog="examples:\n  corral ps\n  corral ps --all --json | jq '.[] | select(.alerts > 0) | .name'",
        formatter_class=raw)
    ps.add_argument("-a", "--all", action="store_true", help="every sandbox, however long ago it stopped")
    ps.add_argument("--json", action="store_true", help="a JSON array: the stored records, with the state "
                    "as shown (recorded_state: as stored), steps, and times in RFC 3339")
    ps.add_argument("--data", metavar="DIR", help=_DATA_HELP)
    ps.set_defaults(func=cmd_ps)

    report = sub.add_parser(
        "report", help="the incident report of an episode or a sandbox (Markdown, HTML or JSON)",
        description="Write the incident report of an episode (all its sandboxes) or of one sandbox: the verdict "
                    "(worst severity, categories, rules), then every step in order with its command, exit "
                    "status, duration, processes and alerts (with the action taken and how it went), the "
                    "evidence of frozen sandboxes, and what was done. HTML is one self-contained page.",
        epilog="examples:\n  corral report rollout-17\n  corral report sb-4242 --format html --out incident.html\n"
               "  corral report rollout-17 --format json | jq .summary", formatter_class=raw)
    report.add_argument("ident", metavar="EPISODE|SANDBOX", help="an episode label, or a sandbox (its name, or "
                        "a unique start of it)")
    report.add_argument("--format", choices=("md", "html", "json"),
                        help="md (default), html or json; with --out, also taken from its extension")
    report.add_argument("--out", metavar="FILE", help="write it here instead of to stdout")
    report.add_argument("--data", metavar="DIR", help=_DATA_HELP)
    report.set_defaults(func=cmd_report)


def since_ns(text: str) -> int:
    """--since: ns since the epoch, from a duration back from now or a local date/time."""
    value = text.strip()
    if re.fullmatch(rf"(?:{_DURATION.pattern})+", value):
        seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(value))
        return max(0, time.time_ns() - int(seconds * 1e9))
    try:
        clock = datetime.time.fromisoformat(value)
    except ValueError:
        pass
    else:  # a time of day: its latest occurrence
        at = datetime.datetime.combine(datetime.date.today(), clock)
        if at > datetime.datetime.now():
            at -= datetime.timedelta(days=1)
        return int(at.timestamp() * 1e9)
    try:
        ns = int(datetime.datetime.fromisoformat(value).timestamp() * 1e9)  # naive: local time
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (90s, 10m, 2h, 1d, 1h30m) nor a local time (14:05, 2024-05-01, "
            "'2024-05-01 14:05')") from None
    if not 0 <= ns < 2**63:  # times are stored as 64-bit ns since 1970
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: between 1970 and 2262")
    return ns


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return n


# -- the commands --------------------------------------------------------------------------

def cmd_alerts(args: argparse.Namespace, out: TextIO | None = None, stop: threading.Event | None = None) -> int:
    """Print the alerts that match; with --follow, then new ones until Ctrl-C or `stop` is set."""
    out = out or sys.stdout
    store = _open(args.data, create=args.follow)
    if store is None:
        _nothing_recorded(args.data)
        return 0
    try:
        sandbox = resolve_sandbox(store, args.sandbox)["name"] if args.sandbox else None

        def fetch(after: int, limit: int = FOLLOW_PAGE) -> list[dict[str, Any]]:
            return store.alerts(sandbox=sandbox, episode=args.episode, since_ns=args.since,
                                min_severity=args.severity, after=after, limit=limit)

        rows = fetch(0, args.limit)
        printer = _alert_printer(out, args.json, rows, follow=args.follow, sandbox_column=sandbox is None)
        printer(rows)
        if args.follow:
            print(f"corral: following new alerts in {store_dir(args.data)} (Ctrl-C to stop)", file=sys.stderr)
            follow(fetch, printer, rows[-1]["seq"] if rows else 0, stop)
        elif not rows:
            print("corral: no alerts match", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0


def cmd_events(args: argparse.Namespace, out: TextIO | None = None, stop: threading.Event | None = None) -> int:
    """Print a sandbox's events; with --follow, then new ones until Ctrl-C or `stop` is set."""
    out = out or sys.stdout
    store = _open(args.data, create=False)
    if store is None:
        raise NotFound(f"no sandbox {args.sandbox!r}: nothing is recorded in {store_dir(args.data)} "
                       "(pass --data DIR for another store)")
    try:
        sandbox = resolve_sandbox(store, args.sandbox)["name"]
        printer = _event_printer(out, args.json, sandbox)

        def fetch(after: int) -> list[dict[str, Any]]:
            return store.events(sandbox=sandbox, kinds=args.kind, after=after, limit=EVENT_PAGE)

        after = drain(fetch, printer, 0)
        if args.follow:
            print(f"corral: following new events of {sandbox} (Ctrl-C to stop)", file=sys.stderr)
            follow(fetch, printer, after, stop)
        elif not after:
            print(f"corral: no events recorded for {sandbox}" + (" of those kinds" if args.kind else ""),
                  file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0


def cmd_ps(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the sandboxes (see the `ps` parser's description for which)."""
    out = out or sys.stdout
    store = _open(args.data, create=False)
    rows: list[dict[str, Any]] = []
    hidden = 0
    if store is not None:
        try:
            recent = time.time_ns() - RECENT_S * 1_000_000_000
            for record in store.sandboxes():
                state = sandbox_state(record)
                if not args.all and state == "stopped" and (record["ended_ns"] or 0) < recent:
                    hidden += 1
                    continue
                rows.append({**record, "state": state, "recorded_state": record["state"],
                             "steps": record["steps"], "created": ev.rfc3339(record["created_ns"]),
                             "ended": ev.rfc3339(record["ended_ns"]) if record["ended_ns"] else None})
        finally:
            store.close()
    if args.json:
        out.write(json.dumps(rows, indent=2) + "\n")
        return 0
    columns = [Column("NAME", 24, 12), Column("EPISODE", 24, 8), Column("STATE", 7, 5), Column("MODE", 7, 7),
               Column("CREATED", 15, 8), Column("RAN", 6, 5, right=True), Column("STEPS", 5, 5, right=True),
               Column("ALERTS", 6, 6, right=True), Column("WORST", 8, 5)]
    now = time.time_ns()

    def ran(r: dict[str, Any]) -> str:
        if r["state"] == "lost":
            return "-"  # it ended when its owner died, which nobody recorded
        return human_duration(((r["ended_ns"] or now) - r["created_ns"]) / 1e9)

    cells = [[r["name"], r["episode"] or "-", r["state"], r["mode"], short_time(r["created_ns"]), ran(r),
              str(r["steps"]), str(r["alerts"]), r["worst_severity"] or "-"] for r in rows]
    if cells:
        table = Table(out, columns, fill=False, width=_width(out), rows=cells)
        table.write(cells)
    if store is None:
        _nothing_recorded(args.data)
    elif hidden:
        print(f"corral: {hidden} sandbox{'es' if hidden != 1 else ''} stopped over {RECENT_S // 60} minutes ago "
              "not shown (corral ps --all)", file=sys.stderr)
    elif not cells:
        print("corral: no sandboxes recorded", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Write the incident report of an episode or sandbox."""
    fmt = args.format or _format_of(args.out)
    store = _open(args.data, create=False)
    if store is None:
        raise NotFound(f"no episode or sandbox {args.ident!r}: nothing is recorded in {store_dir(args.data)} "
                       "(pass --data DIR for another store)")
    try:
        report = build_report(store, args.ident)
    finally:
        store.close()
    if fmt == "json":
        text = json.dumps(report, indent=2) + "\n"
    else:
        text = render_html(report) if fmt == "html" else render_markdown(report)
    if not args.out:
        (out or sys.stdout).write(text)
        return 0
    try:
        Path(args.out).write_text(text)
    except OSError as e:
        raise CorralError(f"cannot write the report to {args.out}: {e.strerror}") from e
    print(f"corral: report of {report['subject']} {report['id']} written to {args.out}", file=sys.stderr)
    return 0


def _format_of(path: str | None) -> str:
    suffix = Path(path).suffix.lower() if path else ""
    return {".html": "html", ".htm": "html", ".json": "json"}.get(suffix, "md")


# -- the store -----------------------------------------------------------------------------

def store_dir(data: str | None) -> Path:
    return Path(data) if data else default_data_dir()


def _open(data: str | None, *, create: bool) -> Store | None:
    """The store in --data; None when nothing was ever recorded there, unless `create` (a follower
    waits for the first record, so the store must exist for it to poll)."""
    directory = store_dir(data)
    if not create and not (directory / DB_NAME).exists():
        return None
    return open_store(directory)


def _nothing_recorded(data: str | None) -> None:
    print(f"corral: nothing is recorded in {store_dir(data)} yet (pass --data DIR for another store)",
          file=sys.stderr)


Fetch = Callable[[int], list[dict[str, Any]]]
Printer = Callable[[list[dict[str, Any]]], None]


def drain(fetch: Fetch, emit: Printer, after: int) -> int:
    """Emit what fetch(after) returns, a page at a time, until it returns nothing; the last seq seen."""
    while rows := fetch(after):
        emit(rows)
        after = rows[-1]["seq"]
    return after


def follow(fetch: Fetch, emit: Printer, after: int, stop: threading.Event | None = None,
           every: float = POLL_S) -> None:
    """Emit what fetch(after) finds past the last seq seen, polling, until `stop` is set (or Ctrl-C)."""
    stop = stop or threading.Event()
    while not stop.is_set():
        after = drain(fetch, emit, after)
        stop.wait(every)


# -- tables --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    header: str
    width: int  # wanted
    least: int  # what it may shrink to when the terminal is narrow
    right: bool = False


class Table:
    """Fixed-width columns, the last one (with `fill`) taking what is left of the line; cells cut
    with an ellipsis.  Widths are settled once, so rows can be written as they come."""

    def __init__(self, out: TextIO, columns: Sequence[Column], *, fill: bool, width: int,
                 rows: Sequence[Sequence[str]] = ()) -> None:
        self.out = out
        self.columns = list(columns)
        fixed = self.columns[:-1] if fill else self.columns
        # Known rows narrower than a column's wanted width give it back (a listing, not a stream).
        widths = [min(c.width, max([len(c.header), *(len(r[i]) for r in rows)])) if rows else c.width
                  for i, c in enumerate(fixed)]
        least = [min(c.least, w) for c, w in zip(fixed, widths, strict=True)]
        room = width - (self.columns[-1].least if fill else 0) - len(GAP) * (len(self.columns) - 1)
        while sum(widths) > room and any(w > m for w, m in zip(widths, least, strict=True)):
            i = max(range(len(widths)), key=lambda j: widths[j] - least[j])
            widths[i] -= 1
        if fill:
            widths.append(max(self.columns[-1].least, width - sum(widths) - len(GAP) * (len(self.columns) - 1)))
        self.widths = widths
        self.header_written = False

    def write(self, rows: Sequence[Sequence[str]]) -> None:
        lines = [] if self.header_written else [self._line([c.header for c in self.columns])]
        self.header_written = True
        lines += [self._line(r) for r in rows]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    def _line(self, cells: Sequence[str]) -> str:
        parts = []
        for c, w, cell in zip(self.columns, self.widths, cells, strict=True):
            text = ellipsize(cell, w)
            parts.append(text.rjust(w) if c.right else text.ljust(w))
        return GAP.join(parts).rstrip()


def _width(out: TextIO) -> int:
    if out.isatty():
        return max(MIN_WIDTH, shutil.get_terminal_size((PIPE_WIDTH, 24)).columns)
    return PIPE_WIDTH


def _alert_printer(out: TextIO, as_json: bool, first: list[dict[str, Any]], *, follow: bool,
                   sandbox_column: bool) -> Printer:
    if as_json:
        return _json_lines(out)
    # Without the SANDBOX column (one sandbox asked for), the output gets its room.
    columns = [Column("TIME", max([8, *(len(short_time(a["time"])) for a in first)]), 8),
               Column("SEVERITY", 8, 8), Column("RULE", 32, 16),
               *([Column("SANDBOX", 18, 12)] if sandbox_column else []),
               Column("STEP", 4, 4, right=True), Column("ACTION", 17, 8), Column("OUTPUT", 0, 16)]

    def cells(a: dict[str, Any]) -> list[str]:
        folded = f" (+{a['folded']} folded)" if a.get("folded") else ""
        return [short_time(a["time"]), a["severity"], a["rule"],
                *([a.get("sandbox") or "-"] if sandbox_column else []), str(a.get("step", "")),
                a["action_taken"], a["output"] + folded]

    table = Table(out, columns, fill=True, width=_width(out), rows=[] if follow else [cells(a) for a in first])
    return lambda rows: table.write([cells(a) for a in rows]) if rows else None


def _event_printer(out: TextIO, as_json: bool, sandbox: str) -> Printer:
    if as_json:
        emit = _json_lines(out)
        return lambda rows: emit([{**e, "sandbox": sandbox} for e in rows])
    columns = [Column("TIME", 12, 12), Column("STEP", 4, 4, right=True), Column("KIND", 11, 7),
               Column("PID", 7, 6, right=True), Column("COMM", 15, 8), Column("WHAT", 0, 20)]
    table = Table(out, columns, fill=True, width=_width(out))

    def cells(e: dict[str, Any]) -> list[str]:
        return [short_time(e["time"], ms=True), str(e.get("step_id", "")), e["kind"], str(e.get("pid", "")),
                e.get("comm", ""), ev.describe(e)]

    return lambda rows: table.write([cells(e) for e in rows])


def _json_lines(out: TextIO) -> Printer:
    def emit(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            out.write(json.dumps(row) + "\n")
        out.flush()
    return emit

