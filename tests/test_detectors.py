"""Stateful detectors, fed the real events of real processes wherever the kernel makes them.

Network traffic stays in the namespaces of tests/netlab.py: every client runs in the lab's client
namespace (no route out, checked by TestNet), joined to a watched cgroup.  Addresses that the lab
does not hold (198.51.100.20-59) fail there at once with ENETUNREACH: attempts to nowhere.
Only ``dns`` events are made by hand, as the resolver makes them in user space anyway.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from netlab import TestNet

from corral import events as ev
from corral.detect.detectors import (
    CpuSaturationDetector,
    CredThenEgressDetector,
    Detector,
    Detectors,
    DnsTunnelDetector,
    LongSessionDetector,
    OutlivesStepDetector,
    ScanDetector,
)
from corral.detect.detectors.dns_tunnel import entropy
from corral.monitor import Monitor
from corral.sensor.cgroups import ScratchCgroup

NS = 1_000_000_000
PY = sys.executable
_ids = itertools.count(1)

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                               reason="needs root and iproute2 (namespaces, cgroups, BPF)")

# Accepts connections and keeps them open (netlab's listener answers and closes).
HOLD_PY = r"""
import socket
s = socket.create_server(("0.0.0.0", 0), backlog=64)
print("ready", s.getsockname()[1], flush=True)
held = []
while True:
    held.append(s.accept()[0])
