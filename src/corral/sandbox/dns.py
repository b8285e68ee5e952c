"""The sandbox's DNS resolver: how ``--allow-domain NAME`` becomes kernel egress rules.

Egress from a sandbox is default-deny in the kernel (an allow map of CIDR+port).
Names cannot go into that map, so the sandbox's resolv.conf points at a resolver
that corral runs on the host side of the sandbox's veth:

- a question for an allowed name (exact, or ``*.example.com`` for any subdomain)
  is forwarded upstream as a fresh one-question query (nothing else the agent
  put in its packet travels on), and every final A/AAAA address of the answer
  (after CNAMEs) is passed to ``on_admit`` *before* the answer is sent, so the
  allow map already holds the address when the agent connects to it;
- any other question is answered REFUSED and never leaves the host;
- every question, allowed or not, is passed to ``on_question`` (the ``dns``
  events, which the DNS-tunnelling detector also reads);
- a per-sandbox token bucket limits questions, so an agent cannot tunnel data
  through (or flood) the upstream resolver.

REFUSED rather than NXDOMAIN for denied names: it is the truthful answer (the
name may well exist; policy says no), stub resolvers do not cache it as a
negative answer (NXDOMAIN would need a made-up SOA and be cached), and the
agent's error message reads "refused", which points a human at the policy.

One thread runs a selector over every listening socket, every TCP client and
every query in flight upstream, so a slow upstream never blocks other
sandboxes and no per-query threads exist.  Callbacks run on that thread: keep
them quick, and do not call ``serve``/``stop_serving`` from them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from dnslib import (  # type: ignore[import-untyped]
    CLASS,
    EDNS0,
    QTYPE,
    RCODE,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
)

from corral.errors import CorralError

log = logging.getLogger(__name__)

MIN_TTL_S = 5  # an admitted address lives at least this long (TTL 0 answers still work)
MAX_TTL_S = 3600  # ... and at most this long; the client is told no more than this either
UPSTREAM_TIMEOUT_S = 2.0
UPSTREAM_TRIES = 2  # the first send plus one retry, then SERVFAIL
RATE_PER_S = 200.0  # questions per second per sandbox; the bucket holds one second's worth
MAX_IN_FLIGHT = 1024  # upstream queries at once, all sandboxes together
EDNS_UDP = 1232  # the UDP size we offer upstream (DNS flag day 2020 value: no fragments)
TCP_MAX_CONNS = 16  # TCP clients at once per sandbox
TCP_IDLE_S = 10.0
TCP_MAX_OUT = 256 * 1024  # a client that stops reading is dropped past this much unsent data
_CALL_TIMEOUT_S = 5.0
_LEN = struct.Struct("!H")
_ADDRESS_TYPES = (QTYPE.A, QTYPE.AAAA)

Labels = tuple[bytes, ...]


@dataclass(frozen=True)
class Question:
    """One question a sandbox asked, as reported to ``on_question`` (a ``dns`` event).

    ``allowed`` says whether the name is on the sandbox's allow list; ``rcode``
    what the sandbox was answered (REFUSED for a denied name or an excess
    question, SERVFAIL when upstream failed, FORMERR for an unreadable packet);
    ``answers`` the addresses admitted and ``ttl`` the shortest admission
    (0 when none); ``rate_limited`` marks questions refused by the rate limit.
    """

    sandbox_id: int
    client: str
    name: str
    qtype: str
    allowed: bool
    answers: tuple[str, ...]
    ttl: int
    time_ns: int
    rcode: str = "NOERROR"
    rate_limited: bool = False


def clamp_ttl(ttl: int) -> int:
    return max(MIN_TTL_S, min(MAX_TTL_S, ttl))


def _norm_labels(labels: Sequence[bytes]) -> Labels:
    # DNS names compare case-insensitively in ASCII only (RFC 4343)
    return tuple(bytes(label).lower() for label in labels)


def _display(labels: Labels) -> str:
    """A name as text without the trailing dot; dots and odd bytes inside a label are escaped."""
    if not labels:
        return "."
    out = []
    for label in labels:
        text = "".join(
            "\\" + chr(b) if b in b".\\" else chr(b) if 0x21 <= b < 0x7F else f"\\{b:03d}" for b in label
        )
        out.append(text)
    return ".".join(out)


class AllowList:
    """Names a sandbox may resolve: exact names and ``*.suffix`` wildcards (subdomains only).

    Matching is on labels, not text, so a single label ``pypi.org`` (which a
    crafted packet can carry) never matches the two labels ``pypi`` ``org``.
    """

    def __init__(self, domains: Sequence[str]) -> None:
        self.exact: set[Labels] = set()
        self.suffixes: set[Labels] = set()
        for raw in domains:
            wildcard, labels = _parse_pattern(raw)
            (self.suffixes if wildcard else self.exact).add(labels)

    def allows(self, labels: Labels) -> bool:
        if labels in self.exact:
            return True
        return any(labels[i:] in self.suffixes for i in range(1, len(labels)))


def _parse_pattern(raw: str) -> tuple[bool, Labels]:
    name = raw.strip().rstrip(".").lower()
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    try:
        encoded = name.encode("idna") if name else b""  # bücher.de -> xn--bcher-kva.de
    except UnicodeError as e:
        raise CorralError(f"--allow-domain {raw!r} is not a valid domain name ({e})") from e
    labels = tuple(encoded.split(b"."))
    if not name or "*" in name or any(not label or len(label) > 63 for label in labels):
        raise CorralError(
            f"--allow-domain {raw!r} is not a domain name; use a name like pypi.org "
            "or a wildcard like *.example.com (subdomains only)"
        )
    return wildcard, labels


def system_upstream(path: str = "/etc/resolv.conf") -> tuple[str, int]:
    """The first nameserver in the host's resolv.conf, as (address, 53)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CorralError(f"cannot read {path} to find the host's DNS server: {e.strerror}") from e
    for line in lines:
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                ipaddress.ip_address(words[1].split("%", 1)[0])
            except ValueError:
                continue  # glibc skips lines it cannot parse too
            return words[1], 53
    raise CorralError(f"no nameserver line in {path}; corral needs the host's DNS server to forward to")


