"""The flow sniffer: the first bytes of each flow, classified, on the real kernel.

Real clients (OpenSSH, Python's ssl, curl, a stratum client, dnslib) run in a
scratch cgroup below ``<v2root>/corral`` inside the client namespace of
tests/netlab.py; their servers run in its server namespace, outside the corral
tree.  No traffic leaves the lab (no route out).  The classifier tests need no
kernel.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSRecord  # type: ignore[import-untyped]
from netlab import TestNet

from corral import events as ev
from corral.detect import flows
from corral.detect.flows import L7_KINDS, FlowJoiner, FlowRecord, FlowSniffer, classify, payload_text, to_event
from corral.monitor import Monitor
from corral.sensor.cgroups import ScratchCgroup, cgroup_of_pid
from corral.sensor.host import cgroup2_root
from corral.sensor.libbpf import BpfObject

needs_kernel = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (network namespaces, cgroups, BPF)")
needs_object = pytest.mark.skipif(not flows.object_path().exists(),
                                  reason="the flow sniffer's BPF object is not built: run `make setup`")

SUBSCRIBE = b'{"id":1,"method":"mining.subscribe","params":["cpuminer/2.5"]}\n'
XMRIG_LOGIN = (b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"wallet","pass":"x",'
               b'"agent":"XMRig/6.21.0"}}\n')
POOL_REPLY = b'{"id":1,"result":[[["mining.set_difficulty","1"],["mining.notify","ae68"]],"08000002",4],"error":null}\n'
XMRIG_REPLY = (b'{"id":1,"jsonrpc":"2.0","error":null,"result":{"id":"1","job":{"blob":"0707","job_id":"7",'
               b'"target":"b88d0600"},"status":"OK"}}\n')


def client_hello(server_name: str) -> bytes:
    """A real ClientHello from Python's ssl (OpenSSL), made without a network."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def dns_query(name: str, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


def dns_answer(name: str) -> bytes:
    q = DNSRecord.question(name, "A")
    a = q.reply()
    a.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME("edge." + name), ttl=60))
    a.add_answer(RR("edge." + name, QTYPE.A, rdata=A("203.0.113.10"), ttl=60))
    a.add_answer(RR("edge." + name, QTYPE.AAAA, rdata=AAAA("2001:db8::10"), ttl=60))
    return bytes(a.pack())


# -- the classifier (no kernel) ------------------------------------------------

def test_tls_client_hello_gives_the_sni() -> None:
    hello = client_hello("pool.example.net")
    fields = classify(hello[:flows.PAYLOAD_MAX], "tcp", 443, "out")
    assert fields["l7"] == "tls"
    assert fields["sni"] == "pool.example.net"
    # a server's first record is TLS too, without a name
    assert classify(b"\x16\x03\x03\x00\x5a\x02\x00\x00\x56\x03\x03", "tcp", 443, "in") == {
        "l7": "tls", "payload": "\\x16\\x03\\x03\\x00Z\\x02\\x00\\x00V\\x03\\x03"}