"""


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Watched:
    """A fresh watched cgroup (one sandbox step); commands started in it, optionally in a lab
    namespace, and their events pumped through a detector with ticks as real time passes."""

    def __init__(self, mon: Monitor, step_id: int | None = None) -> None:
        n = next(_ids)
        self.mon = mon
        self.cg = ScratchCgroup(f"detect-{os.getpid()}-{n}")
        self.sandbox_id, self.step_id = 7000 + n, n if step_id is None else step_id
        self.events: list[ev.Event] = []
        self.procs: list[subprocess.Popen[str]] = []
        mon.read()  # start from an empty ring
        mon.watch_cgroup(self.cg.id, sandbox_id=self.sandbox_id, step_id=self.step_id)

    def start(self, argv: Sequence[str], ns: str | None = None) -> subprocess.Popen[str]:
        prefix = ["ip", "netns", "exec", ns] if ns else []
        proc = subprocess.Popen([*prefix, *argv], preexec_fn=lambda: self.cg.add(os.getpid()), text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def finished(self) -> bool:
        """Every command exited, its exit read, and nothing is left in the cgroup."""
        exits = {e.pid for e in self.events if e.type == ev.EXIT}
        return all(p.poll() is not None and p.pid in exits for p in self.procs) and not self.cg.pids()

    def pump(self, detector: Detector, seconds: float, until: Callable[[], bool] | None = None,
             tick_s: float = 0.1) -> list[ev.DerivedEvent]:
        out: list[ev.DerivedEvent] = []
        end, next_tick = time.monotonic() + seconds, 0.0
        while True:
            for e in self.mon.read(timeout=0.02):
                if e.cgroup_id == self.cg.id:
                    self.events.append(e)
                    out += detector.feed(e)
            now = time.monotonic()
            if now >= next_tick:
                out += detector.tick(boottime_ns())
                next_tick = now + tick_s
            if now >= end or (until is not None and until()):
                return out

    def run(self, detector: Detector, argv: Sequence[str], ns: str | None = None,
            timeout: float = 20.0) -> list[ev.DerivedEvent]:
        """Run one command to its end and return what the detector made of it."""
        proc = self.start(argv, ns)
        out = self.pump(detector, timeout, until=self.finished)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        return out

    def close(self) -> None:
        for pid in self.cg.pids():  # only what these tests started is in this cgroup
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.communicate()
        self.mon.unwatch_cgroup(self.cg.id)
        deadline = time.monotonic() + 5
        while self.cg.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.cg.remove()


@pytest.fixture
def watched(monitor: Monitor) -> Iterator[Callable[..., Watched]]:
    made: list[Watched] = []

    def make(step_id: int | None = None) -> Watched:
        w = Watched(monitor, step_id)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


@dataclass
class Lab:
    client: str  # the namespace clients run in
    open_port: int  # answers and closes, on every lab address
    hold_port: int  # accepts and keeps connections open, on every lab address


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    with TestNet() as net:
        (open_port,) = net.start_listener(net.server, ["tcp:0"])
        hold = net.start_server(net.server, [PY, "-c", HOLD_PY])
        assert hold.stdout is not None
        yield Lab(net.client, open_port, int(hold.stdout.readline().split()[1]))


def of(events: Sequence[ev.DerivedEvent], kind: str) -> list[ev.DerivedEvent]:
    return [e for e in events if e.kind == kind]


def connects(code_targets: str, pause: float = 0.0) -> list[str]:
    """argv: Python connecting to each (host, port) of a literal list, errors ignored.  Blocking
    sockets, so the kernel's answer (refused, unreachable) is the syscall's result; with a timeout
    Python connects non-blocking and every attempt reads EINPROGRESS."""
    return [PY, "-c", f"import socket, time\nfor h, p in {code_targets}:\n"
            f"    s = socket.socket(socket.AF_INET6 if ':' in h else socket.AF_INET)\n"
            f"    s.connect_ex((h, p)); s.close(); time.sleep({pause})"]


# -- scan --------------------------------------------------------------------------------------------

@needs_root
def test_port_scan_is_reported_once_per_doubling(watched: Callable[..., Watched], lab: Lab) -> None:
    targets = [("203.0.113.10", port) for port in range(1, 41)]  # refused by the lab server
    w = watched()
    found = w.run(Detectors(), connects(repr(targets)), lab.client)
    scans = of(found, "scan")
    assert [s.kind for s in found] == ["scan", "scan"]  # no other detector fires
    assert [(s.data["ports"], s.data["hosts"], s.data["scope"]) for s in scans] == [
        (15, 1, "process"), (30, 1, "process")]
    first = scans[0]
    assert first.pid == w.procs[0].pid and first.sandbox_id == w.sandbox_id and first.step_id == w.step_id
    assert first.data["attempts"] == 15 and first.data["failed"] == 15  # all refused
    assert first.data["targets"][0] == "203.0.113.10:15" and len(first.data["targets"]) == 8
    assert 0 <= first.data["window_s"] < 10
    assert first.proc is not None and first.proc.name.startswith("python")


@needs_root
def test_host_sweep_of_unreachable_hosts_counts(watched: Callable[..., Watched], lab: Lab) -> None:
    targets = [(f"198.51.100.{i}", 22) for i in range(20, 32)]  # no route: ENETUNREACH
    w = watched()
    (scan,) = w.run(ScanDetector(), connects(repr(targets)), lab.client)
    assert {e.result for e in w.events if isinstance(e, ev.NetEvent) and e.type == ev.CONNECT} == {-101}
    assert scan.data["hosts"] == 10 and scan.data["ports"] == 1 and scan.data["failed"] == 10


@needs_root
def test_slow_scan_within_the_window_but_not_a_short_one(watched: Callable[..., Watched], lab: Lab) -> None:
    """Probes 0.2 s apart: seen by the 60 s window, not by a 1 s one (5 hosts at most in it)."""
    targets = [(f"198.51.100.{i}", 80) for i in range(20, 32)]
    w = watched()
    w.run(ScanDetector(), connects(repr(targets), pause=0.2), lab.client)
    for window, expected in ((60.0, 1), (1.0, 0)):
        det = ScanDetector(window_s=window)
        assert len([s for e in w.events for s in det.feed(e)]) == expected


@needs_root
def test_udp_sweep_counts_first_datagram_per_destination(watched: Callable[..., Watched], lab: Lab) -> None:
    code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(20, 32):\n"
            "    for _ in range(3):\n"
            "        try: s.sendto(b'x', (f'198.51.100.{i}', 161))\n"
            "        except OSError: pass\n")
    w = watched()
    (scan,) = w.run(ScanDetector(), [PY, "-c", code], lab.client)
    assert scan.data["hosts"] == 10 and scan.data["attempts"] == 10  # repeats are not new probes


@needs_root
def test_many_short_processes_make_a_step_scan(watched: Callable[..., Watched], lab: Lab) -> None:
    loop = "for i in $(seq 20 31); do (exec 3<>/dev/tcp/198.51.100.$i/80) 2>/dev/null; done; true"
    w = watched()
    (scan,) = w.run(ScanDetector(), ["/bin/bash", "-c", loop], lab.client)
    assert scan.data["scope"] == "step" and scan.data["hosts"] == 10
    assert scan.pid != w.procs[0].pid  # one of the subshells, each of which probed once


@needs_root
def test_build_like_traffic_is_not_a_scan(watched: Callable[..., Watched], lab: Lab) -> None:
    """A build: a few registries and mirrors, two ports each, several connections to each."""
    hosts = ("198.51.100.10", "198.51.100.11", "203.0.113.10")
    targets = [(h, p) for _ in range(4) for h in hosts for p in (443, 80)] + [("127.0.0.1", p) for p in range(1, 30)]
    w = watched()
    assert w.run(ScanDetector(), connects(repr(targets)), lab.client) == []
    assert len([e for e in w.events if e.type == ev.CONNECT]) == len(targets)


# -- cpu_saturation ------------------------------------------------------------------------------------

@needs_root
def test_throttled_busy_process_with_its_peer(watched: Callable[..., Watched], lab: Lab) -> None:
    """A "miner" at ~70% of a CPU that keeps a connection to its "pool"."""
    code = (f"import socket, time\nc = socket.create_connection(('198.51.100.10', {lab.hold_port}))\n"
            "end = time.monotonic() + 3\n"
            "while time.monotonic() < end:\n"
            "    t = time.monotonic() + 0.07\n"
            "    while time.monotonic() < t: pass\n"
            "    time.sleep(0.03)\n")
    w = watched()
    det = CpuSaturationDetector(percent=40, seconds=1.0)
    found = w.run(det, [PY, "-c", code], lab.client)
    assert 1 <= len(found) <= 2  # at 1 s, and again once it had been saturated for 2 s
    first = found[0]
    assert first.kind == "cpu_saturation" and first.pid == w.procs[0].pid
    assert 40 <= first.data["percent"] <= 105 and first.data["seconds"] >= 1.0
    assert first.data["peers"] == [f"198.51.100.10:{lab.hold_port}"]
    assert first.proc is not None and first.proc.name.startswith("python")
    det.tick(boottime_ns())
    assert det._sandboxes == {}  # forgotten on exit


@needs_root
def test_a_sandbox_policy_sets_its_own_thresholds(watched: Callable[..., Watched]) -> None:
    """The detector's own thresholds (40% for 30 s) do not see a 2.5 s burn; the policy's of the
    sandbox it runs in (40% for 1 s) do, and say so; another sandbox keeps the detector's."""
    code = "import time\nend = time.monotonic() + 2.5\nwhile time.monotonic() < end: pass\n"
    w = watched()
    det = CpuSaturationDetector(percent=40, seconds=30)
    det.set_thresholds(w.sandbox_id, 40, 1.0)
    found = w.run(det, [PY, "-c", code])
    assert found and found[0].data["policy"] is True and found[0].data["percent"] >= 40
    other = watched()
    assert other.sandbox_id != w.sandbox_id and other.run(det, [PY, "-c", code]) == []
    det.clear_thresholds(w.sandbox_id)
    assert w.run(det, [PY, "-c", code]) == []


