"""The first bytes of every flow in and out of a sandbox, classified.

:class:`FlowSniffer` loads ``bpf/flows.bpf.c`` (cgroup_skb egress and ingress
programs) and attaches it once to ``<cgroup v2 root>/corral``: the first
payload-carrying packet of each flow of a socket made below it is copied (up
to 256 bytes) into a ring buffer, once per direction (and, for UDP, once per
remote address and port).  :func:`classify` says what those bytes are (TLS
with its SNI, an SSH banner, an HTTP request or response, stratum mining
JSON-RPC, a DNS question or answer) and :func:`to_event` makes the ``flow``
derived event that rules match.  :class:`FlowJoiner` finds the process behind
a flow from the sensor's connect/accept/bind/send events.

The record layout mirrors ``bpf/flows.h``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from corral.errors import HostError
from corral.events import DerivedEvent, DropEvent, Event, NetEvent
from corral.sensor import host
from corral.sensor.cgroups import attach_to_corral_cgroup
from corral.sensor.libbpf import BpfObject, LibbpfError, Link
from corral.sensor.ringbuf import RingBuffer

DEFAULT_OBJECT = Path(__file__).parent.parent / "_bpf" / "flows.bpf.o"
PAYLOAD_MAX = 256  # FLOW_PAYLOAD_MAX in flows.h
L7_KINDS = ("tls", "ssh", "http", "stratum", "dns", "unknown")

# struct flow_record, everything before payload[]: (member, struct code).
_MEMBERS = (("ts_ns", "Q"), ("cgroup_id", "Q"), ("cookie", "Q"), ("payload_len", "I"), ("uid", "I"),
            ("captured", "H"), ("family", "H"), ("local_port", "H"), ("remote_port", "H"),
            ("direction", "B"), ("proto", "B"), ("_pad", "6s"), ("local_addr", "16s"), ("remote_addr", "16s"))
_RECORD = struct.Struct("<" + "".join(code for _, code in _MEMBERS))
_RECORD_SIZE = _RECORD.size + PAYLOAD_MAX
_DIRECTIONS = {1: "out", 2: "in"}
_PROTOS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
_PROGRAMS = {"cgroup_skb/egress", "cgroup_skb/ingress"}


def object_path() -> Path:
    return Path(os.environ.get("CORRAL_FLOWS_OBJECT", DEFAULT_OBJECT))


def record_offsets() -> dict[str, int]:
    """Byte offset of each member of struct flow_record, as this module reads it."""
    offsets, fmt = {}, "<"
    for name, code in (*_MEMBERS, ("payload", "")):
        offsets[name] = struct.calcsize(fmt)
        fmt += code
    return offsets


def layout_mismatches(obj: BpfObject) -> list[str]:
    """Differences between this module's reading of struct flow_record and the object's BTF."""
    size, btf = obj.struct_layout("flow_record")
    py = record_offsets()
    problems = [f"flow_record: size {size} in BTF, {_RECORD_SIZE} in Python"] if size != _RECORD_SIZE else []
    for member in sorted(btf.keys() | py.keys()):
        if btf.get(member) != py.get(member):
            problems.append(f"flow_record.{member}: offset {btf.get(member)} in BTF, {py.get(member)} in Python")
    return problems


def _addr(family: int, raw: bytes) -> str:
    """Formatted as NetEvent.addr formats it, so that the two can be compared."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return str(ipaddress.IPv6Address(raw))


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """The first payload-carrying packet of a flow in one direction."""

    ts_ns: int          # CLOCK_BOOTTIME, as the sensor's events
    cgroup_id: int      # the socket's cgroup v2 id (where it was created)
    cookie: int         # the socket: the same in both directions, never reused
    direction: str      # "out" or "in"
    proto: str          # "tcp" or "udp"
    family: str         # "inet" or "inet6" (of the packet: a dual-stack socket may send IPv4)
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    payload_len: int    # payload bytes in the packet; ``payload`` holds at most PAYLOAD_MAX
    uid: int            # the socket owner
    payload: bytes


def decode_record(view: memoryview | bytes, off: int = 0, size: int | None = None) -> FlowRecord | None:
    """One ring-buffer record, or None when it is too short or not TCP/UDP."""
    if (len(view) - off if size is None else size) < _RECORD_SIZE:
        return None
    (ts, cgid, cookie, plen, uid, captured, family, lport, rport, direction, proto, _pad,
     laddr, raddr) = _RECORD.unpack_from(view, off)
    if proto not in _PROTOS or direction not in _DIRECTIONS or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    start = off + _RECORD.size
    payload = bytes(view[start:start + min(captured, PAYLOAD_MAX)])
    return FlowRecord(ts, cgid, cookie, _DIRECTIONS[direction], _PROTOS[proto],
                      "inet" if family == socket.AF_INET else "inet6", _addr(family, laddr), lport,
                      _addr(family, raddr), rport, plen, uid, payload)