def test_ssh_http_stratum() -> None:
    ssh = classify(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n\x00\x00\x05\xdc", "tcp", 22, "out")
    assert (ssh["l7"], ssh["ssh_banner"]) == ("ssh", "SSH-2.0-OpenSSH_9.2p1 Debian-2")

    get = classify(b"GET /x?y=1 HTTP/1.1\r\nUser-Agent: t\r\nhOsT:  WWW.Example.org \r\n\r\n", "tcp", 80, "out")
    assert (get["l7"], get["http_request"], get["http_host"]) == ("http", "GET /x?y=1 HTTP/1.1", "www.example.org")
    # a Host line cut by the capture is not trusted; a request line cut by it is
    cut = classify(b"POST /upload HTTP/1.1\r\nHost: www.exa", "tcp", 80, "out")
    assert cut["http_request"] == "POST /upload HTTP/1.1" and "http_host" not in cut
    assert classify(b"GET /" + b"a" * 300, "tcp", 80, "out")["l7"] == "http"
    assert classify(b"GET is not a request\r\n", "tcp", 80, "out")["l7"] == "unknown"
    resp = classify(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n", "tcp", 80, "in")
    assert (resp["l7"], resp["http_response"]) == ("http", "HTTP/1.0 200 OK")

    sub = classify(SUBSCRIBE, "tcp", 3333, "out")
    assert (sub["l7"], sub["stratum_method"], sub["stratum_agent"]) == ("stratum", "mining.subscribe", "cpuminer/2.5")
    login = classify(XMRIG_LOGIN, "tcp", 3333, "out")
    assert (login["l7"], login["stratum_method"], login["stratum_agent"]) == ("stratum", "login", "XMRig/6.21.0")
    assert classify(XMRIG_LOGIN[:70], "tcp", 3333, "out")["stratum_method"] == "login"  # cut JSON
    for line, method in (
        (b'{"params":["w.1","x"],"id":2,"method":"mining.authorize"}\n', "mining.authorize"),
        (b'{"params":["w.1","bf","00","5e","b2"],"id":4,"method":"mining.submit"}\n', "mining.submit"),
        (b'{"id":2,"jsonrpc":"2.0","method":"submit","params":{"id":"1","job_id":"7","nonce":"a",'
         b'"result":"b"}}\n', "submit"),
        (b'{"jsonrpc":"2.0","method":"job","params":{"blob":"07","job_id":"8","target":"ff"}}\n', "job"),
    ):
        assert classify(line, "tcp", 3333, "in")["stratum_method"] == method, line
    for reply in (POOL_REPLY, XMRIG_REPLY):
        assert classify(reply, "tcp", 3333, "in")["l7"] == "stratum"
    # JSON-RPC that is not mining
    assert classify(b'{"jsonrpc":"2.0","method":"login","params":{"user":"a"}}\n', "tcp", 80, "out")["l7"] == "unknown"


def test_dns_questions_and_answers() -> None:
    q = classify(dns_query("Pool.Example.NET", "AAAA"), "udp", 53, "out")
    assert (q["l7"], q["dns_names"], q["dns_qtype"]) == ("dns", ["pool.example.net"], "AAAA")
    assert "dns_answers" not in q
    a = classify(dns_answer("pool.example.net"), "udp", 53, "in")  # with compressed names
    assert (a["l7"], a["dns_names"], a["dns_answers"]) == ("dns", ["pool.example.net"],
                                                           ["203.0.113.10", "2001:db8::10"])
    query = dns_query("pool.example.net", "TXT")
    tcp = classify(len(query).to_bytes(2, "big") + query, "tcp", 53, "out")
    assert (tcp["l7"], tcp["dns_qtype"]) == ("dns", "TXT")
    # a sandbox serving DNS: the local port is 53
    assert classify(query, "udp", 40000, "in", sport=53)["l7"] == "dns"
    assert classify(query, "udp", 40000, "in")["l7"] == "unknown"
    assert classify(b"\x00" * 40, "udp", 53, "out")["l7"] == "unknown"  # no question: not DNS
    # a pointer loop ends the name, not the program
    loop = bytes.fromhex("1234 0100 0001 0000 0000 0000") + b"\xc0\x0c\x00\x01\x00\x01"
    assert classify(loop, "udp", 53, "out")["l7"] == "unknown"


def test_payload_text() -> None:
    assert payload_text(b"ab\\c\r\n\x00\xff") == "ab\\x5cc\\x0d\\x0a\\x00\\xff"
    assert len(payload_text(bytes(range(256)) * 2)) <= 256
    assert payload_text(b"\x01" * 100) == "\\x01" * 64
    assert payload_text(b"x" * 1000) == "x" * 256


def test_classify_never_raises_on_garbage() -> None:
    rng = random.Random(7)
    samples = [client_hello("pool.example.net")[:256], dns_answer("pool.example.net"), dns_query("a.example"),
               SUBSCRIBE, XMRIG_LOGIN, POOL_REPLY, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"SSH-2.0-x\r\n"]
    inputs: list[bytes] = [s[:n] for s in samples for n in range(len(s) + 1)]  # every truncation
    for _ in range(1500):
        s = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 8)):  # a few flipped bytes
            s[rng.randrange(len(s))] = rng.randrange(256)
        inputs.append(bytes(s))
        inputs.append(rng.randbytes(rng.randint(0, 300)))
        inputs.append(bytes([rng.choice([0x16, 0x7B, 0xC0, 0x00, 0x03])]) + rng.randbytes(rng.randint(0, 80)))
    for data in inputs:
        for proto, port in (("udp", 53), ("tcp", 53), ("tcp", 443)):
            fields = classify(data, proto, port, "in")
            assert fields["l7"] in L7_KINDS
            assert len(fields["payload"]) <= 256