@needs_root
def test_short_burst_is_not_saturation(watched: Callable[..., Watched]) -> None:
    code = "import time\nt = time.monotonic() + 0.3\nwhile time.monotonic() < t: pass\ntime.sleep(2)\n"
    w = watched()
    assert w.run(CpuSaturationDetector(percent=40, seconds=1.5), [PY, "-c", code]) == []


# -- long_session --------------------------------------------------------------------------------------

@needs_root
def test_open_connections_are_long_sessions_closed_ones_are_not(watched: Callable[..., Watched],
                                                                  lab: Lab) -> None:
    held = f"('198.51.100.10', {lab.hold_port})"
    main = (f"import errno, socket, sys, time\n"
            f"a = socket.create_connection({held})\n"
            f"b = socket.create_connection({held}); b.close()\n"
            f"c = socket.socket(); c.setblocking(False)\n"
            f"assert c.connect_ex({held}) == errno.EINPROGRESS\n"
            f"print(a.getsockname()[1], c.getsockname()[1], flush=True)\n"
            "time.sleep(30)\n")
    # the shape of `ssh -f`: connect, hand the socket to a child, exit
    handoff = (f"import os, socket, sys, time\n"
               f"d = socket.create_connection(('203.0.113.10', {lab.hold_port}))\n"
               "print(d.getsockname()[1], flush=True)\n"
               "if os.fork() == 0:\n    time.sleep(30)\n")
    w = watched()
    det = LongSessionDetector(seconds=1.0)
    p1, p2 = w.start([PY, "-c", main], lab.client), w.start([PY, "-c", handoff], lab.client)
    found = w.pump(det, 1.9)  # one check at 1 s; the next would be at twice the age
    assert p1.stdout is not None and p2.stdout is not None
    sport_a, sport_c = map(int, p1.stdout.readline().split())
    sport_d = int(p2.stdout.readline())
    got = {(e.pid, e.data["dip"], e.data["dport"], e.data["sport"]) for e in found}
    assert got == {(p1.pid, "198.51.100.10", lab.hold_port, sport_a), (p1.pid, "198.51.100.10", lab.hold_port, sport_c),
                   (p2.pid, "203.0.113.10", lab.hold_port, sport_d)}
    assert len(found) == 3 and all(e.kind == "long_session" and 1.0 <= e.data["seconds"] < 2.5 for e in found)
    assert p2.poll() == 0  # the connecting process had gone: found through its child's namespace