class FlowSniffer:
    """The flow programs of one corral process and their ring buffer.

    Every socket below ``<v2root>/corral`` is seen, whichever sandbox (or
    corral process) it belongs to: map ``FlowRecord.cgroup_id`` to a sandbox
    and drop what is not yours.
    """

    def __init__(self, path: Path | None = None, *, ring_size: int = 1 << 22) -> None:
        host.check_privileges()
        path = path or object_path()
        if not path.exists():
            raise HostError(f"the flow sniffer's BPF object {path} is not built: run `make setup`")
        if ring_size & (ring_size - 1) or ring_size < 4096:
            raise ValueError("ring_size must be a power of two of at least 4096")
        self._links: list[Link] = []
        self._ring: RingBuffer | None = None
        self._obj: BpfObject | None = BpfObject(str(path))
        self.bad_records = 0
        self.drops_total = 0
        try:
            problems = layout_mismatches(self._obj)
            if problems:
                raise HostError(f"the flow sniffer's object does not match this corral ({problems[0]}): "
                                "run `make setup` to rebuild it")
            maps = self._obj.maps()
            maps["flows"].set_max_entries(ring_size)
            self._obj.load()
            self._links = attach_to_corral_cgroup(self._obj, _PROGRAMS)
            self._ring = RingBuffer(maps["flows"].fd, ring_size)
        except LibbpfError as exc:
            self.close()
            raise exc.refused("flow sniffer") from exc
        except BaseException:
            self.close()
            raise
        self._dropped = maps["dropped"]
        self._capped = maps["capped"]

    def read(self, timeout: float = 0.0) -> list[FlowRecord]:
        """Records ready now, waiting up to ``timeout`` seconds for the first."""
        if self._ring is None:
            raise HostError("the flow sniffer is closed; create a new FlowSniffer")
        out: list[FlowRecord] = []

        def decode(view: memoryview, off: int, size: int) -> None:
            record = decode_record(view, off, size)
            if record is None:
                self.bad_records += 1
            else:
                out.append(record)

        if timeout > 0 and not self._ring.pending():
            self._ring.wait(timeout)
        # Flow records carry no type field: no dispatch, everything goes to decode().
        self._ring.read({}, 0, decode)
        return out

    def wake(self) -> None:
        """End a read(timeout) waiting in another thread now."""
        if self._ring is not None:
            self._ring.wake()

    @property
    def dropped(self) -> int:
        """Flows lost because the ring buffer was full (each is retried on its next packet)."""
        return self._dropped.sum_per_cpu()

    @property
    def capped(self) -> int:
        """UDP remotes not reported: their socket had already shown 64 in that direction."""
        return self._capped.sum_per_cpu()

    def check_drops(self) -> DropEvent | None:
        """A drop event if the kernel lost flow records since the last check."""
        total = self.dropped
        if total <= self.drops_total:
            return None
        event = DropEvent.make(total - self.drops_total, total)
        self.drops_total = total
        return event

    def close(self) -> None:
        """Detach the programs and free the maps."""
        for link in self._links:
            link.destroy()
        self._links.clear()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- classification (pure; never raises on any input) -------------------------

class _Short(Exception):
    """The bytes end before the structure does (truncated capture or garbage)."""


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Short
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")


# Printable ASCII is kept; everything else, and the backslash (so the text
# stays unambiguous), becomes \xNN.
_ESCAPED = tuple(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in range(256))


def payload_text(data: bytes, limit: int = PAYLOAD_MAX) -> str:
    """Bytes as text for rules and people: at most ``limit`` characters."""
    out: list[str] = []
    used = 0
    for b in data:
        piece = _ESCAPED[b]
        used += len(piece)
        if used > limit:
            break
        out.append(piece)
    return "".join(out)


def _text(s: str, limit: int) -> str:
    """A decoded string (JSON may hold lone surrogates) as payload text."""
    return payload_text(s.encode("utf-8", "replace"), limit)


def _first_line(data: bytes) -> tuple[bytes, bool]:
    """The first line without its end, and whether it was ended (not cut by the capture)."""
    line, sep, _ = data.partition(b"\n")
    return line.rstrip(b"\r"), bool(sep)


# -- TLS

