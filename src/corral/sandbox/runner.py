"""corral.Sandbox: run commands contained and watched, one step at a time.

A sandbox is made of (each piece in its own module):

- a cgroup, with one child per step (cgroups.py), so a process keeps the step
  that started it for life, also when detached;
- a network namespace (netns.py) whose egress is default-deny in the kernel
  (egress.py), with an allow list of addresses and, through corral's own DNS
  resolver (dns.py), of domain names;
- a filesystem and identity from bubblewrap (fs.py), with canary credentials
  planted in its home (canaries.py);
- the sensor watching every step cgroup, events written as JSON lines.

The namespaces are held by one long-lived process (`sleep infinity` under
bwrap, which reaps orphans as pid 1), started once; every step enters them
with nsenter and drops to the sandbox's unprivileged user. So processes of
step 1 can outlive it (as an agent's detached miner would), and are still
watched and blamed on step 1.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from corral import events as ev
from corral.detect.engine import SEVERITIES as SEVERITY_ORDER
from corral.detect.engine import Alert
from corral.detect.risk import risk
from corral.errors import CorralError
from corral.monitor import HOME_ENTRIES, Monitor
from corral.pipeline import Pipeline
from corral.respond import evidence
from corral.respond.actions import respond
from corral.respond.prevent import DEFAULT_EXEC_DENY
from corral.sandbox import canaries as canary_mod
from corral.sandbox import cgroups, fs
from corral.sandbox.dns import Question, Resolver, resolv_conf_text, system_upstream
from corral.sandbox.egress import EgressGuard, Mode, Rule
from corral.sandbox.netns import ExistingNetns, NetNamespace
from corral.sandbox.policy import Policy, load_policy
from corral.sensor.host import left_by_dead_owner
from corral.store import Recorder

STATE_DIR = Path(os.environ.get("CORRAL_STATE_DIR", "/var/lib/corral"))
DNS_LISTEN = "127.0.0.53"  # inside the sandbox's network namespace
EVENTS_KEPT = 200_000
#: Under /workspace: where a repository's code runs on the next git command or import.
WORKSPACE_ENTRIES = (".git/hooks/", ".git/config", "sitecustomize.py", "usercustomize.py")
#: Evidence keeps each step's last RECENT_PER_STEP events, for the RECENT_STEPS steps that were
#: active last (an old step's detached process acting again makes its step recent again): an
#: episode of thousands of steps must not hold every step's events.
RECENT_PER_STEP = 500
RECENT_STEPS = 64
_HOLDER_START_TIMEOUT_S = 10.0


class SandboxFrozen(CorralError):
    """A step was stopped because a rule froze its sandbox."""


@dataclass(frozen=True)
class Result:
    """What one step did: its exit status (128+N when killed by signal N) and output."""

    exit_code: int
    stdout: str
    stderr: str
    step: int


_pipelines: dict[int, Pipeline] = {}
#: One long-lived thread that starts every holder (see _start_holder).
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-spawner")
_shared: dict[str, Any] = {}
_shared_lock = threading.Lock()


def _shared_monitor() -> Monitor:
    with _shared_lock:
        if "monitor" not in _shared:
            _shared["monitor"] = Monitor()
        monitor: Monitor = _shared["monitor"]
        return monitor


def _shared_guard() -> EgressGuard:
    with _shared_lock:
        if "guard" not in _shared:
            _shared["guard"] = EgressGuard()
        guard: EgressGuard = _shared["guard"]
        return guard


def _pipeline_for(monitor: Monitor, rule_paths: tuple[Path, ...]) -> Pipeline:
    """The pipeline reading this monitor; rules are loaded once per pipeline."""
    with _shared_lock:
        pipeline = _pipelines.get(id(monitor))
        if pipeline is None or not pipeline.is_alive():
            pipeline = Pipeline(monitor, rule_paths=rule_paths)
            _pipelines[id(monitor)] = pipeline
            pipeline.start()
        elif rule_paths and tuple(pipeline.engine.rule_paths) != rule_paths:
            raise CorralError("rules are loaded once per process (per Monitor): every Sandbox sharing it "
                              "must name the same rule files")
        return pipeline


def reap_stale() -> list[str]:
    """Remove what dead corral runs left behind: cgroups, namespaces, state dirs."""
    reaped = cgroups.reap_stale() + NetNamespace.reap_stale()
    base = STATE_DIR / "sandboxes"
    if base.is_dir():
        for entry in base.iterdir():
            owner = entry.name.split("-")
            if (len(owner) >= 2 and owner[0] == "sb" and owner[1].isdigit()
                    and left_by_dead_owner(entry, int(owner[1]))):
                shutil.rmtree(entry, ignore_errors=True)
                reaped.append(str(entry))
    return reaped



class Sandbox:
    """A contained place to run an agent's commands; each exec() is one step.

        with Sandbox(policy="default", allow=["198.51.100.10:443"]) as sb:
            result = sb.exec(["python3", "agent_tool.py"])
    """

    def __init__(self, policy: Policy | str = "default", *, mode: str | None = None, netns: str | None = None,
                 workdir: str | Path | None = None, allow: Sequence[str] = (), allow_domains: Sequence[str] = (),
                 cpus: float | None = None, memory: int | str | None = None, pids: int | None = None,
                 monitor: Monitor | None = None, events_path: str | Path | None = None,
                 episode: str | None = None, dns_upstream: tuple[str, int] | None = None,
                 env: Mapping[str, str] | None = None, host_uid: int = 65534, host_gid: int = 65534,
                 alerts_path: str | Path | None = None, rules: Sequence[str | Path] = (),
                 on_alert: Callable[[Alert], None] | None = None, recorder: Recorder | None = None,
                 keep_events: int = EVENTS_KEPT) -> None:
        base = policy if isinstance(policy, Policy) else load_policy(policy)
        memory_bytes = cgroups.parse_size(memory) if isinstance(memory, str) else memory
        self.policy = base.merged(allow=tuple(allow), allow_domains=tuple(allow_domains), mode=mode, cpus=cpus,
                                  memory_bytes=memory_bytes, pids=pids)
        self.name = cgroups.sandbox_name()
        self.id = secrets.randbelow(2**31 - 2) + 1
        self.episode = episode
        #: the sandbox's last `keep_events` events (all of them are in events_path and the recorder's
        #: store; a daemon keeps none here: hundreds of busy sandboxes would hold gigabytes)
        self.events: deque[ev.Event] = deque(maxlen=keep_events)
        self.alerts: list[Alert] = []
        self._recent: OrderedDict[int, deque[ev.Event]] = OrderedDict()  # step -> its last events, for evidence
        self.frozen = False
        self._unfinished: list[threading.Thread] = []  # collectors of steps exec() gave up on (frozen)
        self.questions: list[Question] = []
        self._alerts_path = Path(alerts_path) if alerts_path else None
        self._rule_paths = tuple(Path(r) for r in rules)
        self._alert_hook = on_alert
        self._recorder = recorder
        self._netns_name = netns
        self._workdir = Path(workdir).resolve() if workdir else None
        self._monitor = monitor
        self._events_path = Path(events_path) if events_path else None
        self._dns_upstream = dns_upstream
        self._env = dict(env or {})
        self._ids = _owner_ids(self._workdir) or (host_uid, host_gid)
        self._step = 0
        self._started = False
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._events_file: IO[str] | None = None
        self._alerts_file: IO[str] | None = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Build the sandbox; everything made is undone by close(), also on failure."""
        if self._started:
            return
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        reap_stale()
        stack = self._stack
        self.state_dir = STATE_DIR / "sandboxes" / self.name
        self.state_dir.mkdir(parents=True, exist_ok=False)
        stack.callback(shutil.rmtree, self.state_dir, True)
        host_uid, host_gid = self._ids
        self.workspace = self._workdir or self.state_dir / "workspace"
        home = self.state_dir / "home"

        self.monitor = self._monitor or _shared_monitor()
        if self._events_path is not None:
            self._events_file = open(self._events_path, "a", buffering=1)  # noqa: SIM115 - closed in close()
            stack.callback(self._events_file.close)
        if self._alerts_path is not None:
            self._alerts_file = open(self._alerts_path, "a", buffering=1)  # noqa: SIM115 - closed in close()
            stack.callback(self._alerts_file.close)

        if self._recorder is not None:
            self._recorder.sandbox_started(self.name, episode=self.episode, policy=self.policy.name,
                                           mode=self.policy.mode, limits={
                                               "cpus": self.policy.cpus, "memory_bytes": self.policy.memory_bytes,
                                               "pids": self.policy.pids})
            stack.callback(self._recorder.state, self.name, "stopped")  # runs last: the stack unwinds LIFO
        self.cgroup = cgroups.SandboxCgroup(self.name, cgroups.Limits(
            cpus=self.policy.cpus, memory_bytes=self.policy.memory_bytes, pids=self.policy.pids))
        stack.callback(self.cgroup.destroy)

        self.netns: NetNamespace | ExistingNetns
        if self._netns_name:
            self.netns = ExistingNetns(self._netns_name)
        else:
            self.netns = NetNamespace(self.name)
            stack.callback(self.netns.destroy)

        self.guard = _shared_guard()
        self.mode = Mode.OBSERVE if self.policy.mode == "observe" else Mode.ENFORCE
        self.guard.add_sandbox(self.id, self.mode)  # ALWAYS_DENIED included
        stack.callback(self.guard.remove_sandbox, self.id)
        for text in self.policy.deny:
            self.guard.deny(self.id, Rule.parse(text))
        # The sandbox's own loopback (its own namespace) is where its DNS resolver listens.
        for text in ("127.0.0.0/8", "::1/128", *self.policy.allow):
            self.guard.allow(self.id, Rule.parse(text))

        self.pipeline = _pipeline_for(self.monitor, self._rule_paths)
        self.pipeline.engine.context.add_sandbox(self.id, self.name, self.policy.mode, self.episode)
        self._limit_counts: dict[str, int] = {}
        # Notified by the pipeline after each alert was handled (its action may have frozen the
        # sandbox), and by a step's output collector when it is done: what exec() waits on.
        self._step_wake = threading.Condition()
        self.pipeline.add_sandbox(self.id, self._on_event, self._on_alert, self._limit_hits, limits=self.cgroup,
                                  alerted=self._step_wake, cpu_saturation=self.policy.cpu_saturation)
        stack.callback(self.pipeline.remove_sandbox, self.id)
        self.exec_guard = self.pipeline.exec_guard
        if self.exec_guard is not None:
            self.exec_guard.add_sandbox(self.id, enforce=self.mode == Mode.ENFORCE)
            stack.callback(self.exec_guard.remove_sandbox, self.id)
            self.exec_guard.deny(self.id, DEFAULT_EXEC_DENY)

        resolv_conf = None
        if self.policy.allow_domains:
            resolv_conf = self._start_resolver()

        self.layout = fs.FsLayout(workspace=self.workspace, home=home, resolv_conf=resolv_conf,
                                  host_uid=host_uid, host_gid=host_gid,
                                  extra_ro=tuple(Path(p) for p in self.policy.extra_ro),
                                  etc_dir=self.state_dir / "etc")
        fs.prepare_dirs(self.layout)
        self.canaries = canary_mod.plant(home, host_uid, host_gid)
        canary_mod.save(self.canaries, self.state_dir / "canaries.json")
        # The sensor sees paths as the sandbox does: watch its own home and workspace
        # places where persistence lives (the host's homes are watched by the Monitor).
        for entry in HOME_ENTRIES:
            self.monitor.watch_prefix(f"{fs.SANDBOX_HOME}/{entry}")
        for entry in WORKSPACE_ENTRIES:
            self.monitor.watch_prefix(f"{fs.WORKSPACE}/{entry}")
        # Canaries are known by inode number.  A hard link out of the sandbox's sight keeps each
        # one's inode allocated for the sandbox's life: were the agent to delete a canary, the
        # file system could otherwise give its number to the next file made (a git hook, say),
        # which would then pass for the canary.
        pins = self.state_dir / "canary-pins"
        pins.mkdir(mode=0o700)
        for canary in self.canaries:
            os.link(canary.path, pins / canary.kind)
            fid = self.monitor.watch_file(canary.path)
            stack.callback(self.monitor.sensor.unwatch_file, fid)
            self.pipeline.engine.context.add_canary(self.id, fid, canary.kind)
        self._start_holder()

    def _start_resolver(self) -> Path:
        """corral's DNS resolver, listening inside the sandbox's network namespace."""
        resolver = Resolver(self._dns_upstream or system_upstream(), self._on_question, self._on_admit)
        self._stack.callback(resolver.close)
        with _in_netns(self.netns.exec_prefix()[-1]):
            resolver.serve(self.id, (DNS_LISTEN, 53), self.policy.allow_domains)
        path = self.state_dir / "resolv.conf"
        path.write_text(resolv_conf_text(DNS_LISTEN))
        path.chmod(0o644)
        return path

    def _start_holder(self) -> None:
        """The process that holds the namespaces for every step, in step cgroup 0."""
        holder_cg = self.cgroup.new_step(0)
        self.pipeline.watch(holder_cg.id, self.id, 0, infrastructure=True)
        if self.exec_guard is not None:
            self.exec_guard.bind_cgroup(holder_cg.id, self.id)
        self._stack.callback(self.pipeline.unwatch, holder_cg.id)
        self.guard.bind_cgroup(holder_cg.id, self.id)
        holder, self._holder_pid = start_holder(self.netns.exec_prefix(), self.layout, holder_cg, self._env)
        self._stack.callback(_end, holder)

    def close(self) -> None:
        """Kill everything in the sandbox and remove all it made. Safe to call twice."""
        if hasattr(self, "cgroup"):
            # Kill first and let the exit events arrive while the steps are still watched.
            with contextlib.suppress(Exception):
                self.cgroup.kill_all()
            for collector in self._unfinished:  # frozen steps, now killed: their ends are recorded
                collector.join(timeout=5)
            with contextlib.suppress(Exception):
                self.pipeline.flush()
            if hasattr(self, "guard"):
                with contextlib.suppress(Exception):
                    self._destroy_sockets()
        self._stack.close()

    def _destroy_sockets(self) -> None:
        """Cut, then destroy the sockets the killed processes left behind.

        A killed process's TCP socket lives on, orphaned, and retransmits what
        it had queued; once the sandbox's egress entries are gone (or corral
        has exited), that would get out.  SOCK_DESTROY (ss -K) ends them now.
        """
        self.guard.set_mode(self.id, Mode.CUT)
        steps = [f"cgroup /corral/{self.name}/step-{n}" for n in range(self._step + 1)]
        for i in range(0, len(steps), 50):
            # nsenter --net, not `ip netns exec`: that remounts /sys, and ss then cannot find the
            # cgroup2 mount its filter needs (and destroys nothing).
            done = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns.name}", "ss", "-K", "-a", "-t", "-u",
                                   " or ".join(steps[i:i + 50])], capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                print(f"corral: warning: the sockets of sandbox {self.name}'s killed processes were not destroyed "
                      f"(ss -K: {done.stderr.strip() or 'exit ' + str(done.returncode)}); what they had queued "
                      "may still be sent", file=sys.stderr, flush=True)

    # -- steps ---------------------------------------------------------------

    def exec(self, command: Sequence[str] | str, step: int | None = None, *, timeout: float | None = None,
             input: str | None = None, capture: bool = True) -> Result:
        """Run one step to completion and return its result.

        `command` is an argv list, or a string run by /bin/sh -c. `capture=False`
        lets the step use the caller's stdin/stdout/stderr (the CLI does).
        """
        if not self._started:
            self.start()
        if self.frozen:
            raise CorralError(f"sandbox {self.name} is frozen (evidence was taken): release() or close() it")
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        with self._lock:
            self._step = step if step is not None else self._step + 1
            number = self._step
        step_cg = self.cgroup.new_step(number)
        self.pipeline.engine.context.add_step(self.id, number, " ".join(argv))
        self.pipeline.watch(step_cg.id, self.id, number)
        if self.exec_guard is not None:
            self.exec_guard.bind_cgroup(step_cg.id, self.id)
        self._stack.callback(self.pipeline.unwatch, step_cg.id)
        self.guard.bind_cgroup(step_cg.id, self.id)
        if self._recorder is not None:
            # As given: a shell string as it was typed, an argv quoted so it reads back exactly.
            self._recorder.step_started(self.name, number, command if isinstance(command, str) else shlex.join(argv))
        full = fs.enter_argv(self._holder_pid, argv, self._env)
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.Popen(full, preexec_fn=step_cg.joiner(), text=True,
                                stdin=subprocess.PIPE if input is not None else (None if not capture else
                                                                                  subprocess.DEVNULL),
                                stdout=pipe, stderr=pipe)
        deadline = None if timeout is None else time.monotonic() + timeout
        # The step's output is collected by a thread of its own, blocked in communicate() until the
        # step's processes close the pipes.  This thread sleeps until that, an alert (whose action
        # may have frozen the sandbox) or the timeout: a poll loop here, in every sandbox running
        # a step, would take the GIL from the pipeline thread thousands of times a second.
        ended: list[tuple[str | None, str | None] | BaseException] = []
        left: list[bool] = []  # exec returned (frozen) before the step ended: its collector records the end

        def collect() -> None:
            try:
                result: tuple[str | None, str | None] | BaseException = proc.communicate(input=input)
            except BaseException as e:  # (raised by exec, in the step's own thread)
                result = e
            with self._step_wake:
                ended.append(result)
                self._step_wake.notify_all()
                late = bool(left)
            if late:  # after a release, or when close() killed it
                self._step_ended(number, proc)

        collector = threading.Thread(target=collect, name=f"corral-{self.name}-step-{number}", daemon=True)
        collector.start()
        try:
            while True:
                with self._step_wake:
                    if not ended and not self.frozen:
                        self._step_wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                    if not ended and self.frozen:
                        left.append(True)
                        self._unfinished.append(collector)
                        raise SandboxFrozen(f"sandbox {self.name} was frozen during step {number} by a rule's "
                                            "action; its evidence is taken: release() or close() it")
                if ended:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    for pid in step_cg.pids():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    deadline = None
            if isinstance(ended[0], BaseException):
                raise ended[0]
            out, err = ended[0]
        except SandboxFrozen:
            raise
        except BaseException:
            _end(proc)
            raise
        code = self._step_ended(number, proc)
        return Result(code, out or "", err or "", number)

    def _step_ended(self, number: int, proc: subprocess.Popen[str]) -> int:
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        self.pipeline.step_ended(self.id, number)
        if self._recorder is not None:
            self._recorder.step_ended(self.name, number, code)
        return code

    def put_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file into the sandbox from the host, as an agent's file tool would: `path` as
        the sandbox sees it, under /workspace or the sandbox's home; owned by the sandbox's user
        (the file and any directories made for it)."""
        for inside, host in ((fs.WORKSPACE, self.workspace), (fs.SANDBOX_HOME, self.layout.home)):
            if path.startswith(inside + "/"):
                root = Path(host)
                target = root / path[len(inside) + 1:]
                break
        else:
            raise CorralError(f"put_file writes only under {fs.WORKSPACE} and {fs.SANDBOX_HOME}: {path}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        st = root.stat()
        for part in [target, *target.relative_to(root).parents]:
            os.chown(root / part, st.st_uid, st.st_gid)

    def flush_events(self) -> None:
        """Wait until the events (and alerts) of what has run so far were delivered."""
        self.pipeline.flush()

    # -- what the sandbox did ------------------------------------------------

    def _on_event(self, event: ev.Event) -> None:
        self.events.append(event)
        recent = self._recent.get(event.step_id)
        if recent is None:
            recent = self._recent[event.step_id] = deque(maxlen=RECENT_PER_STEP)
            if len(self._recent) > RECENT_STEPS:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(event.step_id)
        recent.append(event)
        if self._recorder is not None:
            self._recorder.event(self.name, event)
        if self._events_file is not None:
            record = event.to_dict()
            record["sandbox"] = self.name
            if self.episode:
                record["episode"] = self.episode
            self._events_file.write(json.dumps(record) + "\n")

    # -- respond (respond.actions calls these) -----------------------------------

    @property
    def steps(self) -> int:
        """How many steps have started (the number of the last one)."""
        return self._step

    @property
    def observe(self) -> bool:
        return self.mode == Mode.OBSERVE

    def cut_network(self) -> None:
        """Deny all egress from now on, established flows included."""
        self.guard.set_mode(self.id, Mode.CUT)

    def collect_evidence(self, alert: Alert) -> Path:
        pids = self.cgroup.pids()
        bundle = evidence.collect(STATE_DIR / "evidence" / self.name / alert.id, alert, pids,
                                  {pid: _step_of(pid) for pid in pids}, self._recent.get(alert.step, ()),
                                  itertools.chain.from_iterable(self._recent.values()), self.workspace)
        if self._recorder is not None:
            self._recorder.state(self.name, "frozen")
            self._recorder.evidence(self.name, alert.id, str(bundle))
        self.frozen = True  # only now: a step waiting on the sandbox may return, and release() it
        return bundle

    def release(self) -> None:
        """Thaw a sandbox frozen by a `freeze` action; steps can run again."""
        self.cgroup.thaw()
        self.frozen = False
        if self._recorder is not None:
            self._recorder.state(self.name, "running")

    def verdict(self) -> dict[str, Any]:
        """The episode's summary, for an RL trainer or a safety dataset (risk: see risk())."""
        by_step: dict[int, list[dict[str, Any]]] = {}
        for a in self.alerts:
            by_step.setdefault(a.step, []).append({"rule": a.rule, "severity": a.severity, "category": a.category,
                                                   "action_taken": a.action_taken,
                                                   "action_result": a.action_result, "pid": a.pid,
                                                   "output": a.output})
        severities = [a.severity for a in self.alerts]
        return {
            "sandbox": self.name, "episode": self.episode, "mode": self.policy.mode, "steps": self._step,
            "alerts": len(self.alerts),
            "worst_severity": max(severities, key=SEVERITY_ORDER.index) if severities else None,
            "categories": sorted({a.category for a in self.alerts}),
            "rules": sorted({a.rule for a in self.alerts}),
            "alerts_by_step": {str(k): v for k, v in sorted(by_step.items())},
            "actions": [{"rule": a.rule, "action": a.action, "taken": a.action_taken, "result": a.action_result}
                        for a in self.alerts if a.action != "alert"],
            "risk": risk((a.rule, a.severity) for a in self.alerts),
        }

    def _limit_hits(self) -> list[ev.Event]:
        """`limit_hit` events for forks refused or OOM kills since the last look."""
        out: list[ev.Event] = []
        names = {"pids_max": "pids", "oom_kill": "memory"}
        for key, total in self.cgroup.events().items():
            before = self._limit_counts.get(key, 0)
            if total > before:
                self._limit_counts[key] = total
                out.append(ev.DerivedEvent.make("limit_hit", sandbox_id=self.id, step_id=self._step,
                                                resource=names[key], count=total - before, total=total))
        return out

    def _on_alert(self, alert: Alert) -> None:
        respond(alert, self)
        self.alerts.append(alert)
        if self._recorder is not None or self._alerts_file is not None:
            record = alert.to_dict()
            if self._recorder is not None:
                self._recorder.alert(record)
            if self._alerts_file is not None:
                self._alerts_file.write(json.dumps(record) + "\n")
        if self._alert_hook is not None:
            self._alert_hook(alert)

    def _on_question(self, q: Question) -> None:
        """Every question to corral's resolver: a `dns` event, through detection."""
        self.questions.append(q)
        if q.allowed:
            for address in q.answers:
                self.pipeline.engine.context.add_domain(q.sandbox_id, address, q.name, max(q.ttl, 1))
        self.pipeline.submit(ev.DerivedEvent.make(
            "dns", ts_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME), sandbox_id=q.sandbox_id, step_id=self._step,
            name=q.name, qtype=q.qtype, allowed=q.allowed, answers=list(q.answers), rcode=q.rcode,
            client=q.client, rate_limited=q.rate_limited))

    def _on_admit(self, sandbox_id: int, address: str, ttl: int) -> None:
        rule = Rule.parse(address)
        self.guard.allow(sandbox_id, rule)
        timer = threading.Timer(ttl, self._expire, (sandbox_id, rule))
        timer.daemon = True
        timer.start()
        self._stack.callback(timer.cancel)

    def _expire(self, sandbox_id: int, rule: Rule) -> None:
        with contextlib.suppress(Exception):  # the sandbox may be gone already
            self.guard.revoke(sandbox_id, rule)