# -- records, events and the joiner (no kernel) --------------------------------

def _record(**kw: Any) -> FlowRecord:
    base: dict[str, Any] = dict(ts_ns=5, cgroup_id=77, cookie=9, direction="out", proto="tcp", family="inet",
                                local_addr="192.0.2.2", local_port=40000, remote_addr="198.51.100.10",
                                remote_port=443, payload_len=517, uid=0, payload=client_hello("pool.example.net"))
    base.update(kw)
    return FlowRecord(**base)


def _net_event(kind: str, *, cgroup_id: int = 77, pid: int = 4242, addr: str = "198.51.100.10", port: int = 443,
               local_port: int = 40000, result: int = 0) -> ev.NetEvent:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    raw = socket.inet_pton(family, addr).ljust(16, b"\0")
    e = ev.NetEvent.from_tuple((1, cgroup_id, ev.KIND_IDS[kind], pid, pid, 1, 1000, 3, 4, b"curl", result, 5,
                                family, port, 1, 6, raw, local_port, b""))
    assert isinstance(e, ev.NetEvent)
    return e


def test_decode_record_matches_the_c_layout() -> None:
    fixed = flows._RECORD.pack(1, 2, 3, 300, 1000, 4, socket.AF_INET6, 5353, 53, 2, socket.IPPROTO_UDP, b"",
                               socket.inet_pton(socket.AF_INET6, "2001:db8:1::2"),
                               socket.inet_pton(socket.AF_INET6, "2001:db8::10"))
    record = flows.decode_record(fixed + b"abcd" + bytes(252))
    assert record == FlowRecord(1, 2, 3, "in", "udp", "inet6", "2001:db8:1::2", 5353, "2001:db8::10", 53, 300,
                                1000, b"abcd")
    assert flows.decode_record(fixed) is None  # too short


@needs_object
def test_record_layout_matches_btf() -> None:
    obj = BpfObject(str(flows.object_path()))
    try:
        assert flows.layout_mismatches(obj) == []
    finally:
        obj.close()


def test_to_event_fields_and_scope() -> None:
    record = _record()
    event = to_event(record, scopes={77: (3, 4)})
    assert event.kind == "flow" and event.ts_ns == 5 and event.cgroup_id == 77
    assert (event.sandbox_id, event.step_id, event.pid) == (3, 4, 0)
    assert event.data == {"l7": "tls", "sni": "pool.example.net", "payload": event.data["payload"],
                          "direction": "out", "dip": "198.51.100.10", "dport": 443, "sport": 40000,
                          "proto": "tcp", "family": "inet"}
    joined = to_event(record, {"l7": "unknown", "payload": ""}, source=_net_event("connect"))
    assert (joined.pid, joined.comm, joined.sandbox_id, joined.step_id) == (4242, "curl", 3, 4)
    assert joined.data["l7"] == "unknown"


def test_joiner_finds_the_process_behind_a_flow() -> None:
    joiner = FlowJoiner(max_entries=3)
    connect = _net_event("connect", pid=10)
    joiner.observe(connect)
    joiner.observe(_net_event("connect", pid=11, result=-111))  # refused: ignored
    assert joiner.match(_record()) is connect
    assert joiner.match(_record(cgroup_id=78)) is None  # same ports, another sandbox
    # accept: the local port is the server's, the remote end the peer
    accept = _net_event("accept", pid=12, addr="2001:db8::10", port=51000, local_port=8080)
    joiner.observe(accept)
    assert joiner.match(_record(direction="in", family="inet6", local_port=8080, remote_addr="2001:db8::10",
                                remote_port=51000)) is accept
    # the first sendto() of an unbound UDP socket has no local port yet
    send = _net_event("send", pid=13, port=53, local_port=0)
    joiner.observe(send)
    assert joiner.match(_record(proto="udp", local_port=43210, remote_port=53)) is send
    # a connect to ::ffff:a.b.c.d shows up as IPv4 packets
    mapped = _net_event("connect", pid=14, addr="::ffff:198.51.100.11", port=22, local_port=41000)
    joiner.observe(mapped)
    assert joiner.match(_record(remote_addr="198.51.100.11", remote_port=22, local_port=41000)) is mapped
    assert len(joiner) == 3  # bounded: the oldest (connect) went first
    assert joiner.match(_record()) is None
    joiner.forget_cgroup(77)
    assert len(joiner) == 0