def _client_hello_sni(data: bytes) -> str | None:
    r = _Reader(data, 5)  # record header; its length may exceed what was captured
    if r.u8() != 1:  # handshake type ClientHello
        return None
    r.take(3 + 2 + 32)  # handshake length, client version, random
    r.take(r.u8())  # session id
    r.take(r.u16())  # cipher suites
    r.take(r.u8())  # compression methods
    end = r.pos + r.u16()
    while r.pos + 4 <= end:
        ext_type, ext_len = r.u16(), r.u16()
        body = r.take(ext_len)
        if ext_type != 0:  # server_name
            continue
        s = _Reader(body)
        names_end = s.u16() + 2
        while s.pos + 3 <= names_end:
            name_type, name = s.u8(), s.take(s.u16())
            if name_type == 0:  # host_name
                return payload_text(name.rstrip(b"."), 255).lower()
        return None
    return None


def _tls(data: bytes) -> dict[str, Any] | None:
    # a handshake record of SSL 3.0 / TLS 1.0-1.3 (1.3 still says 3.1 or 3.3 here)
    if len(data) < 3 or data[0] != 0x16 or data[1] != 3 or data[2] > 4:
        return None
    fields: dict[str, Any] = {"l7": "tls"}
    try:
        sni = _client_hello_sni(data)
    except _Short:
        sni = None
    if sni:
        fields["sni"] = sni
    return fields


# -- SSH, HTTP

def _ssh(data: bytes) -> dict[str, Any] | None:
    if not data.startswith(b"SSH-"):
        return None
    return {"l7": "ssh", "ssh_banner": payload_text(_first_line(data)[0], 255)}


_HTTP_METHODS = frozenset({b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT",
                           b"TRACE"})
_HTTP_VERSION = re.compile(rb"HTTP/\d(\.\d)?\Z")


def _http(data: bytes) -> dict[str, Any] | None:
    line, ended = _first_line(data)
    if data.startswith(b"HTTP/1."):
        return {"l7": "http", "http_response": payload_text(line, 255)}
    if data.startswith(b"PRI * HTTP/2.0\r\n"):  # HTTP/2 with prior knowledge
        return {"l7": "http", "http_request": "PRI * HTTP/2.0"}
    parts = line.split(b" ")
    if parts[0] not in _HTTP_METHODS or len(parts) < 2 or not parts[1]:
        return None
    # A request line ends with its version; one cut by the capture may not.
    if ended and not (len(parts) == 3 and _HTTP_VERSION.match(parts[2])):
        return None
    fields: dict[str, Any] = {"l7": "http", "http_request": payload_text(line, 255)}
    # Only whole header lines: a Host cut short would be a different name.
    for header in data.split(b"\n")[1:-1]:
        name, sep, value = header.partition(b":")
        if not header.strip():
            break
        if sep and name.strip().lower() == b"host":
            fields["http_host"] = payload_text(value.strip(), 255).lower()
            break
    return fields


# -- stratum (mining JSON-RPC, line-delimited)

_XMRIG_METHODS = frozenset({"login", "submit", "job", "getjob", "keepalived"})
_XMRIG_KEYS = frozenset({"agent", "login", "pass", "job_id", "nonce", "blob", "target"})
_JSON_METHOD = re.compile(rb'"method"\s*:\s*"([A-Za-z0-9_.\-]{1,64})"')
_JSON_AGENT = re.compile(rb'"agent"\s*:\s*"([^"\\]{1,128})"')
_JSON_KEY = re.compile(rb'"([a-z_]{1,16})"\s*:')
_POOL_REPLY = re.compile(rb'"(mining\.notify|mining\.set_difficulty)"|"job"\s*:\s*\{[^}]*"blob"')


def _stratum(data: bytes) -> dict[str, Any] | None:
    line = _first_line(data)[0].strip()
    if not line.startswith(b"{"):
        return None
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):  # cut by the capture: fall back to patterns below
        msg = None
    method: Any
    agent: Any = None
    if isinstance(msg, dict):
        method, params = msg.get("method"), msg.get("params")
        keys = set(params) if isinstance(params, dict) else set()
        if isinstance(params, dict):
            agent = params.get("agent")
        elif method == "mining.subscribe" and isinstance(params, list) and params:
            agent = params[0]  # cpuminer and friends name themselves here
    else:
        found = _JSON_METHOD.search(line)
        method = found.group(1).decode() if found else None
        keys = {k.decode() for k in _JSON_KEY.findall(line)}
        found = _JSON_AGENT.search(line)
        agent = found.group(1).decode("utf-8", "replace") if found else None
    if isinstance(method, str) and (method.startswith("mining.")
                                    or (method in _XMRIG_METHODS and keys & _XMRIG_KEYS)):
        fields: dict[str, Any] = {"l7": "stratum", "stratum_method": _text(method, 64)}
        if isinstance(agent, str) and agent:
            fields["stratum_agent"] = _text(agent, 128)
        return fields
    if method is None and _POOL_REPLY.search(line):  # a pool's answer to subscribe or login
        return {"l7": "stratum"}
    return None