def _step_of(pid: int) -> int | None:
    """The step a sandbox process belongs to, from its cgroup (".../step-N")."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            tail = line.rsplit("/", 1)[-1]
            if tail.startswith("step-"):
                return int(tail[5:])
    except (OSError, ValueError):
        pass
    return None


def _owner_ids(workdir: Path | None) -> tuple[int, int] | None:
    """Run as the owner of a user's own workdir (so it is not chowned away from
    them), unless root owns it: the sandbox never runs as host root."""
    if workdir is None or not workdir.exists():
        return None
    st = workdir.stat()
    return (st.st_uid, st.st_gid) if st.st_uid > 0 and st.st_gid > 0 else None


def start_holder(netns_prefix: Sequence[str], layout: fs.FsLayout, cgroup: cgroups.StepCgroup,
                 env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start the process that holds a sandbox's namespaces (`sleep infinity`
    under bwrap) in `cgroup`; returns it and the host pid of its sleeper, the
    process steps enter (fs.enter_argv).

    Started from a thread that lives as long as this process: bwrap's
    --die-with-parent (PR_SET_PDEATHSIG) follows the *thread* that forked it,
    and a sandbox made in a short-lived worker thread would lose its holder.
    """
    argv = [*netns_prefix, *fs.sandbox_argv(layout, ["sleep", "infinity"], env)]
    holder = _spawner.submit(subprocess.Popen, argv, preexec_fn=cgroup.joiner(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).result()
    try:
        return holder, _wait_for_sleeper(holder)
    except BaseException:
        _end(holder)
        raise


def _wait_for_sleeper(holder: subprocess.Popen[bytes]) -> int:
    """The host pid of the holder's `sleep infinity`: bwrap's grandchild, which
    exists only once bwrap has finished building the mounts."""
    deadline = time.monotonic() + _HOLDER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if holder.poll() is not None:
            err = holder.stderr.read().decode(errors="replace").strip() if holder.stderr else ""
            raise CorralError(f"the sandbox did not start: {err or 'bwrap exited ' + str(holder.returncode)}")
        for pid in _descendants(holder.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return pid
        time.sleep(0.005)
    _end(holder)
    raise CorralError(f"the sandbox did not start within {_HOLDER_START_TIMEOUT_S:.0f} s")


def _descendants(pid: int) -> Iterator[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return
    for child in map(int, children):
        yield child
        yield from _descendants(child)


def _end(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


@contextlib.contextmanager
def _in_netns(name: str) -> Iterator[None]:
    """Run the block in another network namespace (sockets made here stay in it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, clone_newnet) != 0:
            raise CorralError(f"cannot enter network namespace {name}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            libc.setns(own, clone_newnet)
    finally:
        os.close(own)
        os.close(target)