# -- on the kernel -----------------------------------------------------------

# The lab's servers: TLS (reads the hello, answers nothing), a stratum pool, TCP
# and UDP echo, and DNS answering A 203.0.113.10 / AAAA 2001:db8::10.
SERVERS_PY = "POOL = " + repr({b'"mining.subscribe"': POOL_REPLY, b'"login"': XMRIG_REPLY}) + r"""
import socket, sys, threading
from dnslib import AAAA, QTYPE, RR, A, DNSRecord

def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET

def tcp(addr, port, handle):
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    def serve(c):
        with c:
            try:
                handle(c)
            except OSError:
                pass
    def loop():
        while True:
            threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

def udp(addr, port, handle):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))
    def loop():
        while True:
            data, peer = s.recvfrom(4096)
            try:
                s.sendto(handle(data), peer)
            except Exception:
                pass
    threading.Thread(target=loop, daemon=True).start()

def tls(c):
    c.recv(4096)

def echo(c):
    while data := c.recv(4096):
        c.sendall(data)

def pool(c):
    for line in c.makefile("rb"):
        c.sendall(next((r for m, r in POOL.items() if m in line), b'{"id":1,"result":true}\n'))

def dns(data):
    q = DNSRecord.parse(data)
    a = q.reply()
    for question in q.questions:
        if question.qtype == QTYPE.A:
            a.add_answer(RR(question.qname, QTYPE.A, rdata=A("203.0.113.10"), ttl=60))
        elif question.qtype == QTYPE.AAAA:
            a.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA("2001:db8::10"), ttl=60))
    return a.pack()

for addr in ("198.51.100.10", "2001:db8::10"):
    tcp(addr, 443, tls)
    tcp(addr, 3333, pool)
    tcp(addr, 7000, echo)
    udp(addr, 53, dns)
for addr in ("198.51.100.10", "198.51.100.11"):
    udp(addr, 7001, lambda data: data)
print("ready", flush=True)
threading.Event().wait()
"""

# One TCP exchange: send argv[3], read a reply.  Used as a marker: once its
# flow is read, every flow before it has been read too (the ring keeps order).
MARKER_PY = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(sys.argv[3].encode())
    s.recv(100)
