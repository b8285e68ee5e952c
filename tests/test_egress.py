"""The egress guard and sandbox network namespaces, on the real kernel.

All traffic stays inside the namespaces of tests/netlab.py (no route out) or
goes to the host end of a sandbox veth, an address on this machine.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Processes, TestNet, assert_no_route_out

from corral.errors import CorralError
from corral.sandbox import egress
from corral.sandbox.egress import ALWAYS_DENIED, EgressGuard, Mode, Rule, RuleError
from corral.sandbox.netns import ExistingNetns, NetNamespace, netns_names
from corral.sensor.cgroups import ScratchCgroup

EPERM = "ERR 1"
ECONNREFUSED = "ERR 111"

needs_kernel = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (network namespaces, cgroups, BPF)")
needs_guard = pytest.mark.skipif(not egress.object_path().exists(),
                                 reason="the egress BPF object is not built: run `make setup`")

_ids = itertools.count(1)
Sandbox = tuple[int, list[str]]  # (sandbox id, cgroup.procs files to run a client in)

# One TCP peer on 198.51.100.10 for a long-lived flow: prints "ready PORT", then
# "got WORD" for each line received and answers "echo WORD" -- except "later",
# answered with "late" a second afterwards (time to cut the sandbox meanwhile).
FLOW_SERVER_PY = r"""
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.51.100.10", 0))
s.listen(1)
print("ready", s.getsockname()[1], flush=True)
c, _ = s.accept()
for line in c.makefile("rb"):
    word = line.strip().decode()
    print("got", word, flush=True)
    if word == "later":
        time.sleep(1)
        c.sendall(b"late\n")
    else:
        c.sendall(b"echo " + line)
"""

# The client end, driven line by line on stdin: "send WORD" or "recv".
# Answers "sent", "recv DATA", "TIMEOUT" or "ERR <errno>".
FLOW_CLIENT_PY = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.settimeout(2.5)
print("connected", flush=True)
for cmd in sys.stdin:
    verb, _, word = cmd.strip().partition(" ")
    try:
        if verb == "send":
            s.sendall(word.encode() + b"\n")
            print("sent", flush=True)
        else:
            print("recv", s.recv(64).decode().strip(), flush=True)
    except socket.timeout:
        print("TIMEOUT", flush=True)
    except OSError as e:
        print("ERR", e.errno, flush=True)
"""


class LineReader:
    """Lines from a child's stdout, read from the raw fd, each waited for with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._buf = b""

    def line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return None
            chunk = os.read(self._fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()


# -- rules (no kernel needed) ------------------------------------------------

@pytest.mark.parametrize(("text", "network", "port"), [
    ("198.51.100.7:22", "198.51.100.7/32", 22),
    ("198.51.100.7", "198.51.100.7/32", 0),
    ("10.0.0.0/8", "10.0.0.0/8", 0),
    ("10.0.0.0/8:443", "10.0.0.0/8", 443),
    ("[2001:db8::1]:443", "2001:db8::1/128", 443),
    ("[2001:db8::/32]:53", "2001:db8::/32", 53),
    ("2001:db8::/32", "2001:db8::/32", 0),
    ("2001:db8::1", "2001:db8::1/128", 0),
    ("[::ffff:198.51.100.7]:80", "198.51.100.7/32", 80),  # judged by the IPv4 lists
])
def test_rule_parse(text: str, network: str, port: int) -> None:
    rule = Rule.parse(text)
    assert rule == Rule(ipaddress.ip_network(network), port)
    assert Rule.parse(str(rule)) == rule


@pytest.mark.parametrize("text", [
    "", "example.com:443", "10.0.0.1/8", "198.51.100.7:70000", "198.51.100.7:http",
    "[2001:db8::1", "[2001:db8::1]443", "2001:db8::1:443:", "300.1.1.1",
])
def test_rule_parse_rejects(text: str) -> None:
    with pytest.raises(RuleError) as info:
        Rule.parse(text)
    assert isinstance(info.value, ValueError)
    assert repr(text) in str(info.value) or "port" in str(info.value)


def test_always_denied_covers_metadata_and_docker() -> None:
    nets = {(str(r.network), r.port) for r in ALWAYS_DENIED}
    assert ("169.254.169.254/32", 0) in nets
    assert ("100.100.100.200/32", 0) in nets
    assert ("fd00:ec2::254/128", 0) in nets
    assert {("0.0.0.0/0", 2375), ("0.0.0.0/0", 2376), ("::/0", 2375), ("::/0", 2376)} <= nets


@needs_guard
def test_map_layout_matches_btf() -> None:
    """egress.py packs keys by hand: check them against the object's own BTF."""
    from corral.sensor.libbpf import BpfObject

    obj = BpfObject(str(egress.object_path()))
    try:
        head = {"prefixlen": 0, "sandbox_id": 4, "port": 8, "pad": 10, "addr": 12}
        assert obj.struct_layout("egress_key4") == (16, head)
        assert obj.struct_layout("egress_key6") == (28, head)
        assert obj.struct_layout("egress_counters") == (24, {"allowed": 0, "denied": 8, "would_deny": 16})
    finally:
        obj.close()
    key = egress._key(7, Rule.parse("198.51.100.0/24:443"))
    assert key == (64 + 24).to_bytes(4, "little") + (7).to_bytes(4, "little") + bytes([1, 187, 0, 0]) \
        + bytes([198, 51, 100, 0])


