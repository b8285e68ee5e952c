"""`corral serve`, `corral exec` and `corral sandbox create|stop|release`: add_daemon_parsers() adds them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from corral.console.client import DEFAULT_LISTEN, DEFAULT_SOCKET

_URL_HELP = ("the daemon: unix:PATH or http://HOST:PORT (default: $CORRAL_URL, else unix:" + str(DEFAULT_SOCKET)
             + "; on TCP the token is $CORRAL_TOKEN or the data directory's token file)")


def add_daemon_parsers(sub: Any) -> None:
    """Add `serve`, `exec` and `sandbox` to `sub` (what ArgumentParser.add_subparsers returned)."""
    serve = sub.add_parser(
        "serve", help="run the node daemon: many sandboxes, one sensor, an API and a live web console",
        description="Run corral's daemon for this node: it owns the sensor and the sandboxes it makes, records "
                    "everything in the store, and serves a JSON API and a live web console (alerts as they "
                    "happen, sandboxes, process trees, evidence, incident reports). TCP needs the bearer token "
                    "(made at first start, kept 0600 in the data directory; the printed URL carries it for the "
                    "browser); the Unix socket is root's only. Ctrl-C or SIGTERM stops every sandbox it made.",
        epilog="examples:\n  corral serve\n  corral serve --listen 127.0.0.1:8080 --data /srv/corral\n"
               "  curl --unix-socket /run/corral/corral.sock http://x/api/sandboxes",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                       help="TCP address of the API and web console (default: %(default)s; '' for none)")
    serve.add_argument("--socket", default=str(DEFAULT_SOCKET), metavar="PATH",
                       help="Unix socket of the API, mode 0600 (default: %(default)s; '' for none)")
    serve.add_argument("--data", metavar="DIR", help="the store's directory (default: $CORRAL_DATA, else "
                       "~/.local/state/corral)")
    serve.add_argument("--rules", action="append", default=[], metavar="FILE",
                       help="a rule file (or directory of them) loaded after the built-in rules; repeatable")
    serve.add_argument("--retain-days", type=float, metavar="DAYS", help="delete events older than this "
                       "(alerts, steps and evidence are kept)")
    serve.add_argument("--max-events-mb", type=float, metavar="MB", help="delete the oldest events when "
                       "the store grows past this")
    serve.set_defaults(func=cmd_serve)

    exec_ = sub.add_parser(
        "exec", help="run one step in a sandbox of `corral serve` (route an agent's shell tool through this)",
        description="Run COMMAND as the next step of a sandbox that `corral serve` runs, print its output, and "
                    "exit with its status (128+N when killed by signal N). Alerts the step raised go to stderr. "
                    "Make a sandbox first with `corral sandbox create`.",
        epilog="examples:\n  SB=$(corral sandbox create --episode ep-17)\n  corral exec --sandbox $SB -- "
               "python3 -m pytest -q\n  corral exec --sandbox $SB -- 'make && ./a.out'   # one string: run by sh -c",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    exec_.add_argument("--sandbox", required=True, metavar="ID", help="the sandbox (from `corral sandbox create`)")
    exec_.add_argument("--timeout", type=float, metavar="S", help="kill the step after S seconds")
    exec_.add_argument("--url", help=_URL_HELP)
    exec_.add_argument("--json", action="store_true", help="print the step's result as JSON instead")
    exec_.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    exec_.set_defaults(func=cmd_exec)

    sandbox = sub.add_parser(
        "sandbox", help="make, stop or release a sandbox of `corral serve`",
        description="create: make a sandbox in the daemon and print its ID; stop: kill everything in it and "
                    "remove it; release: thaw a sandbox a rule froze (its evidence is kept).",
        epilog="examples:\n  corral sandbox create --mode observe --episode rollout-42\n"
               "  corral sandbox release sb-1234-abcd\n  corral sandbox stop sb-1234-abcd",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sandbox.add_argument("action", choices=("create", "stop", "release"))
    sandbox.add_argument("id", nargs="?", metavar="ID", help="the sandbox (stop, release)")
    sandbox.add_argument("--policy", default="default", help="with create: a policy name or YAML file")
    sandbox.add_argument("--mode", choices=("observe", "enforce"), help="with create: override the policy's mode")
    sandbox.add_argument("--episode", help="with create: the episode this sandbox belongs to")
    sandbox.add_argument("--netns", metavar="NAME", help="with create: use this network namespace (a lab's)")
    sandbox.add_argument("--allow", action="append", default=[], metavar="CIDR[:PORT]",
                         help="with create: allow egress there; repeatable")
    sandbox.add_argument("--allow-domain", action="append", default=[], metavar="NAME",
                         help="with create: allow names through the sandbox's resolver; repeatable")
    sandbox.add_argument("--cpus", type=float, help="with create: CPU limit")
    sandbox.add_argument("--memory", help="with create: memory limit, e.g. 2G")
    sandbox.add_argument("--pids", type=int, help="with create: process limit")
    sandbox.add_argument("--url", help=_URL_HELP)
    sandbox.add_argument("--json", action="store_true", help="print the sandbox's record as JSON")
    sandbox.set_defaults(func=cmd_sandbox)


def cmd_serve(args: argparse.Namespace) -> int:
    from corral.console.server import serve

    return serve(data_dir=args.data, listen=args.listen or None, socket_path=args.socket or None,
                 rules=tuple(args.rules), max_age_s=args.retain_days * 86400 if args.retain_days else None,
                 max_bytes=int(args.max_events_mb * 1e6) if args.max_events_mb else None)


def cmd_exec(args: argparse.Namespace) -> int:
    from corral.console.client import Client
    from corral.errors import CorralError

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CorralError("exec needs a command: corral exec --sandbox ID -- COMMAND [ARGS...]")
    command: str | list[str] = argv[0] if len(argv) == 1 and " " in argv[0] else argv
    body: dict[str, Any] = {"command": command}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    result = Client(args.url).call("POST", f"/api/sandboxes/{args.sandbox}/exec", body)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        sys.stdout.write(result["stdout"])
        sys.stderr.write(result["stderr"])
        for alert in result["alerts"]:
            taken = f" -> {alert['action_taken']}" if alert["action_taken"] != "alert" else ""
            print(f"corral: {alert['severity'].upper()} [{alert['category']}] {alert['rule']}: {alert['output']}"
                  f"{taken}", file=sys.stderr)
    return int(result["exit_code"])


def cmd_sandbox(args: argparse.Namespace) -> int:
    from corral.console.client import Client
    from corral.errors import CorralError

    client = Client(args.url)
    if args.action == "create":
        spec = {"policy": args.policy, "mode": args.mode, "episode": args.episode, "netns": args.netns,
                "allow": args.allow, "allow_domains": args.allow_domain, "cpus": args.cpus, "memory": args.memory,
                "pids": args.pids}
        record = client.call("POST", "/api/sandboxes", {k: v for k, v in spec.items() if v not in (None, [])})
    else:
        if not args.id:
            raise CorralError(f"sandbox {args.action} needs the sandbox's ID (`corral ps` lists them)")
        record = client.call("POST", f"/api/sandboxes/{args.id}/{args.action}")
    print(json.dumps(record, indent=2) if args.json else record["name"])
    return 0
