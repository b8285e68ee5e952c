"""The `corral` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from corral import events as ev
from corral.console.cli import add_daemon_parsers
from corral.console.queries import add_query_parsers
from corral.detect.engine import Alert
from corral.drills.cli import add_drill_parsers
from corral.errors import CorralError
from corral.monitor import Monitor
from corral.rules.cli import add_rules_parser
from corral.sensor.host import proc_stat


def format_line(e: ev.Event) -> str:
    clock = ev.rfc3339(e.time_ns)[11:26]
    who = e.proc.name if e.proc else e.comm
    return f"{clock} {e.kind:<11} {e.pid:>7} {who[:16]:<16} {ev.describe(e.to_dict())}"


class _Printer:
    def __init__(self, out: TextIO, as_json: bool, monitor: Monitor) -> None:
        self.out = out
        self.as_json = as_json
        self.monitor = monitor

    def __call__(self, batch: Sequence[ev.Event]) -> None:
        for e in batch:
            if self.as_json:
                record = e.to_dict()
                record["ancestors"] = [p.name for p in self.monitor.ancestors(e.pid)] if e.pid else []
                self.out.write(json.dumps(record) + "\n")
            else:
                self.out.write(format_line(e) + "\n")
        if batch:
            self.out.flush()


def _trace_command(mon: Monitor, argv: list[str], emit: Callable[[Sequence[ev.Event]], None]) -> int:
    from corral.sensor.cgroups import ScratchCgroup

    cg = ScratchCgroup(f"trace-{os.getpid()}")
    try:
        mon.watch_cgroup(cg.id)
        try:
            child = subprocess.Popen(argv, preexec_fn=lambda: cg.add(os.getpid()))
        except FileNotFoundError:
            raise CorralError(f"command not found: {argv[0]}") from None
        code: int | None = None
        told = False
        try:
            while True:
                emit(mon.read(timeout=0.1))
                if code is None and child.poll() is not None:
                    code = child.returncode
                if code is not None:
                    left = cg.pids()
                    if not left:
                        break
                    if not told:
                        print(f"corral: {argv[0]} exited; still tracing the {len(left)} process(es) it "
                              "left running (Ctrl-C to stop)", file=sys.stderr)
                        told = True
        except KeyboardInterrupt:
            code = child.wait() if code is None else code
        time.sleep(0.05)  # the last exit records may still be on their way
        emit(mon.read())
        return code if code >= 0 else 128 - code
    finally:
        mon.unwatch_cgroup(cg.id)
        cg.remove()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie's parent has not reaped it yet)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != b"Z"


def _trace_existing(mon: Monitor, cgroup: str | None, pid: int | None,
                    emit: Callable[[Sequence[ev.Event]], None]) -> int:
    from corral.sensor.cgroups import cgroup_of_pid, resolve_cgroup

    path = resolve_cgroup(cgroup) if cgroup else cgroup_of_pid(pid or 0)
    cid = mon.watch_cgroup(path)
    print(f"corral: tracing cgroup {path} (Ctrl-C to stop)", file=sys.stderr)
    try:
        while pid is None or _running(pid):
            emit(mon.read(timeout=0.2))
        emit(mon.read())
    except KeyboardInterrupt:
        pass
    finally:
        mon.unwatch_cgroup(cid)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    chosen = sum(bool(x) for x in (argv, args.cgroup, args.pid))
    if chosen != 1:
        raise CorralError("trace needs exactly one of: -- COMMAND..., --cgroup PATH, --pid PID "
                          "(see `corral trace --help`)")
    # Not closed here: the process exit detaches the programs (see entry()).
    mon = Monitor(trace_all_opens=args.all_opens)
    emit = _Printer(sys.stdout, args.json, mon)
    if argv:
        return _trace_command(mon, argv, emit)
    return _trace_existing(mon, args.cgroup, args.pid, emit)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    """Run COMMAND as one step of a fresh sandbox; exit with its status."""
    from corral.sandbox.runner import Sandbox

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CorralError("run needs a command: corral run [OPTIONS] -- COMMAND [ARGS...]")
    netns = args.netns
    if args.lab:
        if netns:
            raise CorralError("--lab and --netns both name the sandbox's network: give one")
        from corral.drills.lab import Lab

        lab = Lab(args.lab)
        if not lab.is_up():
            raise CorralError(f"the drill lab {args.lab} is not up: run `corral lab up --name {args.lab}` first")
        lab.check_no_route_out()
        netns = lab.client
    if args.alerts:
        Path(args.alerts).touch()  # alerts are appended here as they happen
    # SIGTERM is a request to stop: clean up as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    from corral.respond.sinks import make_sink
    from corral.sandbox.runner import STATE_DIR
    from corral.store import Recorder, open_store

    sinks = [make_sink(spec, STATE_DIR) for spec in args.sink]
    recorder = Recorder(open_store(args.data))

    def on_alert(alert: Alert) -> None:
        print(alert.line(), file=sys.stderr, flush=True)
        record = alert.to_dict()
        for sink in sinks:
            sink.send(record)  # durable before it returns (webhooks queue on disk)

    sandbox = Sandbox(args.policy, mode=args.mode, netns=netns, workdir=args.workdir, allow=args.allow,
                      allow_domains=args.allow_domain, cpus=args.cpus, memory=args.memory, pids=args.pids,
                      events_path=args.events, alerts_path=args.alerts, episode=args.episode, rules=args.rules,
                      on_alert=on_alert, recorder=recorder)
    try:
        with sandbox:
            result = sandbox.exec(argv, capture=False)
            sandbox.flush_events()
            code = result.exit_code
    except KeyboardInterrupt:
        print("corral: interrupted; the sandbox and everything in it were removed", file=sys.stderr)
        code = 130
    finally:
        recorder.close()
    for sink in sinks:
        sink.close()  # a webhook gets a few seconds to deliver; the rest stays queued for the next run
    if args.verdict:
        verdict = sandbox.verdict()
        Path(args.verdict).write_text(json.dumps(verdict, indent=2) + "\n")
        if verdict["alerts"]:
            print(f"corral: verdict: risk {verdict['risk']}, worst {verdict['worst_severity']}, "
                  f"{verdict['alerts']} alert(s) in {', '.join(verdict['categories'])} -> {args.verdict}",
                  file=sys.stderr)
    return code


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check that this host can run the sensor, and say what it has."""
    from corral.sensor import host
    from corral.sensor.sensor import Sensor

    host.preflight()
    print(f"ok  privileges, BTF, tracefs, bpffs; cgroup v2 at {host.cgroup2_root()}")
    started = time.monotonic()
    sensor = Sensor()  # detached by the process exit (see entry())
    took = (time.monotonic() - started) * 1000
    print(f"ok  sensor loaded and attached in {took:.0f} ms")
    for section in sensor.unavailable:
        print(f"--  {section}: this kernel has no such hook; those events are not seen")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Contain autonomous AI agents and watch what they really do, at the kernel.",
    )
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    trace = sub.add_parser(
        "trace", help="print what a process tree does, like strace -f for a whole cgroup",
        description="Run COMMAND in a fresh watched cgroup and print every event of it and of "
                    "everything it starts, live, until all of them have exited. Or attach to a "
                    "cgroup or process that is already running.",
        epilog="examples:\n  corral trace -- curl -s http://127.0.0.1:8000/\n"
               "  corral trace --json -- make -j2 > events.jsonl\n"
               "  corral trace --pid 4242\n"
               "  corral trace --cgroup system.slice/ssh.service",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    trace.add_argument("--json", action="store_true", help="one JSON object per event")
    trace.add_argument("--cgroup", metavar="PATH", help="watch this cgroup v2 directory instead")
    trace.add_argument("--pid", type=int, metavar="PID", help="watch the cgroup this process is in, "
                       "until the process exits")
    trace.add_argument("--all-opens", action="store_true",
                       help="report every file open, not only watched credential/system paths")
    trace.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    trace.set_defaults(func=cmd_trace)

    run = sub.add_parser(
        "run", help="run a command in a sandbox: contained, watched, default-deny egress",
        description="Run COMMAND in a new sandbox: its own cgroup (with limits), network namespace "
                    "with default-deny egress enforced in the kernel, a bubblewrap filesystem "
                    "(read-only system, writable /workspace, private /tmp, host secrets invisible), "
                    "an unprivileged user without capabilities, and canary credentials in its home. "
                    "Every process in it is watched. Exits with COMMAND's status (128+N if killed by "
                    "signal N). Everything the sandbox made is removed when it ends.",
        epilog="examples:\n  corral run -- python3 agent.py\n"
               "  corral run --policy dev --events ev.jsonl -- pip install requests\n"
               "  corral run --allow 198.51.100.7:443 --memory 2G --pids 256 -- ./tool.sh\n"
               "  corral run --mode observe --lab -- ssh -R 8080:localhost:80 user@203.0.113.10",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--policy", default="default", metavar="PATH|NAME",
                     help="a policy YAML file, or a built-in: default (no egress), dev (package registries)")
    run.add_argument("--mode", choices=("observe", "enforce"), default=None,
                     help="observe: watch and alert only, never block; enforce (the policy's default): "
                          "deny egress outside the allow list and apply rule actions")
    run.add_argument("--netns", metavar="NAME", help="run in this existing network namespace (ip netns list) "
                     "instead of a new one; egress rules still apply")
    run.add_argument("--lab", nargs="?", const="corral-lab", metavar="NAME",
                     help="run attached to the drill lab (`corral lab up` first; default name corral-lab): its "
                          "fake internet, pool, sshd, internal hosts and metadata stubs, with no route out")
    run.add_argument("--alerts", metavar="PATH", help="append alerts here as JSON lines")
    run.add_argument("--sink", action="append", default=[], metavar="SPEC",
                     help="also deliver alerts here: jsonl:PATH, stdout, stdout:line, webhook:URL, slack:URL, "
                          "falco:URL (webhooks retry from a queue on disk: nothing is lost); repeatable")
    run.add_argument("--events", metavar="PATH", help="append every event here as JSON lines")
    run.add_argument("--workdir", metavar="DIR", help="host directory mounted read-write at /workspace "
                     "(default: a fresh one, removed at the end); it is chowned to the sandbox user")
    run.add_argument("--allow", action="append", default=[], metavar="HOST[:PORT]",
                     help="allow egress to this address or CIDR (and port); repeatable")
    run.add_argument("--allow-domain", action="append", default=[], metavar="NAME",
                     help="allow egress to what this name resolves to (*.example.com for subdomains); "
                          "repeatable")
    run.add_argument("--cpus", type=float, metavar="N", help="CPU limit, in CPUs (e.g. 1.5)")
    run.add_argument("--memory", metavar="SIZE", help="memory limit (e.g. 512M, 2G)")
    run.add_argument("--pids", type=int, metavar="N", help="limit on processes and threads")
    run.add_argument("--rules", action="append", default=[], metavar="PATH",
                     help="a rule file (or directory of them) loaded after the built-in rules; repeatable")
    run.add_argument("--verdict", metavar="PATH", help="write the episode verdict here as JSON (worst severity, "
                     "categories, alerts by step, actions, risk score in [0, 1])")
    run.add_argument("--episode", metavar="LABEL", help="label events with this episode (e.g. an RL rollout id)")
    run.add_argument("--data", metavar="DIR", help="record the sandbox, its steps, events and alerts in the store "
                     "here (default: $CORRAL_DATA, else ~/.local/state/corral); `corral ps|alerts|report` read it")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    run.set_defaults(func=cmd_run)

    add_rules_parser(sub)
    add_drill_parsers(sub)
    add_daemon_parsers(sub)
    add_query_parsers(sub)

    doctor = sub.add_parser("doctor", help="check that this host can run the sensor",
                            description="Run every host check and load the sensor once.")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except CorralError as exc:
        print(f"corral: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The `corral` console script: main(), then a fast exit.

    Detaching the sensor's ~50 tracepoint programs costs the kernel an RCU grace
    period each (~60 ms here: seconds in all), paid when their last file
    descriptors close.  A child that inherits those descriptors, and outlives us
    by waiting on a pipe only we hold, pays it after we have exited, so the
    caller gets the exit status at once.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    parent_gone, parent_alive = os.pipe()
    if os.fork() == 0:
        os.setsid()
        os.closerange(0, 3)  # whoever reads our output must not wait for this child
        os.close(parent_alive)
        os.read(parent_gone, 1)  # returns at our exit: the child must be the last holder
        os._exit(0)
    os.close(parent_gone)
    sys.exit(code)  # (atexit handlers run: they release the corral cgroup this process held)


if __name__ == "__main__":
    entry()