# -- the guard on the kernel -------------------------------------------------

@pytest.fixture(scope="module")
def net() -> Iterator[TestNet]:
    with TestNet() as lab:
        udp = [f"udp:7070@{addr}" for addr in ("198.51.100.10", "198.51.100.11", "2001:db8::10")]
        lab.start_listener(lab.server, ["tcp:8080", "tcp:9090", "tcp:2375", *udp])
        yield lab


@pytest.fixture(scope="module")
def guard() -> Iterator[EgressGuard]:
    with EgressGuard() as g:
        yield g


def _scratch() -> ScratchCgroup:
    return ScratchCgroup(f"test-egress-{os.getpid()}-{next(_ids)}")


@pytest.fixture
def cgroup() -> Iterator[ScratchCgroup]:
    cg = _scratch()
    yield cg
    cg.remove()


@pytest.fixture
def sandbox(guard: EgressGuard, cgroup: ScratchCgroup) -> Iterator[Sandbox]:
    """An enforcing sandbox bound to a scratch cgroup: (sandbox id, cgroup.procs files)."""
    sandbox_id = next(_ids)
    guard.add_sandbox(sandbox_id, Mode.ENFORCE, [cgroup.id])
    yield sandbox_id, [str(cgroup.path / "cgroup.procs")]
    guard.remove_sandbox(sandbox_id)