def resolv_conf_text(nameserver: str) -> str:
    """resolv.conf for a sandbox: only corral's resolver, and no search list.

    No ``search`` line, so short names are not expanded with the host's domains
    (which would only produce refused questions that name internal domains).
    """
    try:
        ipaddress.ip_address(nameserver)
    except ValueError as e:
        raise CorralError(f"DNS server for the sandbox must be an IP address, not {nameserver!r}") from e
    return (
        "# written by corral: names resolve through corral's policy resolver\n"
        f"nameserver {nameserver}\n"
        "options edns0\n"
    )


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Bucket:
    """Token bucket: ``rate`` questions per second, bursts up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = max(rate, 1.0)
        self.last = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(eq=False)
class _Sandbox:
    id: int
    listen: tuple[str, int]
    allow: AllowList
    udp: socket.socket
    tcp: socket.socket
    bucket: _Bucket
    conns: set[_TcpConn] = field(default_factory=set)


@dataclass(eq=False)
class _TcpConn:
    sock: socket.socket
    sandbox: _Sandbox
    client: str
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    closed: bool = False


@dataclass(eq=False)
class _Query:
    """A question being answered: who asked, how to reply, and (when forwarded) the upstream state."""

    sandbox: _Sandbox
    client: str
    request: Any  # dnslib.DNSRecord
    labels: Labels
    qtype: str
    allowed: bool
    time_ns: int
    send: Callable[[bytes], None]
    max_size: int  # the largest reply the client takes (UDP); bigger ones go out truncated
    sock: socket.socket | None = None
    upstream_id: int = 0
    wire: bytes = b""
    tries: int = 0
    deadline: float = 0.0


class Resolver:
    """corral's policy resolver, one listen address per sandbox, all served by one thread."""

    def __init__(
        self,
        upstream: tuple[str, int],
        on_question: Callable[[Question], None],
        on_admit: Callable[[int, str, int], None],
        *,
        timeout: float = UPSTREAM_TIMEOUT_S,
        rate_limit: float = RATE_PER_S,
    ) -> None:
        self.upstream = upstream
        self.on_question = on_question
        self.on_admit = on_admit
        self.timeout = timeout
        self.rate_limit = rate_limit
        self._sel = selectors.DefaultSelector()
        self._sandboxes: dict[int, _Sandbox] = {}  # owned by the loop thread
        self._pending: dict[socket.socket, _Query] = {}  # owned by the loop thread
        self._conns: set[_TcpConn] = set()  # owned by the loop thread
        # Other threads hand work to the loop through _calls and a wake-up socket,
        # because a selector must not be changed while another thread selects on it.
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[[], None], threading.Event, list[BaseException]]] = []
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._thread = threading.Thread(target=self._loop, name="corral-dns", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ----

    def serve(self, sandbox_id: int, listen: tuple[str, int], allow_domains: Sequence[str]) -> None:
        """Answer sandbox ``sandbox_id``'s questions on ``listen`` (UDP and TCP, same port)."""
        allow = AllowList(allow_domains)
        udp = self._bind(sandbox_id, listen, socket.SOCK_DGRAM)
        try:
            # port 0 means "any": TCP then takes the port UDP got, so both answer on one address
            tcp = self._bind(sandbox_id, (listen[0], udp.getsockname()[1]), socket.SOCK_STREAM)
        except CorralError:
            udp.close()
            raise
        sb = _Sandbox(sandbox_id, listen, allow, udp, tcp, _Bucket(self.rate_limit))
        try:
            self._call(lambda: self._add(sb))
        except BaseException:
            udp.close()
            tcp.close()
            raise

    def stop_serving(self, sandbox_id: int) -> None:
        """Stop answering for that sandbox; its listen address is free when this returns."""
        self._call(lambda: self._remove(sandbox_id))

    def close(self) -> None:
        """Stop every listener and the thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(_CALL_TIMEOUT_S)

    def __enter__(self) -> Resolver:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- plumbing between callers and the loop thread ----

    def _bind(self, sandbox_id: int, listen: tuple[str, int], kind: socket.SocketKind) -> socket.socket:
        proto = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
        s = socket.socket(_family(listen[0]), kind)
        try:
            if kind == socket.SOCK_STREAM:
                # so a stopped sandbox's address can be served again at once despite TIME_WAIT
                # (UDP gets no SO_REUSEADDR: two resolvers on one address must fail loudly)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(listen)
            if kind == socket.SOCK_STREAM:
                s.listen(TCP_MAX_CONNS)
            s.setblocking(False)
        except (OSError, OverflowError) as e:
            s.close()
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CorralError(
                f"cannot listen for DNS ({proto}) on {_fmt(listen)} for sandbox {sandbox_id}: {why}"
            ) from e
        return s

    def _call(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop thread and wait for it; its exception is raised here."""
        if threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()
        error: list[BaseException] = []
        with self._lock:
            if self._closed:
                raise CorralError("the DNS resolver is closed")
            self._calls.append((fn, done, error))
        self._wake()
        if not done.wait(_CALL_TIMEOUT_S):
            raise CorralError("the DNS resolver thread did not respond")
        if error:
            raise error[0]

    def _wake(self) -> None:
        # BlockingIOError: a wake-up is already pending; OSError: closing
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _on_wake(self, _mask: int) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, done, error in calls:
            try:
                fn()
            except BaseException as e:  # handed back to the caller, who re-raises it
                error.append(e)
            done.set()

    def _add(self, sb: _Sandbox) -> None:
        if sb.id in self._sandboxes:
            raise CorralError(
                f"sandbox {sb.id} already has a DNS resolver on {_fmt(self._sandboxes[sb.id].listen)}"
            )
        self._sandboxes[sb.id] = sb
        self._sel.register(sb.udp, selectors.EVENT_READ, lambda _m: self._on_udp(sb))
        self._sel.register(sb.tcp, selectors.EVENT_READ, lambda _m: self._on_accept(sb))

    def _remove(self, sandbox_id: int) -> None:
        sb = self._sandboxes.pop(sandbox_id, None)
        if sb is None:
            return
        for s in (sb.udp, sb.tcp):
            self._sel.unregister(s)
            s.close()
        for conn in list(sb.conns):
            self._close_conn(conn)
        for q in [q for q in self._pending.values() if q.sandbox is sb]:
            self._drop_upstream(q)

    # ---- the loop ----

    def _loop(self) -> None:
        try:
            while not self._closed:
                for key, mask in self._sel.select(self._next_timeout()):
                    if self._closed:
                        break
                    if isinstance(key.fileobj, socket.socket) and key.fileobj.fileno() < 0:
                        continue  # closed by an earlier handler in this same batch
                    try:
                        key.data(mask)
                    except Exception:  # one bad packet or callback must not stop DNS for everyone
                        log.exception("DNS resolver: error while handling an event")
                self._expire(time.monotonic())
        finally:
            self._shutdown()

    def _next_timeout(self) -> float | None:
        deadlines = [q.deadline for q in self._pending.values()]
        deadlines += [c.deadline for c in self._conns]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire(self, now: float) -> None:
        for q in [q for q in self._pending.values() if q.deadline <= now]:
            self._upstream_failed(q)
        for conn in [c for c in self._conns if c.deadline <= now]:
            self._close_conn(conn)

    def _shutdown(self) -> None:
        for sandbox_id in list(self._sandboxes):
            self._remove(sandbox_id)
        for q in list(self._pending.values()):
            self._drop_upstream(q)
        with self._lock:
            calls, self._calls = self._calls, []
        for _fn, done, error in calls:
            error.append(CorralError("the DNS resolver is closed"))
            done.set()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---- clients ----

    def _on_udp(self, sb: _Sandbox) -> None:
        # read a bounded batch, then let other sockets have a turn
        for _ in range(64):
            try:
                data, addr = sb.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued by an earlier reply; the next read gets data

            def send(wire: bytes, addr: Any = addr) -> None:
                with contextlib.suppress(OSError):  # lost: the client will ask again
                    sb.udp.sendto(wire, addr)

            self._on_message(sb, data, addr[0], send, udp=True)

    def _on_accept(self, sb: _Sandbox) -> None:
        try:
            sock, addr = sb.tcp.accept()
        except OSError:
            return
        if len(sb.conns) >= TCP_MAX_CONNS:
            sock.close()  # bounded: the agent gets no more TCP clients than this at once
            return
        sock.setblocking(False)
        conn = _TcpConn(sock, sb, addr[0], time.monotonic() + TCP_IDLE_S)
        sb.conns.add(conn)
        self._conns.add(conn)
        self._sel.register(sock, selectors.EVENT_READ, lambda mask: self._on_tcp(conn, mask))

    def _on_tcp(self, conn: _TcpConn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if not mask & selectors.EVENT_READ or conn.closed:
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_conn(conn)
            return
        conn.deadline = time.monotonic() + TCP_IDLE_S
        conn.inbuf += data
        # messages are framed by a 2-byte length (RFC 1035 4.2.2); a frame is at most 64 KiB,
        # so the buffer never holds more than one frame plus one read
        while len(conn.inbuf) >= 2 and not conn.closed:
            (n,) = _LEN.unpack_from(conn.inbuf)
            if len(conn.inbuf) < 2 + n:
                break
            message = bytes(conn.inbuf[2 : 2 + n])
            del conn.inbuf[: 2 + n]
            self._on_message(conn.sandbox, message, conn.client, lambda w: self._tcp_send(conn, w), udp=False)

    def _tcp_send(self, conn: _TcpConn, wire: bytes) -> None:
        if conn.closed:
            return
        conn.outbuf += _LEN.pack(len(wire)) + wire
        if len(conn.outbuf) > TCP_MAX_OUT:
            self._close_conn(conn)
            return
        self._flush(conn)

    def _flush(self, conn: _TcpConn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf) if conn.outbuf else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close_conn(conn)
            return
        del conn.outbuf[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self._sel.modify(conn.sock, events, lambda mask: self._on_tcp(conn, mask))

    def _close_conn(self, conn: _TcpConn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.sandbox.conns.discard(conn)
        self._conns.discard(conn)
        self._sel.unregister(conn.sock)
        conn.sock.close()

    # ---- questions ----

    def _on_message(
        self, sb: _Sandbox, data: bytes, client: str, send: Callable[[bytes], None], *, udp: bool
    ) -> None:
        now_ns = time.time_ns()
        # the bucket is charged before parsing, so garbage counts against the limit too
        within_limit = sb.bucket.take(time.monotonic())
        try:
            request = DNSRecord.parse(data)
        except Exception:  # dnslib raises several kinds on hostile input
            request = None
        if request is None or request.header.qr:
            # not a question (garbage or a stray response): no reply, but the agent did send it
            self._report(Question(sb.id, client, "", "", False, (), 0, now_ns, "FORMERR", not within_limit))
            return
        labels = _norm_labels(request.q.qname.label) if request.questions else ()
        qtype = QTYPE[request.q.qtype] if request.questions else ""
        allowed = (
            len(request.questions) == 1
            and request.header.opcode == 0
            and request.q.qclass == CLASS.IN
            and sb.allow.allows(labels)
        )
        q = _Query(sb, client, request, labels, qtype, allowed, now_ns, send, _max_size(request, udp))
        if not within_limit:
            self._finish(q, _bare_reply(request, RCODE.REFUSED), rate_limited=True)
        elif len(request.questions) != 1:
            self._finish(q, _bare_reply(request, RCODE.FORMERR))
        elif request.header.opcode != 0:
            self._finish(q, _bare_reply(request, RCODE.NOTIMP))
        elif not allowed:
            self._finish(q, _bare_reply(request, RCODE.REFUSED))
        else:
            self._forward(q)

    def _forward(self, q: _Query) -> None:
        if len(self._pending) >= MAX_IN_FLIGHT:
            self._finish(q, _bare_reply(q.request, RCODE.SERVFAIL))
            return
        # A fresh query with our own random id: only the question travels upstream, and a
        # forged reply must guess both the id and the (random) source port of this socket.
        q.upstream_id = secrets.randbits(16)
        rq = q.request.q
        upstream = DNSRecord(
            DNSHeader(id=q.upstream_id, rd=1), q=DNSQuestion(rq.qname, rq.qtype, rq.qclass),
            ar=[EDNS0(udp_len=EDNS_UDP)],
        )
        q.wire = upstream.pack()
        sock = socket.socket(_family(self.upstream[0]), socket.SOCK_DGRAM)
        sock.setblocking(False)
        q.sock = sock
        self._pending[sock] = q
        self._sel.register(sock, selectors.EVENT_READ, lambda _m: self._on_upstream(q))
        try:
            sock.connect(self.upstream)  # connected: the kernel drops datagrams from anyone else
        except OSError:
            self._drop_upstream(q)
            self._finish(q, _bare_reply(q.request, RCODE.SERVFAIL))
            return
        self._send_upstream(q)

    def _send_upstream(self, q: _Query) -> None:
        assert q.sock is not None
        q.tries += 1
        q.deadline = time.monotonic() + self.timeout
        try:
            q.sock.send(q.wire)
        except OSError:
            self._upstream_failed(q)

    def _upstream_failed(self, q: _Query) -> None:
        if q.tries < UPSTREAM_TRIES:
            self._send_upstream(q)
        else:
            self._drop_upstream(q)
            self._finish(q, _bare_reply(q.request, RCODE.SERVFAIL))

    def _drop_upstream(self, q: _Query) -> None:
        if q.sock is not None and self._pending.pop(q.sock, None) is not None:
            self._sel.unregister(q.sock)
            q.sock.close()

    def _on_upstream(self, q: _Query) -> None:
        assert q.sock is not None
        try:
            data = q.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ICMP port unreachable: nobody listens there, so try again now
            self._upstream_failed(q)
            return
        try:
            reply = DNSRecord.parse(data)
        except Exception:
            return  # unreadable: keep waiting for a real answer until the deadline
        if (
            reply.header.id != q.upstream_id
            or not reply.header.qr
            or len(reply.questions) != 1
            or _norm_labels(reply.q.qname.label) != q.labels
            or reply.q.qtype != q.request.q.qtype
        ):
            return  # not the answer to our question
        self._drop_upstream(q)
        self._answer(q, reply)

    def _answer(self, q: _Query, upstream: Any) -> None:
        """Admit the final addresses, then pass the upstream answer on under the client's id."""
        rq = q.request
        out = DNSRecord(
            DNSHeader(id=rq.header.id, qr=1, rd=rq.header.rd, ra=1, rcode=upstream.header.rcode),
            q=rq.q, rr=upstream.rr, auth=upstream.auth,
        )
        for rr in out.rr + out.auth:
            # the client must not cache an address longer than we admit it
            rr.ttl = min(rr.ttl, MAX_TTL_S)
        admitted = _final_addresses(upstream, q.labels) if upstream.header.rcode == RCODE.NOERROR else []
        try:
            for address, ttl in admitted:
                self.on_admit(q.sandbox.id, address, ttl)
        except Exception:
            # an address we could not admit would only fail on connect; say so now instead
            log.exception("DNS resolver: admitting addresses for sandbox %d failed", q.sandbox.id)
            self._finish(q, _bare_reply(rq, RCODE.SERVFAIL))
            return
        answers = tuple(a for a, _ in admitted)
        ttl = min((t for _, t in admitted), default=0)
        self._finish(q, out, answers, ttl)

    def _finish(
        self, q: _Query, reply: Any, answers: tuple[str, ...] = (), ttl: int = 0, rate_limited: bool = False
    ) -> None:
        # report first, then reply: the dns event precedes anything the agent does with the answer
        rcode = RCODE.get(reply.header.rcode)
        self._report(
            Question(q.sandbox.id, q.client, _display(q.labels), q.qtype, q.allowed, answers, ttl, q.time_ns,
                     rcode, rate_limited)
        )
        if _has_edns(q.request):
            reply.add_ar(EDNS0(udp_len=EDNS_UDP))  # an EDNS client expects EDNS back (RFC 6891)
        wire = reply.pack()
        if len(wire) > q.max_size:
            # too big for this UDP client: TC tells it to ask again over TCP.  The question stays
            # in, because glibc ignores replies whose question does not match its own.
            truncated = DNSRecord(
                DNSHeader(id=reply.header.id, qr=1, rd=reply.header.rd, ra=1, tc=1, rcode=reply.header.rcode),
                q=q.request.q,
            )
            if _has_edns(q.request):
                truncated.add_ar(EDNS0(udp_len=EDNS_UDP))
            wire = truncated.pack()
        q.send(wire)

    def _report(self, question: Question) -> None:
        try:
            self.on_question(question)
        except Exception:
            log.exception("DNS resolver: on_question failed")


def _bare_reply(request: Any, rcode: int) -> Any:
    """A reply carrying only the question (if any) and an rcode."""
    return DNSRecord(
        DNSHeader(id=request.header.id, qr=1, opcode=request.header.opcode, rd=request.header.rd, ra=1,
                  rcode=rcode),
        questions=list(request.questions[:1]),
    )


def _has_edns(request: Any) -> bool:
    return any(rr.rtype == QTYPE.OPT for rr in request.ar)


def _max_size(request: Any, udp: bool) -> int:
    if not udp:
        return 65535
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:  # EDNS0: the client's UDP buffer size is in the class field
            return int(max(512, min(rr.rclass, 4096)))
    return 512


def _final_addresses(reply: Any, qname: Labels) -> list[tuple[str, int]]:
    """The A/AAAA records at the end of qname's CNAME chain, with clamped TTLs.

    Only records on the chain count: an address the upstream added for some
    other name is not something the sandbox asked for and is not admitted.
    """
    cnames = {
        _norm_labels(rr.rname.label): _norm_labels(rr.rdata.label.label)
        for rr in reply.rr
        if rr.rtype == QTYPE.CNAME
    }
    chain = [qname]
    while chain[-1] in cnames and cnames[chain[-1]] not in chain:  # stops on loops
        chain.append(cnames[chain[-1]])
    on_chain = set(chain)
    return [
        (str(rr.rdata), clamp_ttl(rr.ttl))
        for rr in reply.rr
        if rr.rtype in _ADDRESS_TYPES and _norm_labels(rr.rname.label) in on_chain
    ]