# -- cred_then_egress ---------------------------------------------------------------------------------

@needs_root
def test_canary_read_then_connect_from_another_process(watched: Callable[..., Watched], lab: Lab,
                                                       monitor: Monitor, tmp_path: Path) -> None:
    canary = tmp_path / "wallet.dat"
    canary.write_text("fake wallet\n")
    canary_id = monitor.watch_file(canary)
    try:
        w = watched()
        script = (f"cat {canary} > /dev/null; "
                  f"{PY} -c \"import socket; socket.create_connection(('198.51.100.11', {lab.open_port}))\"")
        found = w.run(CredThenEgressDetector(), ["/bin/sh", "-c", script], lab.client)
    finally:
        monitor.sensor.unwatch_file(canary_id)
    (hit,) = found
    assert hit.kind == "cred_then_egress"
    assert hit.data["path"] == str(canary) and hit.data["kind"] == "canary"
    assert (hit.data["dip"], hit.data["dport"]) == ("198.51.100.11", lab.open_port)
    assert 0 <= hit.data["seconds"] < 5
    assert hit.proc is not None and hit.proc.name.startswith("python")  # the sender, not cat
    assert hit.step_id == w.step_id


@needs_root
def test_credential_path_egress_order_loopback_and_window(watched: Callable[..., Watched], lab: Lab,
                                                         monitor: Monitor, tmp_path: Path) -> None:
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text("[default]\n")
    (aws / "config").write_text("[default]\n")
    monitor.watch_prefix(f"{aws}/")
    out = f"('198.51.100.11', {lab.open_port})"
    code = ("import socket, time\n"
            f"socket.create_connection({out}).close()\n"  # egress before any read
            f"open('{aws}/config').read()\n"  # not a credential
            f"open('{aws}/credentials').read()\n"
            "socket.socket().connect_ex(('127.0.0.1', 9))\n"  # loopback: not egress
            "time.sleep(0.6)\n"
            f"socket.create_connection({out}).close()\n")
    w = watched()
    # before_s=0: only egress after the read counts
    (hit,) = w.run(CredThenEgressDetector(before_s=0), [PY, "-c", code], lab.client)
    assert hit.data["path"] == f"{aws}/credentials" and hit.data["kind"] == "credential"
    assert 0.5 <= hit.data["seconds"] < 5
    late = CredThenEgressDetector(seconds=0.3, before_s=0)
    assert [x for e in w.events for x in late.feed(e)] == []  # too late
    # by default the same process's egress just before the read counts too (an uploader
    # connects, then reads what it sends): concluded at the read, with negative seconds
    default = CredThenEgressDetector()
    (early,) = [x for e in w.events for x in default.feed(e)]
    assert early.data["path"] == f"{aws}/credentials" and -5 < early.data["seconds"] <= 0