@needs_kernel
@needs_guard
class TestGuard:
    def test_enforce_allows_only_the_list(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("198.51.100.10:8080"))
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"
        assert net.attempt("tcp", "198.51.100.11", 8080, procs) == EPERM
        assert net.attempt("tcp", "198.51.100.10", 9090, procs) == EPERM
        assert guard.counters(sid) == {"allowed": 1, "denied": 2, "would_deny": 0}
        assert net.attempt("tfo", "198.51.100.11", 8080, procs) == EPERM  # no way around via sendto
        assert net.attempt("tfo", "198.51.100.10", 8080, procs) == "OK"

    def test_other_cgroups_are_untouched(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox,
                                         cgroup: ScratchCgroup) -> None:
        sid, _ = sandbox
        other = _scratch()  # also below <v2root>/corral, where the programs run, but not bound
        try:
            assert net.attempt("tcp", "198.51.100.11", 8080, [str(other.path / "cgroup.procs")]) == "OK"
            assert net.attempt("tcp", "198.51.100.11", 8080) == "OK"  # the test's own cgroup
        finally:
            other.remove()
        assert guard.counters(sid) == {"allowed": 0, "denied": 0, "would_deny": 0}

    def test_child_cgroup_stays_in_the_sandbox(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox,
                                               cgroup: ScratchCgroup) -> None:
        sid, _ = sandbox
        child = cgroup.path / "escape"
        child.mkdir()
        try:
            assert net.attempt("tcp", "198.51.100.11", 8080, [str(child / "cgroup.procs")]) == EPERM
        finally:
            child.rmdir()
        assert guard.counters(sid)["denied"] == 1

    def test_observe_lets_through_and_counts(self, net: TestNet, guard: EgressGuard,
                                             sandbox: Sandbox) -> None:
        sid, procs = sandbox
        assert_no_route_out(net.client)  # observe lets traffic through: prove it cannot leak
        guard.set_mode(sid, Mode.OBSERVE)
        guard.allow(sid, Rule.parse("198.51.100.10:8080"))
        assert net.attempt("tcp", "198.51.100.11", 8080, procs) == "OK"
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"
        assert guard.counters(sid) == {"allowed": 1, "denied": 0, "would_deny": 1}

    def test_cut_denies_even_allowed(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("198.51.100.10:8080"))
        guard.set_mode(sid, Mode.CUT)
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == EPERM
        assert net.attempt("udp", "198.51.100.10", 7070, procs) == EPERM
        guard.set_mode(sid, Mode.ENFORCE)
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"

    def test_cut_stops_established_flows(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox,
                                          cgroup: ScratchCgroup) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("198.51.100.10"))
        server = net.start_server(net.server, [sys.executable, "-c", FLOW_SERVER_PY])
        seen = LineReader(server)
        ready = (seen.line(10) or "").split()
        assert ready[:1] == ["ready"]
        # In the sandbox's cgroup (joined before exec: its socket is born there) and the
        # client namespace.  `ip netns exec` execs the client: the PID is its own.
        client = subprocess.Popen(["ip", "netns", "exec", net.client, sys.executable, "-c", FLOW_CLIENT_PY,
                                   "198.51.100.10", ready[1]], preexec_fn=lambda: cgroup.add(os.getpid()),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True)
        said = LineReader(client)
        assert client.stdin is not None

        def tell(cmd: str) -> str | None:
            assert client.stdin is not None
            client.stdin.write(cmd + "\n")
            client.stdin.flush()
            return said.line(10)

        try:
            assert said.line(10) == "connected"
            assert tell("send one") == "sent"
            assert seen.line(5) == "got one"
            assert tell("recv") == "recv echo one"  # ENFORCE: the allowed flow works

            assert tell("send later") == "sent"
            assert seen.line(5) == "got later"
            guard.set_mode(sid, Mode.CUT)  # the server answers a second later: into the cut
            assert tell("recv") == "TIMEOUT"  # ingress dropped
            reply = tell("send two")  # queued in the socket (TCP retransmits into the cut), or fails
            assert reply is not None and reply.split()[0] in ("sent", "TIMEOUT", "ERR")
            assert seen.line(2.5) is None  # egress dropped: the server never sees "two"

            guard.set_mode(sid, Mode.ENFORCE)
            assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"  # a new flow works again
        finally:
            client.kill()  # by PID; the server goes with the lab
            client.wait()
            assert client.stdin is not None
            client.stdin.close()
            assert client.stdout is not None
            client.stdout.close()

    def test_udp(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("198.51.100.10:7070"))
        assert net.attempt("udp", "198.51.100.10", 7070, procs) == "OK"
        assert net.attempt("udp", "198.51.100.11", 7070, procs) == EPERM  # sendto: sendmsg4
        assert net.attempt("udpc", "198.51.100.11", 7070, procs) == EPERM  # connect4 on UDP
        assert net.attempt("udpc", "198.51.100.10", 7070, procs) == "OK"

    def test_port_zero_means_any_port(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("198.51.100.0/24"))
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"
        assert net.attempt("tcp", "198.51.100.11", 9090, procs) == "OK"
        assert net.attempt("tcp", "203.0.113.10", 8080, procs) == EPERM

    def test_revoke(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox) -> None:
        sid, procs = sandbox
        rule = Rule.parse("198.51.100.10:8080")
        guard.allow(sid, rule)
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"
        guard.revoke(sid, rule)
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == EPERM
        guard.allow(sid, rule)  # e.g. a static rule ...
        guard.allow(sid, rule)  # ... and a DNS answer for the same address
        guard.revoke(sid, rule)  # the DNS answer expires: the static rule still holds
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"
        guard.revoke(sid, rule)
        assert guard.rules(sid)["allow"] == []

    def test_always_denied_beats_a_broad_allow(self, net: TestNet, guard: EgressGuard,
                                               sandbox: Sandbox) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("0.0.0.0/0"))
        assert net.attempt("tcp", "203.0.113.10", 8080, procs) == "OK"
        assert net.attempt("tcp", "169.254.169.254", 8080, procs) == EPERM  # metadata stub
        assert net.attempt("tcp", "198.51.100.10", 2375, procs) == EPERM    # Docker API port
        assert net.attempt("tcp", "::ffff:169.254.169.254", 8080, procs) == EPERM

    def test_deny_entry_beats_allow(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("198.51.100.0/24"))
        guard.deny(sid, Rule.parse("198.51.100.11:8080"))
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"
        assert net.attempt("tcp", "198.51.100.11", 8080, procs) == EPERM
        assert net.attempt("tcp", "198.51.100.11", 9090, procs) == "OK"

    def test_ipv6(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("[2001:db8::10]:8080"))
        assert net.attempt("tcp", "2001:db8::10", 8080, procs) == "OK"
        assert net.attempt("tcp", "2001:db8::10", 9090, procs) == EPERM
        assert net.attempt("udp", "2001:db8::10", 7070, procs) == EPERM  # sendmsg6
        guard.allow(sid, Rule.parse("[2001:db8::10]:7070"))
        assert net.attempt("udp", "2001:db8::10", 7070, procs) == "OK"
        assert net.attempt("udpc", "2001:db8::10", 7070, procs) == "OK"
        guard.allow(sid, Rule.parse("::/0"))
        guard.deny(sid, Rule.parse("2001:db8::/32"))
        assert net.attempt("tcp", "2001:db8::10", 8080, procs) == EPERM

    def test_ipv4_mapped_ipv6_is_judged_as_ipv4(self, net: TestNet, guard: EgressGuard,
                                               sandbox: Sandbox) -> None:
        sid, procs = sandbox
        guard.allow(sid, Rule.parse("198.51.100.10:8080"))
        guard.allow(sid, Rule.parse("198.51.100.10:7070"))
        assert net.attempt("tcp", "::ffff:198.51.100.10", 8080, procs) == "OK"
        assert net.attempt("tcp", "::ffff:198.51.100.11", 8080, procs) == EPERM
        assert net.attempt("udp", "::ffff:198.51.100.10", 7070, procs) == "OK"
        assert net.attempt("udp", "::ffff:198.51.100.11", 7070, procs) == EPERM

    def test_loopback_is_not_implicit(self, net: TestNet, guard: EgressGuard, sandbox: Sandbox) -> None:
        sid, procs = sandbox
        assert net.attempt("tcp", "127.0.0.1", 1, procs) == EPERM
        assert net.attempt("tcp", "::1", 1, procs) == EPERM
        guard.allow(sid, Rule.parse("127.0.0.0/8"))
        assert net.attempt("tcp", "127.0.0.1", 1, procs) == ECONNREFUSED  # reached the (empty) port

    def test_remove_sandbox_forgets_everything(self, net: TestNet, guard: EgressGuard,
                                               cgroup: ScratchCgroup) -> None:
        sid = next(_ids)
        procs = [str(cgroup.path / "cgroup.procs")]
        guard.add_sandbox(sid, Mode.ENFORCE, [cgroup.id])
        guard.allow(sid, Rule.parse("198.51.100.10:8080"))
        assert len(guard.rules(sid)["deny"]) == len(ALWAYS_DENIED)
        assert net.attempt("tcp", "198.51.100.11", 8080, procs) == EPERM
        guard.remove_sandbox(sid)
        with pytest.raises(CorralError, match="add_sandbox"):
            guard.counters(sid)
        assert net.attempt("tcp", "198.51.100.11", 8080, procs) == "OK"  # unbound: untouched
        guard.add_sandbox(sid, Mode.OBSERVE)  # the id is free again, with nothing left over
        assert guard.rules(sid)["allow"] == []
        guard.remove_sandbox(sid)

    def test_misuse_is_refused_clearly(self, guard: EgressGuard, sandbox: Sandbox,
                                       cgroup: ScratchCgroup) -> None:
        sid, _ = sandbox
        with pytest.raises(CorralError, match="already guarded"):
            guard.add_sandbox(sid, Mode.ENFORCE)
        with pytest.raises(CorralError, match="add_sandbox"):
            guard.allow(999_999, Rule.parse("198.51.100.10"))
        other = next(_ids)
        guard.add_sandbox(other, Mode.ENFORCE)
        try:
            with pytest.raises(CorralError, match="one sandbox only"):
                guard.bind_cgroup(cgroup.id, other)
        finally:
            guard.remove_sandbox(other)

    def test_close_detaches(self, net: TestNet, cgroup: ScratchCgroup) -> None:
        procs = [str(cgroup.path / "cgroup.procs")]
        g = EgressGuard()
        try:
            g.add_sandbox(1, Mode.ENFORCE, [cgroup.id])
            assert net.attempt("tcp", "198.51.100.10", 8080, procs) == EPERM
        finally:
            g.close()
        g.close()  # twice is fine
        assert net.attempt("tcp", "198.51.100.10", 8080, procs) == "OK"
        with pytest.raises(CorralError, match="closed"):
            g.set_mode(1, Mode.CUT)


