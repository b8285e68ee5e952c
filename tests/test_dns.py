"""The sandbox DNS resolver, over real sockets on loopback.

Everything here talks only to random 127.x.y.z addresses: a fake upstream
server started by the test answers with documentation-range addresses, and the
resolver under test forwards to it, never to a real DNS server.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, A, DNSLabel, DNSQuestion, DNSRecord

from corral.errors import CorralError
from corral.sandbox.dns import Question, Resolver, resolv_conf_text, system_upstream

BIG = [f"192.0.2.{i}" for i in range(1, 41)]  # 40 A records: more than 512 bytes

ZONE: dict[tuple[str, str], list[RR]] = {
    ("pypi.org", "A"): [RR("pypi.org", QTYPE.A, rdata=A("203.0.113.10"), ttl=60)],
    ("files.pythonhosted.org", "A"): [
        RR("files.pythonhosted.org", QTYPE.CNAME, rdata=CNAME("cdn.example.net"), ttl=300),
        RR("cdn.example.net", QTYPE.A, rdata=A("198.51.100.20"), ttl=30),
        # not on the chain: must not be admitted
        RR("other.example.net", QTYPE.A, rdata=A("198.51.100.99"), ttl=30),
    ],
    ("v6.example.com", "AAAA"): [RR("v6.example.com", QTYPE.AAAA, rdata=AAAA("2001:db8::5"), ttl=7200)],
    ("short.example.com", "A"): [RR("short.example.com", QTYPE.A, rdata=A("192.0.2.7"), ttl=0)],
    ("api.example.com", "A"): [RR("api.example.com", QTYPE.A, rdata=A("192.0.2.8"), ttl=60)],
    ("example.com", "A"): [RR("example.com", QTYPE.A, rdata=A("192.0.2.9"), ttl=60)],
    ("big.example.com", "A"): [RR("big.example.com", QTYPE.A, rdata=A(ip), ttl=60) for ip in BIG],
}


def loopback() -> tuple[str, int]:
    """A random loopback address and port: tests running at once on this host do not collide."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}", random.randint(
        20000, 60000
    )