def test_flow_out_counts_as_egress() -> None:
    det = CredThenEgressDetector()
    read = ev.DerivedEvent.make("dns", sandbox_id=3, step_id=2, name="x.example.com")  # any header
    read_open = _open_event(read, "/home/agent/.env")
    assert det.feed(read_open) == []
    flow = ev.DerivedEvent.make("flow", ts_ns=read_open.ts_ns + NS, sandbox_id=3, step_id=2, pid=42,
                                direction="out", dip="203.0.113.10", dport=443, l7="tls")
    (hit,) = det.feed(flow)
    assert (hit.pid, hit.data["kind"], hit.data["seconds"]) == (42, "credential", 1.0)
    assert det.feed(flow) == []  # once per step and path


def _open_event(header: ev.Event, path: str) -> ev.FileEvent:
    """An open record as the sensor decodes one (for the single case no real process can make
    without a sandbox home: the flow events come from the wire, not built yet)."""
    t = (header.ts_ns, 0, ev.OPEN, 41, 41, 1, 0, header.sandbox_id, header.step_id, b"cat", 3, 0, 1, 0, 0,
         path.encode(), b"")
    e = ev.FileEvent.from_tuple(t)
    assert isinstance(e, ev.FileEvent)
    return e


# -- dns_tunnel (dns events are made in user space by the resolver) ----------------------------------

def _names(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(40)) for _ in range(n)]


def _dns(name: str, t_s: float, sandbox_id: int = 1, qtype: str = "A") -> ev.DerivedEvent:
    return ev.DerivedEvent.make("dns", ts_ns=int(1000 * NS + t_s * NS), sandbox_id=sandbox_id, name=name,
                                qtype=qtype, allowed=False)


def test_dns_tunnel_many_random_names_once_per_doubling() -> None:
    det = DnsTunnelDetector()
    found = [x for i, label in enumerate(_names(45)) for x in det.feed(_dns(f"{label}.t.Example.NET.", i * 0.2))]
    assert [(e.data["domain"], e.data["names"]) for e in found] == [("example.net", 20), ("example.net", 40)]
    assert found[0].data["entropy"] >= 3.5 and found[0].data["txt"] == 0
    assert found[0].sandbox_id == 1


def test_dns_tunnel_ignores_normal_names_slow_trickles_and_other_sandboxes() -> None:
    det = DnsTunnelDetector()
    normal = ["www.example.com", "api.github.com", "ip-10-0-0-12.eu-west-1.compute.internal",
              "files.pythonhosted.org", "d1a2b3c4e5f6g7.cloudfront.net",
              "very-long-but-ordinary-subdomain-name-for-a-service.internal.example.com"]
    assert [x for i in range(300) for x in det.feed(_dns(normal[i % len(normal)], i * 0.01))] == []
    slow = [x for i, label in enumerate(_names(25, 1)) for x in det.feed(_dns(f"{label}.t.example.org", i * 10.0))]
    assert slow == []  # 6 in any 60 s
    split = [x for i, label in enumerate(_names(30, 2))
             for x in det.feed(_dns(f"{label}.example.io", 500 + i * 0.1, sandbox_id=1 + i % 2))]
    assert split == []  # 15 per sandbox
    assert entropy("aaaa") == 0.0 and entropy("abcd") == 2.0


def test_dns_tunnel_txt_heavy_second_level_suffix_and_flows() -> None:
    det = DnsTunnelDetector()
    found = [x for i in range(25) for x in det.feed(_dns(f"c{i}.x.example.co.uk", i * 0.1, qtype="TXT"))]
    assert [(e.data["domain"], e.data["txt"], e.data["names"]) for e in found] == [("example.co.uk", 20, 0)]
    labels = _names(20, 3)
    for i, label in enumerate(labels[:10]):  # the same names by both roads count once
        det.feed(_dns(f"{label}.tunnel.example.net", 100 + i * 0.1))
        det.feed(ev.DerivedEvent.make("flow", ts_ns=int((1100 + i * 0.1) * NS), sandbox_id=1, l7="dns",
                                      dns_names=[f"{label}.tunnel.example.net"], direction="out"))
    assert len(det._sandboxes[1]["example.net"].odd) == 10
    flow = ev.DerivedEvent.make("flow", ts_ns=1102 * NS, sandbox_id=1, l7="dns", direction="out",
                                dns_names=[f"{label}.tunnel.example.net" for label in labels[10:]], dns_qtype="A")
    (hit,) = det.feed(flow)
    assert hit.data["names"] == 20
    txt = [x for i in range(20) for x in det.feed(ev.DerivedEvent.make(
        "flow", ts_ns=(1103 + i) * NS, sandbox_id=2, l7="dns", dns_names=[f"q{i}.example.org"], dns_qtype="TXT"))]
    assert [(e.data["domain"], e.data["txt"]) for e in txt] == [("example.org", 20)]