"""

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def sniffer() -> Iterator[FlowSniffer]:
    with FlowSniffer() as s:
        yield s


@pytest.fixture(scope="module")
def lab() -> Iterator[TestNet]:
    with TestNet() as net:
        proc = net.start_server(net.server, [sys.executable, "-c", SERVERS_PY])
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield net


@pytest.fixture
def cgroup(sniffer: FlowSniffer) -> Iterator[ScratchCgroup]:
    cg = ScratchCgroup(f"test-flows-{os.getpid()}-{next(_ids)}")
    sniffer.read()  # start from an empty ring
    yield cg
    cg.remove()


def procs(cg: ScratchCgroup) -> list[str]:
    return [str(cg.path / "cgroup.procs")]


def collect(sniffer: FlowSniffer, until: Callable[[list[FlowRecord]], bool], cgroup_id: int | None = None,
            timeout: float = 10.0) -> list[FlowRecord]:
    """Records (of one cgroup) until ``until`` holds or ``timeout`` seconds pass."""
    got: list[FlowRecord] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        got += [r for r in sniffer.read(timeout=0.1) if cgroup_id is None or r.cgroup_id == cgroup_id]
    return got


def classified(records: list[FlowRecord]) -> list[tuple[FlowRecord, dict[str, Any]]]:
    return [(r, classify(r.payload, r.proto, r.remote_port, r.direction, sport=r.local_port)) for r in records]


def marker(lab: TestNet, cg: ScratchCgroup | None, text: str) -> None:
    res = lab.run_in(lab.client, [sys.executable, "-c", MARKER_PY, "198.51.100.10", "7000", text],
                     procs(cg) if cg else ())
    assert res.returncode == 0, res.stderr


def has_marker(text: str) -> Callable[[list[FlowRecord]], bool]:
    return lambda rs: any(r.payload == text.encode() and r.direction == "in" for r in rs)


@needs_kernel
@needs_object
class TestOnTheKernel:
    def test_ssh_banners_both_ways(self, sniffer: FlowSniffer, lab: TestNet, cgroup: ScratchCgroup,
                                   tmp_path: Path) -> None:
        if not (Path("/usr/sbin/sshd").exists() and shutil.which("ssh") and shutil.which("ssh-keygen")):
            pytest.skip("needs openssh-server and openssh-client")
        key = tmp_path / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        config = tmp_path / "sshd_config"
        config.write_text(f"ListenAddress 198.51.100.10:2222\nHostKey {key}\nPidFile none\nUsePAM no\n"
                          "PubkeyAuthentication no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                          "AuthorizedKeysFile none\n")
        # sshd insists on /run/sshd; `ip netns exec` gives it a mount namespace of
        # its own, where a tmpfs on /run hides nothing from the host.
        sshd = lab.start_server(lab.server, ["sh", "-c", "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && "
                                             f"exec /usr/sbin/sshd -D -e -f {config}"])
        for _ in range(100):  # until it listens (the probe runs outside the corral tree)
            if lab.attempt("tcp", "198.51.100.10", 2222) == "OK":
                break
            time.sleep(0.1)
        lab.run_in(lab.client, ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-p", "2222",
                                "nobody@198.51.100.10", "true"], procs(cgroup))
        got = classified(collect(sniffer, lambda rs: {r.direction for r in rs} == {"out", "in"}, cgroup.id))
        # sshd's per-connection child must be gone before sshd is killed: an
        # orphan would be left to an init that may not reap it.
        children = Path(f"/proc/{sshd.pid}/task/{sshd.pid}/children")
        for _ in range(100):
            if not children.exists() or not children.read_text().strip():
                break
            time.sleep(0.1)
        banners = {r.direction: f for r, f in got if f["l7"] == "ssh"}
        assert set(banners) == {"out", "in"}, got
        assert banners["out"]["ssh_banner"].startswith("SSH-2.0-OpenSSH")
        assert banners["in"]["ssh_banner"].startswith("SSH-2.0-OpenSSH")
        out = next(r for r, f in got if f["l7"] == "ssh" and r.direction == "out")
        assert (out.remote_addr, out.remote_port, out.proto, out.family) == ("198.51.100.10", 2222, "tcp", "inet")
        assert out.local_addr == "192.0.2.2"

    def test_tls_sni(self, sniffer: FlowSniffer, lab: TestNet, cgroup: ScratchCgroup) -> None:
        code = ("import socket, ssl\nctx = ssl.create_default_context()\nctx.check_hostname = False\n"
                "ctx.verify_mode = ssl.CERT_NONE\ns = socket.create_connection(('198.51.100.10', 443), timeout=5)\n"
                "try:\n    ctx.wrap_socket(s, server_hostname='pool.example.net')\n"
                "except (ssl.SSLError, OSError):\n    pass\n")
        lab.run_in(lab.client, [sys.executable, "-c", code], procs(cgroup))
        got = classified(collect(sniffer, lambda rs: bool(rs), cgroup.id))
        assert [(r.direction, r.remote_port, f["l7"], f.get("sni")) for r, f in got] == [
            ("out", 443, "tls", "pool.example.net")]
        assert got[0][0].payload_len > len(got[0][0].payload) == flows.PAYLOAD_MAX  # a hello is longer

    def test_http_request_and_response(self, sniffer: FlowSniffer, lab: TestNet, cgroup: ScratchCgroup,
                                       tmp_path: Path) -> None:
        if shutil.which("curl") is None:
            pytest.skip("needs curl")
        (tmp_path / "index.html").write_text("hello\n")
        web = lab.start_server(lab.server, [sys.executable, "-u", "-m", "http.server", "--bind", "198.51.100.10",
                                            "--directory", str(tmp_path), "8080"])
        assert web.stdout is not None and web.stdout.readline().startswith("Serving HTTP")
        res = lab.run_in(lab.client, ["curl", "-sS", "-m", "5", "--noproxy", "*", "-H", "Host: www.example.org",
                                      "http://198.51.100.10:8080/index.html"], procs(cgroup))
        assert res.stdout == "hello\n", res.stderr
        got = classified(collect(sniffer, lambda rs: len(rs) >= 2, cgroup.id))
        fields = {r.direction: f for r, f in got}
        assert fields["out"]["l7"] == "http"
        assert fields["out"]["http_request"] == "GET /index.html HTTP/1.1"
        assert fields["out"]["http_host"] == "www.example.org"
        assert fields["in"]["l7"] == "http" and fields["in"]["http_response"].startswith("HTTP/1.0 200")

    def test_stratum_over_ipv4_and_ipv6(self, sniffer: FlowSniffer, lab: TestNet, cgroup: ScratchCgroup) -> None:
        code = ("import socket, sys\n"
                f"for host, line in (('198.51.100.10', {SUBSCRIBE!r}), ('2001:db8::10', {XMRIG_LOGIN!r})):\n"
                "    with socket.create_connection((host, 3333), timeout=5) as s:\n"
                "        s.sendall(line)\n        s.makefile('rb').readline()\n")
        res = lab.run_in(lab.client, [sys.executable, "-c", code], procs(cgroup))
        assert res.returncode == 0, res.stderr
        got = classified(collect(sniffer, lambda rs: len(rs) >= 4, cgroup.id))
        seen = sorted((r.family, r.direction, f["l7"], f.get("stratum_method"), f.get("stratum_agent"))
                      for r, f in got)
        assert seen == [("inet", "in", "stratum", None, None),
                        ("inet", "out", "stratum", "mining.subscribe", "cpuminer/2.5"),
                        ("inet6", "in", "stratum", None, None),
                        ("inet6", "out", "stratum", "login", "XMRig/6.21.0")]
        v6 = next(r for r, _ in got if r.family == "inet6" and r.direction == "out")
        assert (v6.remote_addr, v6.remote_port, v6.local_addr) == ("2001:db8::10", 3333, "2001:db8:1::2")

    def test_dns_question_and_answer(self, sniffer: FlowSniffer, lab: TestNet, cgroup: ScratchCgroup) -> None:
        code = ("from dnslib import DNSRecord\n"
                "for server, qtype in (('198.51.100.10', 'A'), ('2001:db8::10', 'AAAA')):\n"
                "    DNSRecord.question('pool.example.net', qtype).send(server, 53, timeout=5, ipv6=':' in server)\n")
        res = lab.run_in(lab.client, [sys.executable, "-c", code], procs(cgroup))
        assert res.returncode == 0, res.stderr
        got = classified(collect(sniffer, lambda rs: len(rs) >= 4, cgroup.id))
        seen = sorted((r.remote_addr, r.direction, r.proto, f["l7"], f["dns_qtype"], tuple(f.get("dns_answers", ())))
                      for r, f in got)
        assert seen == [("198.51.100.10", "in", "udp", "dns", "A", ("203.0.113.10",)),
                        ("198.51.100.10", "out", "udp", "dns", "A", ()),
                        ("2001:db8::10", "in", "udp", "dns", "AAAA", ("2001:db8::10",)),
                        ("2001:db8::10", "out", "udp", "dns", "AAAA", ())]
        assert all(f["dns_names"] == ["pool.example.net"] for _, f in got)
        assert all(r.remote_port == 53 for r, _ in got)

    def test_each_flow_is_reported_once_per_direction(self, sniffer: FlowSniffer, lab: TestNet,
                                                      cgroup: ScratchCgroup) -> None:
        code = ("import socket\n"
                "with socket.create_connection(('198.51.100.10', 7000), timeout=5) as s:\n"
                "    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
                "    for i in range(20):\n"
                "        msg = b'ping %02d' % i\n        s.sendall(msg)\n        got = b''\n"
                "        while len(got) < len(msg):\n            got += s.recv(64)\n"
                "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.settimeout(5)\n"
                "for host in ('198.51.100.10', '198.51.100.11'):\n"
                "    for i in range(10):\n        u.sendto(b'dgram %d' % i, (host, 7001))\n        u.recvfrom(64)\n")
        res = lab.run_in(lab.client, [sys.executable, "-c", code], procs(cgroup))
        assert res.returncode == 0, res.stderr
        token = f"marker-{secrets.token_hex(4)}"
        marker(lab, cgroup, token)
        got = collect(sniffer, has_marker(token), cgroup.id)
        assert has_marker(token)(got)
        tcp = next(r for r in got if r.payload == b"ping 00")
        assert sorted((r.direction, r.payload) for r in got if r.cookie == tcp.cookie) == [
            ("in", b"ping 00"), ("out", b"ping 00")]
        udp = [r for r in got if r.proto == "udp"]
        assert len({r.cookie for r in udp}) == 1  # one socket, one report per remote and direction
        assert sorted((r.remote_addr, r.direction, r.payload) for r in udp) == [
            ("198.51.100.10", "in", b"dgram 0"), ("198.51.100.10", "out", b"dgram 0"),
            ("198.51.100.11", "in", b"dgram 0"), ("198.51.100.11", "out", b"dgram 0")]

    def test_udp_remotes_are_capped_per_socket(self, sniffer: FlowSniffer, lab: TestNet,
                                               cgroup: ScratchCgroup) -> None:
        before = sniffer.capped
        code = ("import socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "for port in range(20000, 20100):\n    u.sendto(b'x', ('198.51.100.10', port))\n")
        res = lab.run_in(lab.client, [sys.executable, "-c", code], procs(cgroup))
        assert res.returncode == 0, res.stderr
        token = f"marker-{secrets.token_hex(4)}"
        marker(lab, cgroup, token)
        got = collect(sniffer, has_marker(token), cgroup.id)
        sprayed = [r for r in got if r.proto == "udp"]
        assert len(sprayed) == 64 and len({r.remote_port for r in sprayed}) == 64
        assert sniffer.capped - before >= 36

    def test_sockets_outside_the_corral_tree_are_not_seen(self, sniffer: FlowSniffer, lab: TestNet,
                                                          cgroup: ScratchCgroup) -> None:
        ours = cgroup_of_pid(os.getpid())
        assert not ours.is_relative_to(cgroup2_root() / "corral"), "the test itself must run outside the tree"
        outside, inside = f"outside-{secrets.token_hex(4)}", f"inside-{secrets.token_hex(4)}"
        marker(lab, None, outside)  # in the test's own cgroup
        marker(lab, cgroup, inside)
        got = collect(sniffer, has_marker(inside))  # every cgroup's records
        assert has_marker(inside)(got)
        assert not [r for r in got if outside.encode() in r.payload]
        assert {r.cgroup_id for r in got if inside.encode() in r.payload} == {cgroup.id}
        assert sniffer.dropped == 0 and sniffer.bad_records == 0

    def test_flows_join_the_sensors_connect_and_send(self, sniffer: FlowSniffer, lab: TestNet,
                                                     cgroup: ScratchCgroup, monitor: Monitor) -> None:
        monitor.read()
        monitor.watch_cgroup(cgroup.id, sandbox_id=51, step_id=2)
        try:
            code = ("import os, socket\nfrom dnslib import DNSRecord\nprint(os.getpid(), flush=True)\n"
                    "with socket.create_connection(('198.51.100.10', 3333), timeout=5) as s:\n"
                    f"    s.sendall({SUBSCRIBE!r})\n    s.makefile('rb').readline()\n"
                    "DNSRecord.question('pool.example.net').send('198.51.100.10', 53, timeout=5)\n")
            res = lab.run_in(lab.client, [sys.executable, "-c", code], procs(cgroup))
            assert res.returncode == 0, res.stderr
            pid = int(res.stdout.split()[0])
            # flows first, then the sensor: what opened a flow was recorded before it
            records = collect(sniffer, lambda rs: len(rs) >= 4, cgroup.id)
            events: list[ev.Event] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not {"connect", "send"} <= {e.kind for e in events}:
                events += [e for e in monitor.read(timeout=0.1) if e.cgroup_id == cgroup.id]
        finally:
            monitor.unwatch_cgroup(cgroup.id)
        joiner = FlowJoiner()
        for event in events:
            joiner.observe(event)
        made = []
        for record in records:
            source = joiner.match(record)
            assert source is not None and source.pid == pid, (record, source)
            made.append(to_event(record, scopes={cgroup.id: (51, 2)}, source=source))
        assert sorted((e.data["l7"], e.data["direction"]) for e in made) == [
            ("dns", "in"), ("dns", "out"), ("stratum", "in"), ("stratum", "out")]
        assert all((e.pid, e.sandbox_id, e.step_id) == (pid, 51, 2) for e in made)
        assert {e.proc is not None for e in made} == {True}  # the process table knew it