# -- network namespaces ------------------------------------------------------

def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


@needs_kernel
class TestNetNamespace:
    def test_create_reach_host_and_destroy(self) -> None:
        tag = f"test-{os.getpid()}"
        a = NetNamespace(f"{tag}-a")
        try:
            b = NetNamespace(f"{tag}-b")
            try:
                assert a.subnet != b.subnet and not a.subnet.overlaps(b.subnet)
                assert a.host_veth != b.host_veth and len(a.host_veth) <= 15
                assert {a.name, b.name} <= set(netns_names())
                assert {a.host_veth, b.host_veth} <= _links()
                assert a.sandbox_address in ipaddress.ip_network("100.64.0.0/10")
                assert a.exec_prefix() == ["ip", "netns", "exec", a.name]
                assert a.etc_dir == Path("/etc/netns", a.name) and a.etc_dir.is_dir()
                assert_no_route_out(a.name)
                with Processes() as procs:  # a listener on the host end: an address of this machine
                    [port] = procs.start_listener(None, ["tcp:0"], bind=str(a.host_address))
                    assert procs.attempt_in(a.name, "tcp", str(a.host_address), port) == "OK"
                    # b's sandbox has no route to a's /30
                    assert procs.attempt_in(b.name, "tcp", str(a.host_address), port) == "ERR 101"
            finally:
                b.destroy()
        finally:
            a.destroy()
        a.destroy()  # idempotent
        # Only our own names: others may be making namespaces on this host right now.
        assert not {a.host_veth, b.host_veth} & _links()
        assert not {a.name, b.name} & set(netns_names())
        assert not a.etc_dir.exists() and not b.etc_dir.exists()

    def test_route_out_adds_only_a_default_route(self) -> None:
        with NetNamespace(f"test-{os.getpid()}-r", route_out=True) as ns:
            res = subprocess.run(["ip", "-n", ns.name, "route", "get", "198.51.100.1"],
                                 capture_output=True, text=True, check=True)  # a lookup, nothing sent
            assert f"via {ns.host_address}" in res.stdout
        assert ns.name not in netns_names()

    def test_reap_stale(self) -> None:
        dead = subprocess.Popen(["true"])
        dead.wait()
        ns = NetNamespace(f"sb-{dead.pid}-1")
        try:
            mine = NetNamespace(f"sb-{os.getpid()}-reap")
            try:
                reaped = NetNamespace.reap_stale()  # (a concurrent run may have reaped ns first)
                assert mine.name not in reaped
                assert ns.name not in netns_names() and ns.host_veth not in _links()
                assert mine.name in netns_names()
            finally:
                mine.destroy()
        finally:
            ns.destroy()

    def test_existing_namespace(self) -> None:
        with pytest.raises(CorralError, match="does not exist"):
            ExistingNetns(f"corral-missing-{os.getpid()}")
        with NetNamespace(f"test-{os.getpid()}-e") as made:
            existing = ExistingNetns(made.name)
            assert existing.exec_prefix() == made.exec_prefix()
            existing.destroy()  # never removes what it did not make
            assert made.name in netns_names()

    def test_name_clash_is_refused_and_leaves_the_other(self) -> None:
        with NetNamespace(f"test-{os.getpid()}-x") as first:
            with pytest.raises(CorralError, match="already exists"):
                NetNamespace(f"test-{os.getpid()}-x")
            assert first.name in netns_names() and first.host_veth in _links()
        with pytest.raises(CorralError, match="bad network namespace name"):
            NetNamespace("../etc")