def test_dns_tunnel_tables_are_bounded() -> None:
    det = DnsTunnelDetector(max_domains=50, max_names=64)
    for i, label in enumerate(_names(2000, 4)):
        det.feed(_dns(f"{label}.d{i % 500}.example{i % 500}.com", i * 0.001))
    table = det._sandboxes[1]
    assert len(table) == 50 and all(len(w.seen) <= 64 for w in table.values())
    det.tick(10_000 * NS)
    assert det._sandboxes == {}


# -- outlives_step ------------------------------------------------------------------------------------

@needs_root
def test_detached_process_outlives_its_step_once(watched: Callable[..., Watched]) -> None:
    code = ("import subprocess\n"
            "p = subprocess.Popen(['sleep', '30'], start_new_session=True, stdin=subprocess.DEVNULL,"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nprint(p.pid, flush=True)\n")
    w = watched()
    det = OutlivesStepDetector(grace_s=0.3)
    step = w.start([PY, "-c", code])
    assert w.pump(det, 10, until=lambda: step.poll() is not None and step.pid in
                  {e.pid for e in w.events if e.type == ev.EXIT}) == []
    assert step.stdout is not None
    sleeper = int(step.stdout.readline())
    det.step_ended(w.sandbox_id, w.step_id, boottime_ns())
    found = w.pump(det, 1.0)
    (late,) = found
    assert (late.kind, late.pid, late.sandbox_id, late.step_id) == ("outlives_step", sleeper, w.sandbox_id,
                                                                    w.step_id)
    assert 0.3 <= late.data["seconds"] < 1.5
    assert late.proc is not None and late.proc.name == "sleep"


@needs_root
def test_ended_step_without_leftovers_and_the_holder_step(watched: Callable[..., Watched]) -> None:
    det = OutlivesStepDetector(grace_s=0.2)
    w = watched()
    w.run(det, ["/bin/sh", "-c", "sleep 0.1; true"])
    det.step_ended(w.sandbox_id, w.step_id, boottime_ns())
    holder = watched(step_id=0)
    holder.start(["sleep", "30"])
    holder.pump(det, 0.3)
    det.step_ended(holder.sandbox_id, 0, boottime_ns())
    assert holder.pump(det, 0.6) == []
    assert det._steps == {}  # the ended step was empty and is forgotten; step 0 never tracked


# -- bounds and cost ----------------------------------------------------------------------------------

def _connect_like(template: ev.NetEvent, *, pid: int, sandbox_id: int, addr: bytes, ts_ns: int) -> ev.NetEvent:
    t = list(template._t)
    t[0], t[3], t[4], t[7], t[16] = ts_ns, pid, pid, sandbox_id, addr.ljust(16, b"\0")
    e = ev.NetEvent.from_tuple(tuple(t))
    assert isinstance(e, ev.NetEvent)
    return e


@needs_root
def test_tables_stay_bounded(watched: Callable[..., Watched], lab: Lab) -> None:
    w = watched()
    w.run(ScanDetector(), connects(repr([("198.51.100.20", 80)])), lab.client)
    (template,) = [e for e in w.events if isinstance(e, ev.NetEvent) and e.type == ev.CONNECT]
    scan = ScanDetector(max_processes=100, max_steps=10, max_probes=50)
    dets = Detectors(scan=scan)
    stream = [_connect_like(template, pid=10_000 + i, sandbox_id=1 + i % 40, addr=bytes((198, 51, 100, i % 200)),
                            ts_ns=template.ts_ns + i * 1000) for i in range(20_000)]
    others = [e for e in w.events if e.type != ev.CONNECT]
    for e in stream:
        dets.feed(e)
    for _ in range(200):
        for other in others:
            dets.feed(other)
    assert len(scan._procs) <= 100 and len(scan._steps) <= 10
    assert all(len(win.probes) <= 50 for win in scan._steps.values())
    dets.tick(template.ts_ns + 3600 * NS)
    assert len(scan._procs) == 0 and len(scan._steps) == 0