class FakeUpstream:
    """A tiny authoritative-looking server for ZONE on loopback that counts the queries it gets."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.count = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((loopback()[0], 0))
        self.sock.settimeout(0.05)
        self.addr: tuple[str, int] = self.sock.getsockname()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.count += 1
            if self.silent:
                continue
            request = DNSRecord.parse(data)
            reply = request.reply(aa=0)
            key = (str(request.q.qname).rstrip(".").lower(), QTYPE[request.q.qtype])
            if key in ZONE:
                reply.add_answer(*ZONE[key])
            else:
                reply.header.rcode = RCODE.NXDOMAIN
            self.sock.sendto(reply.pack(), peer)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


class Recorder:
    def __init__(self) -> None:
        self.questions: list[Question] = []
        self.admits: list[tuple[int, str, int]] = []

    def on_question(self, q: Question) -> None:
        self.questions.append(q)

    def on_admit(self, sandbox_id: int, address: str, ttl: int) -> None:
        self.admits.append((sandbox_id, address, ttl))


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream()
    yield up
    up.close()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def make(rec: Recorder) -> Iterator[Callable[..., Resolver]]:
    made: list[Resolver] = []

    def make(upstream: tuple[str, int], **kw: float) -> Resolver:
        r = Resolver(upstream, rec.on_question, rec.on_admit, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
    assert no_dns_thread()


def ask(addr: tuple[str, int], name: str, qtype: str = "A", tcp: bool = False, timeout: float = 2.0) -> DNSRecord:
    return DNSRecord.parse(DNSRecord.question(name, qtype).send(addr[0], addr[1], tcp=tcp, timeout=timeout))


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]


def no_dns_thread() -> bool:
    return not any(t.name == "corral-dns" and t.is_alive() for t in threading.enumerate())


def test_allowed_name_resolves_and_is_admitted(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr)
    listen = loopback()
    r.serve(7, listen, ["pypi.org"])
    reply = ask(listen, "PyPI.Org.")  # case and trailing dot do not matter
    assert reply.header.rcode == RCODE.NOERROR
    assert addresses(reply) == ["203.0.113.10"]
    assert rec.admits == [(7, "203.0.113.10", 60)]
    [q] = rec.questions
    assert (q.sandbox_id, q.name, q.qtype, q.allowed, q.answers, q.ttl, q.rcode) == (
        7, "pypi.org", "A", True, ("203.0.113.10",), 60, "NOERROR",
    )
    assert q.client.startswith("127.") and not q.rate_limited
    assert abs(q.time_ns - time.time_ns()) < 5e9
    assert upstream.count == 1


def test_cname_chain_admits_only_the_final_address(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr)
    listen = loopback()
    r.serve(1, listen, ["files.pythonhosted.org"])
    reply = ask(listen, "files.pythonhosted.org")
    assert any(rr.rtype == QTYPE.CNAME for rr in reply.rr)
    assert rec.admits == [(1, "198.51.100.20", 30)]
    assert rec.questions[0].answers == ("198.51.100.20",)


def test_ttls_are_clamped_and_aaaa_admitted(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr)
    listen = loopback()
    r.serve(1, listen, ["*.example.com"])
    reply = ask(listen, "v6.example.com", "AAAA")
    assert addresses(reply) == ["2001:db8::5"]
    assert reply.rr[0].ttl == 3600  # the client may not cache it longer than it is admitted
    ask(listen, "short.example.com")
    assert rec.admits == [(1, "2001:db8::5", 3600), (1, "192.0.2.7", 5)]


def test_wildcard_matches_subdomains_not_the_parent(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr)
    wild, both = loopback(), loopback()
    r.serve(1, wild, ["*.example.com"])
    r.serve(2, both, ["*.example.com", "example.com"])
    assert addresses(ask(wild, "api.example.com")) == ["192.0.2.8"]
    assert ask(wild, "deep.api.example.com").header.rcode == RCODE.NXDOMAIN  # forwarded; upstream says no
    assert upstream.count == 2
    assert ask(wild, "example.com").header.rcode == RCODE.REFUSED
    assert ask(wild, "notexample.com").header.rcode == RCODE.REFUSED
    assert upstream.count == 2
    assert addresses(ask(both, "example.com")) == ["192.0.2.9"]
    assert [q.allowed for q in rec.questions] == [True, True, False, False, True]


def test_denied_names_are_refused_without_forwarding(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr)
    listen = loopback()
    r.serve(3, listen, ["pypi.org"])
    for name in ("evil.com", "evilpypi.org", "pypi.org.evil.com", "www.pypi.org"):
        reply = ask(listen, name)
        assert reply.header.rcode == RCODE.REFUSED, name
        assert reply.q.qname == DNSLabel(name)  # the question is echoed, as stub resolvers require
    # a single label "pypi.org" is not the name pypi.org, though it prints the same
    crafted = DNSRecord(q=DNSQuestion(DNSLabel([b"pypi.org"]), QTYPE.A))
    assert DNSRecord.parse(crafted.send(*listen, timeout=2)).header.rcode == RCODE.REFUSED
    # a TXT question for an allowed name is forwarded (policy is about names, not types);
    # the fake upstream has no TXT record, and its NXDOMAIN is passed on
    assert ask(listen, "pypi.org", "TXT").header.rcode == RCODE.NXDOMAIN
    assert upstream.count == 1
    assert rec.admits == []
    assert [(q.name, q.allowed, q.rcode) for q in rec.questions] == [
        ("evil.com", False, "REFUSED"), ("evilpypi.org", False, "REFUSED"),
        ("pypi.org.evil.com", False, "REFUSED"), ("www.pypi.org", False, "REFUSED"),
        ("pypi\\.org", False, "REFUSED"), ("pypi.org", True, "NXDOMAIN"),
    ]
    assert all(q.sandbox_id == 3 for q in rec.questions)


def test_upstream_refusing_gives_servfail(make, rec: Recorder) -> None:
    # nothing listens there: ICMP port unreachable, so the retry and the SERVFAIL come at once
    r = make(loopback())
    listen = loopback()
    r.serve(1, listen, ["pypi.org"])
    started = time.monotonic()
    assert ask(listen, "pypi.org").header.rcode == RCODE.SERVFAIL
    assert time.monotonic() - started < 1.5
    [q] = rec.questions
    assert (q.allowed, q.rcode, q.answers) == (True, "SERVFAIL", ())
    assert rec.admits == []


def test_silent_upstream_is_retried_then_servfail(make, rec: Recorder) -> None:
    silent = FakeUpstream(silent=True)
    try:
        r = make(silent.addr, timeout=0.2)
        listen = loopback()
        r.serve(1, listen, ["pypi.org"])
        started = time.monotonic()
        assert ask(listen, "pypi.org").header.rcode == RCODE.SERVFAIL
        assert 0.35 < time.monotonic() - started < 1.5
        assert silent.count == 2  # the first try and one retry
        assert rec.questions[0].rcode == "SERVFAIL"
    finally:
        silent.close()


def test_two_sandboxes_keep_their_own_policy(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr)
    one, two = loopback(), loopback()
    r.serve(1, one, ["pypi.org"])
    r.serve(2, two, ["*.example.com"])
    assert addresses(ask(one, "pypi.org")) == ["203.0.113.10"]
    assert ask(two, "pypi.org").header.rcode == RCODE.REFUSED
    assert addresses(ask(two, "api.example.com")) == ["192.0.2.8"]
    assert ask(one, "api.example.com").header.rcode == RCODE.REFUSED
    assert rec.admits == [(1, "203.0.113.10", 60), (2, "192.0.2.8", 60)]
    assert [(q.sandbox_id, q.allowed) for q in rec.questions] == [(1, True), (2, False), (2, True), (1, False)]


def test_rate_limit_refuses_the_excess(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr, rate_limit=10)
    listen, other = loopback(), loopback()
    r.serve(1, listen, ["pypi.org"])
    r.serve(2, other, ["pypi.org"])
    codes = [ask(listen, "pypi.org").header.rcode for _ in range(30)]
    answered = codes.count(RCODE.NOERROR)
    assert 10 <= answered <= 13  # a burst of 10, plus what refills while we ask
    assert codes[:10] == [RCODE.NOERROR] * 10
    assert upstream.count == answered  # refused questions never reached the upstream
    limited = [q for q in rec.questions if q.rate_limited]
    assert len(limited) == 30 - answered
    assert all(q.rcode == "REFUSED" and q.allowed and q.name == "pypi.org" for q in limited)
    # the limit is per sandbox
    assert ask(other, "pypi.org").header.rcode == RCODE.NOERROR


def test_tcp_and_truncation(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr)
    listen = loopback()
    r.serve(1, listen, ["*.example.com", "pypi.org"])
    udp = ask(listen, "big.example.com")  # no EDNS: 512 bytes at most over UDP
    assert udp.header.tc and udp.rr == [] and udp.q.qname == DNSLabel("big.example.com")
    edns = DNSRecord.question("big.example.com")
    edns.add_ar(EDNS0(udp_len=1232))  # a client that takes bigger UDP answers gets it whole
    whole = DNSRecord.parse(edns.send(*listen, timeout=2))
    assert not whole.header.tc and len(addresses(whole)) == 40
    assert [rr.rtype for rr in whole.ar] == [QTYPE.OPT]
    tcp = ask(listen, "big.example.com", tcp=True)
    assert not tcp.header.tc and sorted(addresses(tcp)) == sorted(BIG)
    assert addresses(ask(listen, "pypi.org", tcp=True)) == ["203.0.113.10"]
    assert ask(listen, "evil.com", tcp=True).header.rcode == RCODE.REFUSED
    # two questions pipelined on one connection, answered in any order
    with socket.create_connection(listen, timeout=2) as s:
        wires = [DNSRecord.question(n).pack() for n in ("pypi.org", "api.example.com")]
        s.sendall(b"".join(len(w).to_bytes(2, "big") + w for w in wires))
        got = set()
        buf = b""
        while len(got) < 2:
            buf += s.recv(4096)
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                n = int.from_bytes(buf[:2], "big")
                got.update(addresses(DNSRecord.parse(buf[2 : 2 + n])))
                buf = buf[2 + n :]
        assert got == {"203.0.113.10", "192.0.2.8"}


def test_garbage_is_reported_and_harmless(upstream: FakeUpstream, make, rec: Recorder) -> None:
    r = make(upstream.addr)
    listen = loopback()
    r.serve(4, listen, ["pypi.org"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x12\x34not dns at all", listen)
    assert addresses(ask(listen, "pypi.org")) == ["203.0.113.10"]  # still serving
    assert (rec.questions[0].rcode, rec.questions[0].allowed, rec.questions[0].sandbox_id) == ("FORMERR", False, 4)


def test_failing_admission_gives_servfail(upstream: FakeUpstream, rec: Recorder) -> None:
    def broken(_sandbox: int, _address: str, _ttl: int) -> None:
        raise OSError("allow map full")

    with Resolver(upstream.addr, rec.on_question, broken) as r:
        listen = loopback()
        r.serve(1, listen, ["pypi.org"])
        assert ask(listen, "pypi.org").header.rcode == RCODE.SERVFAIL
        assert rec.questions[0].rcode == "SERVFAIL" and rec.questions[0].answers == ()


def test_stop_serving_and_close_free_everything(upstream: FakeUpstream, rec: Recorder) -> None:
    listen = loopback()
    r = Resolver(upstream.addr, rec.on_question, rec.on_admit)
    r.serve(1, listen, ["pypi.org"])
    with pytest.raises(CorralError, match="sandbox 1 already"):
        r.serve(1, loopback(), ["pypi.org"])
    r.stop_serving(1)
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(listen)  # free again
    with pytest.raises(TimeoutError):
        ask(listen, "pypi.org", timeout=0.3)
    r.serve(1, listen, ["pypi.org"])  # the same id and address can be served again
    assert addresses(ask(listen, "pypi.org")) == ["203.0.113.10"]
    r.close()
    r.close()  # idempotent
    assert no_dns_thread()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(listen)
    with pytest.raises(CorralError, match="closed"):
        r.serve(2, loopback(), ["pypi.org"])


def test_bind_errors_name_the_address(upstream: FakeUpstream, make) -> None:
    r = make(upstream.addr)
    listen = loopback()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(listen)
        with pytest.raises(CorralError, match=rf"UDP\) on {listen[0]}:{listen[1]} for sandbox 5"):
            r.serve(5, listen, ["pypi.org"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(listen)
        taken.listen()
        with pytest.raises(CorralError, match=rf"TCP\) on {listen[0]}:{listen[1]}"):
            r.serve(5, listen, ["pypi.org"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(listen)  # the failed serve left nothing bound
    with pytest.raises(CorralError, match=r"192\.0\.2\.1:53"):  # not an address of this host
        r.serve(5, ("192.0.2.1", 53), ["pypi.org"])


@pytest.mark.parametrize("bad", ["", "*", "*.", "a.*.com", "exa mple..com", "x" * 64 + ".com"])
def test_bad_allow_domains_are_rejected(upstream: FakeUpstream, make, bad: str) -> None:
    r = make(upstream.addr)
    with pytest.raises(CorralError, match="allow-domain"):
        r.serve(1, loopback(), [bad])


def test_ipv6_loopback(upstream: FakeUpstream, make, rec: Recorder) -> None:
    port = loopback()[1]
    r = make(upstream.addr)
    try:
        r.serve(1, ("::1", port), ["pypi.org"])
    except CorralError:
        pytest.skip("no IPv6 on loopback")
    reply = DNSRecord.parse(DNSRecord.question("pypi.org").send("::1", port, ipv6=True, timeout=2))
    assert addresses(reply) == ["203.0.113.10"]
    assert rec.questions[0].client == "::1"


def test_system_upstream_and_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch corp.example\nnameserver bogus\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert system_upstream(str(conf)) == ("192.0.2.53", 53)
    conf.write_text("search corp.example\n")
    with pytest.raises(CorralError, match="no nameserver"):
        system_upstream(str(conf))
    text = resolv_conf_text("10.200.0.1")
    assert "nameserver 10.200.0.1\n" in text and "search" not in text
    with pytest.raises(CorralError):
        resolv_conf_text("dns.example.com")
