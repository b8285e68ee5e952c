"""`corral lab up|down|status`, `corral demo` and `corral drill`: add_drill_parsers() adds them to corral's
command line."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from corral.drills import lab as lab_mod


def add_drill_parsers(sub: Any) -> None:
    """Add the `lab`, `demo` and `drill` subcommands to `sub` (what ArgumentParser.add_subparsers returned)."""
    lab = sub.add_parser(
        "lab", help="a drill network with no route out: fake internet, pool, sshd, internal hosts, metadata",
        description="The drill lab: network namespaces with no route out, holding a fake internet host with "
                    "OpenSSH, a stratum mining pool, an HTTP upload sink, a reverse-shell catcher, DNS, a fake "
                    "internal network (10.20.0.0/24) and cloud metadata stubs, all on documentation and private "
                    "addresses, every access logged. Run a sandbox in it with `corral run --netns NAME`.",
        epilog="examples:\n  corral lab up\n  corral run --mode observe --netns corral-lab -- "
               f"curl -s http://{lab_mod.METADATA_HOSTS[0]}/latest/meta-data/\n"
               "  corral lab status --json\n  corral lab down",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    lab.add_argument("action", choices=("up", "down", "status"),
                     help="up: make it unless it is up (idempotent); down: remove everything; status: say "
                          "what is up (exit 1 if it is not)")
    lab.add_argument("--name", default=lab_mod.DEFAULT_NAME,
                     help="the lab's name, which is also its sandbox-side namespace (default: %(default)s)")
    lab.add_argument("--key", action="append", default=[], metavar="PUBKEY_FILE",
                     help="with up: let this SSH public key log in to the lab's sshd; repeatable")
    lab.add_argument("--json", action="store_true", help="with status: print the status as JSON")
    lab.set_defaults(func=cmd_lab)

    demo = sub.add_parser(
        "demo", help="watch corral catch a scripted rogue agent (tunnel, miner, scan, credentials) in the lab",
        description="A scripted agent does a small coding task in a sandbox attached to the drill lab, then "
                    "turns rogue as the ROME agent did: it maps the internal network, opens a reverse SSH tunnel, "
                    "starts a crypto miner and reads credentials. corral's alerts and actions are shown live, "
                    "then the episode's verdict and where the incident data is. Brings the lab up (and down) "
                    "if it is not up. Exit status 0 when the verdict names the tunnel and the miner.")
    demo.add_argument("--out", metavar="DIR", help="where the incident data goes (default: a new "
                      "corral-demo-* directory in the temporary directory)")
    demo.add_argument("--lab", default=lab_mod.DEFAULT_NAME, metavar="NAME", help="the lab to use or bring up")
    demo.add_argument("--colour", "--color", choices=("auto", "always", "never"), default="auto",
                      help="colour alerts by severity (auto: when stdout is a terminal)")
    demo.set_defaults(func=cmd_demo)

    drill = sub.add_parser(
        "drill", help="the drill battery: real attacks in the lab, each one detected? prevented?",
        description=_paragraphs(
            "Run the drill battery: real attacks (OpenSSH and autossh tunnels, socat, ncat, nmap, curl, wget, a "
            "miner written in Python against the lab's pool, reverse shells, scans, metadata and credential theft, "
            "persistence, escapes, DNS exfiltration...), each a short script run as one step of a corral sandbox "
            "attached to the drill lab, which has no route out. Brings the lab up (and down) if it is not up.",
            "observe mode: every scenario must be detected (an alert of its category, severity medium or more, "
            "naming its step), and must have happened (the lab's servers saw it). enforce mode (the default "
            "policy): every scenario it is expected to prevent must leave no trace in the lab's server logs; the "
            "others must be detected.",
            "Prints a table per mode and a summary line; progress goes to stderr. Exit status: 0 when nothing "
            "was missed, 1 when a scenario was missed or broken (it could not run, or did not happen in observe "
            "mode), 2 on errors, 130 when interrupted. What each scenario does: docs/drills.md."),
        epilog="examples:\n"
               "  corral drill                        # every scenario, observe then enforce (~1 min)\n"
               "  corral drill --mode enforce --json drill.json\n"
               "  corral drill --only tunnel --only 'miner-*'   # a category, a glob of names\n"
               "  corral drill --list                 # the catalogue",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    drill.add_argument("--only", action="append", default=[], metavar="PATTERN",
                       help="run only scenarios whose name matches this glob, or of this category; repeatable, "
                            "or comma-separated")
    drill.add_argument("--mode", choices=("observe", "enforce"),
                       help="run in this mode only (default: observe, then enforce)")
    drill.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    drill.add_argument("--lab", default=lab_mod.DEFAULT_NAME, metavar="NAME",
                       help="the lab to use or bring up (default: %(default)s)")
    drill.add_argument("--list", action="store_true", help="list the scenarios (with --only: those selected) and exit")
    drill.set_defaults(func=cmd_drill)


def _paragraphs(*texts: str) -> str:
    """Paragraphs filled for a terminal (RawDescriptionHelpFormatter keeps them, and the examples, as they are)."""
    return "\n\n".join(textwrap.fill(t, 100) for t in texts)


def _say(line: str) -> None:
    print(f"corral: {line}", file=sys.stderr, flush=True)


def cmd_lab(args: argparse.Namespace) -> int:
    lab = lab_mod.Lab(args.name, progress=_say)
    if args.action == "up":
        made = lab.up()
        for path in args.key:
            with open(path) as f:
                lab.authorize_key(f.read())
        _print_status(lab.status(), "made now" if made else "already up")
        return 0
    if args.action == "down":
        removed = lab.down()
        print(f"lab {lab.name}: " + ("; ".join(removed) + " removed" if removed else "nothing to remove"))
        return 0
    status = lab.status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status, "up" if status["up"] else "NOT UP: " + "; ".join(status["problems"]))
    return 0 if status["up"] else 1


def _print_status(status: dict[str, Any], how: str) -> None:
    print(f"lab {status['name']}: {how}")
    if not status["up"]:
        return
    rows = [("sandbox side", f"netns {status['client_netns']} ({lab_mod.CLIENT_ADDR}): "
                             f"corral run --netns {status['client_netns']} ...", "no route out"),
            *status["services"]]
    width = max(len(r[0]) for r in rows)
    for what, where, note in rows:
        print(f"  {what:<{width}}  {where}  ({note})")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(status["accesses"].items())) or "none yet"
    print(f"  {'access logs':<{width}}  {status['logs']}/ (accesses: {counts})")
    print(f"  {'ssh keys':<{width}}  {status['authorized_keys']}")


def cmd_demo(args: argparse.Namespace) -> int:
    from corral.drills.demo import run_demo

    colour = {"auto": None, "always": True, "never": False}[args.colour]
    return run_demo(args.out, lab_name=args.lab, colour=colour)


def cmd_drill(args: argparse.Namespace) -> int:
    from corral.drills import battery, scenarios
    from corral.errors import CorralError

    patterns = [p.strip() for arg in args.only for p in arg.split(",") if p.strip()]
    selected = scenarios.select(patterns)
    if args.list:
        width = max(len(s.name) for s in selected)
        for s in selected:
            enforce = f"prevented by {s.stopped_by}" if s.prevents else "detected"
            print(f"{s.name:<{width}}  {s.category:<20}  {s.summary}  [enforce: {enforce}]")
        return 0
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise CorralError(f"--json {args.json}: its directory does not exist")
    modes = (args.mode,) if args.mode else battery.MODES

    def show(report: battery.Report) -> None:
        print(battery.format_table(report), flush=True)

    try:
        reports = battery.run_drill(selected, modes, lab_name=args.lab, progress=_say, on_report=show)
    except KeyboardInterrupt:
        _say("drill interrupted: its sandboxes, their processes and the lab (if the drill made it) were removed")
        return 130
    if args.json:
        battery.write_json(reports, args.json)
        _say(f"results written to {args.json}")
    if len(reports) > 1:
        print(f"corral drill: {'PASS' if all(r.ok for r in reports) else 'FAIL'}: "
              + "; ".join(f"{r.mode}: {r.missed} missed" + (f", {r.broken} broken" if r.broken else "")
                          for r in reports))
    return 0 if all(r.ok for r in reports) else 1