# -- DNS

DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
             33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
_DNS_MAX_QUESTIONS = 8
_DNS_MAX_ANSWERS = 32
_DNS_MAX_JUMPS = 16


def _dns_name(r: _Reader) -> str:
    """A possibly compressed name; r moves past it (not past where pointers lead)."""
    labels: list[str] = []
    pos, jumps, size = r.pos, 0, 0
    end: int | None = None
    data = r.data
    while True:
        if pos >= len(data):
            raise _Short
        n = data[pos]
        if n & 0xC0 == 0xC0:  # pointer
            if pos + 1 >= len(data):
                raise _Short
            jumps += 1
            if jumps > _DNS_MAX_JUMPS:
                raise _Short  # a loop
            if end is None:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | data[pos + 1]
            continue
        if n & 0xC0:
            raise _Short  # reserved label types
        if n == 0:
            r.pos = pos + 1 if end is None else end
            return ".".join(labels).lower()
        label = data[pos + 1:pos + 1 + n]
        if len(label) < n:
            raise _Short
        size += n + 1
        if size > 255:
            raise _Short
        labels.append(payload_text(label, 4 * n).replace(".", "\\x2e"))
        pos += 1 + n


def _dns(data: bytes) -> dict[str, Any] | None:
    r = _Reader(data)
    try:
        r.take(2)  # id
        flags, qdcount, ancount = r.u16(), r.u16(), r.u16()
        r.take(4)  # authority and additional counts
    except _Short:
        return None
    if (flags >> 11) & 0xF != 0 or not 1 <= qdcount <= 64:  # a standard query with questions
        return None
    names: list[str] = []
    qtypes: list[str] = []
    answers: list[str] = []
    try:
        for _ in range(min(qdcount, _DNS_MAX_QUESTIONS)):
            names.append(_dns_name(r))
            qtype = r.u16()
            r.take(2)  # class
            qtypes.append(DNS_TYPES.get(qtype, f"TYPE{qtype}"))
        if flags & 0x8000 and qdcount <= _DNS_MAX_QUESTIONS:  # a response: its addresses
            for _ in range(min(ancount, _DNS_MAX_ANSWERS)):
                _dns_name(r)
                rtype, _class, _ttl, rdlen = r.u16(), r.u16(), r.u32(), r.u16()
                rdata = r.take(rdlen)
                if rtype == 1 and rdlen == 4:
                    answers.append(socket.inet_ntop(socket.AF_INET, rdata))
                elif rtype == 28 and rdlen == 16:
                    answers.append(str(ipaddress.IPv6Address(rdata)))
    except _Short:
        pass  # keep what a cut capture still held
    if not names:
        return None
    fields: dict[str, Any] = {"l7": "dns", "dns_names": names, "dns_qtype": qtypes[0] if qtypes else ""}
    if flags & 0x8000:
        fields["dns_answers"] = answers
    return fields


def classify(payload: bytes, proto: str, dport: int, direction: str, *, sport: int = 0) -> dict[str, Any]:
    """What a flow's first bytes are, as ``flow`` event fields (named without ``net.``).

    Always ``l7`` (one of L7_KINDS) and ``payload`` (the bytes as text); then,
    as found: ``sni``; ``ssh_banner``; ``http_request`` and ``http_host`` (a
    request) or ``http_response`` (its status line); ``stratum_method`` and
    ``stratum_agent``; ``dns_names``, ``dns_qtype`` and, for a response,
    ``dns_answers``.  ``dport`` is the remote port and ``sport`` the local
    one, whatever the ``direction`` ("out" or "in"); DNS is recognised on
    port 53 at either end.  Never raises: garbage is "unknown".
    """
    data = bytes(payload)
    fields: dict[str, Any] = {"l7": "unknown", "payload": payload_text(data)}
    found: dict[str, Any] | None = None
    if 53 in (dport, sport):
        # DNS over TCP carries a two-byte length first
        found = _dns(data[2:] if proto == "tcp" else data)
    if found is None:
        for parse in (_tls, _ssh, _http, _stratum):
            found = parse(data)
            if found is not None:
                break
    if found is not None:
        fields.update(found)
    return fields


# -- events ------------------------------------------------------------------

def to_event(record: FlowRecord, fields: Mapping[str, Any] | None = None,
             scopes: Mapping[int, tuple[int, int]] | None = None, *,
             source: Event | None = None) -> DerivedEvent:
    """The ``flow`` derived event of a record.

    ``fields``: from :func:`classify` (computed when None).  ``scopes``: cgroup
    id -> (sandbox id, step id); the socket's cgroup decides, else the
    source's.  ``source``: the connect/accept/... event of the process behind
    the flow (see :class:`FlowJoiner`), whose pid, comm and proc are used.
    """
    if fields is None:
        fields = classify(record.payload, record.proto, record.remote_port, record.direction,
                          sport=record.local_port)
    data = dict(fields)
    data.update(direction=record.direction, dip=record.remote_addr, dport=record.remote_port,
                sport=record.local_port, proto=record.proto, family=record.family)
    scope = (scopes or {}).get(record.cgroup_id)
    if source is None:
        sandbox_id, step_id = scope or (0, 0)
        return DerivedEvent.make("flow", ts_ns=record.ts_ns, cgroup_id=record.cgroup_id, uid=record.uid,
                                 sandbox_id=sandbox_id, step_id=step_id, **data)
    sandbox_id, step_id = scope or (source.sandbox_id, source.step_id)
    return DerivedEvent.make("flow", ts_ns=record.ts_ns, cgroup_id=record.cgroup_id, pid=source.pid,
                             tid=source.tid, ppid=source.ppid, uid=source.uid, sandbox_id=sandbox_id,
                             step_id=step_id, comm=source.comm, proc=source.proc, **data)


_JoinKey = tuple[int, int, str, int]  # (cgroup id, local port, remote address, remote port)
_JOINED_KINDS = frozenset({"connect", "accept", "bind", "send"})
_EINPROGRESS = 115


def _plain_addr(addr: str) -> str:
    """::ffff:a.b.c.d as a.b.c.d: a dual-stack socket's IPv4 packets carry the plain form."""
    if ":" not in addr or "." not in addr:  # IPv4, or IPv6 that is not v4-mapped (inet_ntop's forms)
        return addr
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return addr


class FlowJoiner:
    """Which process a flow belongs to: the sensor's connect, accept, bind and
    send events, remembered per (cgroup, local port, remote address, remote port).

    Feed it every sensor event (:meth:`observe`), then :meth:`match` flows.
    Read the flow ring *before* the sensor's, so a connect is observed before
    the flow it opened.  An accepted connection's first bytes can arrive before
    the server's accept() returns: hold an unmatched record and retry briefly.
    """

    def __init__(self, max_entries: int = 65536) -> None:
        self._max = max_entries
        self._events: OrderedDict[_JoinKey, NetEvent] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def observe(self, event: Event) -> None:
        if not isinstance(event, NetEvent) or event.kind not in _JOINED_KINDS:
            return
        if event.family not in ("inet", "inet6"):
            return
        if event.result < 0 and not (event.kind == "connect" and event.result == -_EINPROGRESS):
            return  # failed: no flow will come of it
        if event.kind == "bind":  # the remote end is not known yet
            key: _JoinKey = (event.cgroup_id, event.local_port or event.port, "", 0)
        else:  # the first sendto() of an unbound UDP socket has no local port yet: 0
            key = (event.cgroup_id, event.local_port, _plain_addr(event.addr), event.port)
        self._events[key] = event
        self._events.move_to_end(key)
        while len(self._events) > self._max:
            self._events.popitem(last=False)

    def match(self, record: FlowRecord) -> NetEvent | None:
        """The latest event of this flow's socket: exact, then by remote end, then a bound port."""
        remote = _plain_addr(record.remote_addr)
        for key in ((record.cgroup_id, record.local_port, remote, record.remote_port),
                    (record.cgroup_id, 0, remote, record.remote_port),
                    (record.cgroup_id, record.local_port, "", 0)):
            event = self._events.get(key)
            if event is not None:
                return event
        return None

    def forget_cgroup(self, cgroup_id: int) -> None:
        """Drop what is known of a removed cgroup."""
        for key in [k for k in self._events if k[0] == cgroup_id]:
            del self._events[key]


__all__ = ["DNS_TYPES", "L7_KINDS", "PAYLOAD_MAX", "FlowJoiner", "FlowRecord", "FlowSniffer", "classify",
           "decode_record", "payload_text", "to_event"]
