"""``long_session``: an outbound TCP connection of a non-interactive process still open after T.

A reverse tunnel (``ssh -N -R``, chisel, frpc, a Python socket loop) is one long-lived outbound
connection that nothing interactive drives.  Agent tools make short requests; a connection still
up after 5 minutes (the default) is worth a rule's look.

Which processes are non-interactive: every process in a sandbox (an agent's steps have no
terminal, and a pseudo-terminal a process makes itself proves nothing).  Outside sandboxes
(host-wide mode) a process whose fd 0 is a terminal at connect time is taken as a person's.

Liveness: each connect records its four-tuple (local port, remote address and port) and the
inode of the process's network namespace.  When a connection is T old, the detector reads the
TCP table of that namespace (``/proc/<pid>/net/tcp{,6}``, through the connecting process or, if
that one has gone, any live process of the same sandbox in that namespace: ``ssh -f`` connects
and then hands the socket to a child) and looks for the tuple in state ESTABLISHED.  A connection
not found is forgotten; one found is reported and checked again at twice its age.
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass

from corral import events as ev
from corral.detect.detectors._common import EINPROGRESS, NS, outbound

_ESTABLISHED = "01"
_READERS = 64  # live processes tried, at most, to reach a namespace whose connecting process is gone
Tuple4 = tuple[int, bytes, int]  # local port, remote address (4 or 16 bytes), remote port


@dataclass(slots=True)
class _Conn:
    source: ev.NetEvent
    key: Tuple4
    netns: int  # inode of the connecting process's network namespace; 0 if unknown
    check_ns: int  # when to look next


def _packed(addr: str) -> bytes:
    """The address as bytes, an IPv4-mapped IPv6 address as its 4 IPv4 bytes."""
    if ":" not in addr:
        return socket.inet_pton(socket.AF_INET, addr)
    raw = socket.inet_pton(socket.AF_INET6, addr)
    return raw[12:] if raw[:12] == b"\0" * 10 + b"\xff\xff" else raw


def _hex_addr(text: str) -> bytes:
    """An address of /proc/net/tcp{,6}: 32-bit words, each in host (little-endian) order."""
    raw = bytes.fromhex(text)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return raw[12:] if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff" else raw


def established(pid: int) -> set[Tuple4] | None:
    """The ESTABLISHED TCP connections of ``pid``'s network namespace, or None if unreadable."""
    found: set[Tuple4] = set()
    try:
        for name in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)  # header
                for line in f:
                    parts = line.split(None, 4)
                    if parts[3] != _ESTABLISHED:
                        continue
                    local, remote = parts[1].split(":"), parts[2].split(":")
                    found.add((int(local[1], 16), _hex_addr(remote[0]), int(remote[1], 16)))
    except OSError:
        return None
    return found


def _netns(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return 0


def _on_terminal(pid: int) -> bool:
    try:
        target = os.readlink(f"/proc/{pid}/fd/0")
    except OSError:
        return False
    return target.startswith(("/dev/pts/", "/dev/tty")) or target == "/dev/console"


class LongSessionDetector:
    """Emits ``long_session`` (data: seconds, dip, dport, sport, proto).

    One event per connection when it is ``seconds`` old and still established, another each
    time its age doubles.
    """

    kinds = frozenset((ev.CONNECT, ev.FORK, ev.EXEC, ev.EXIT))

    def __init__(self, *, seconds: float = 300.0, max_per_sandbox: int = 4096, max_live: int = 4096) -> None:
        """
        seconds: how old an open outbound connection must be to be reported.
        max_per_sandbox: connections followed per sandbox.  Past it, a tick first forgets the
        closed ones; new connections beyond it are not followed (the old ones are the suspects).
        max_live: live pids remembered per sandbox (to reach a namespace whose connecting process
        has exited).
        """
        self.after_ns = int(seconds * NS)
        self.max_per_sandbox, self.max_live = max_per_sandbox, max_live
        self._conns: dict[int, dict[Tuple4, _Conn]] = {}  # sandbox key -> connections
        self._live: dict[int, dict[int, None]] = {}  # sandbox key -> live pids (ordered)
        self._netns_of: dict[int, int] = {}
        self._tables: dict[int, set[Tuple4] | None] = {}

    @staticmethod
    def _sandbox(event: ev.Event) -> int:
        return event.sandbox_id or -event.cgroup_id

    def feed(self, event: ev.Event) -> list[ev.DerivedEvent]:
        t = event.type
        if t == ev.CONNECT:
            self._connect(event)
        elif t in (ev.FORK, ev.EXEC):
            pid = event.child_pid if isinstance(event, ev.ForkEvent) else event.pid
            live = self._live.setdefault(self._sandbox(event), {})
            live[pid] = None
            if len(live) > self.max_live:
                del live[next(iter(live))]
        elif t == ev.EXIT:
            gone = self._live.get(self._sandbox(event))
            if gone is not None:
                gone.pop(event.pid, None)
                if not gone:
                    del self._live[self._sandbox(event)]
        return []

    def _connect(self, event: ev.Event) -> None:
        net = outbound(event)
        if net is None or net.sock_type != "stream" or net.result not in (0, -EINPROGRESS):
            return
        if not net.sandbox_id and _on_terminal(net.pid):
            return
        conns = self._conns.setdefault(self._sandbox(net), {})
        if len(conns) >= self.max_per_sandbox:
            return
        key = (net.local_port, _packed(net.addr), net.port)
        conns[key] = _Conn(net, key, _netns(net.pid), net.ts_ns + self.after_ns)

    def tick(self, now_ns: int) -> list[ev.DerivedEvent]:
        out: list[ev.DerivedEvent] = []
        # read at most once per tick: each pid's namespace, each namespace's TCP table
        self._netns_of = {}
        self._tables = {}
        for sandbox, conns in list(self._conns.items()):
            crowded = len(conns) >= self.max_per_sandbox // 2
            for key, conn in list(conns.items()):
                if now_ns < conn.check_ns and not crowded:
                    continue
                open_now = self._established(sandbox, conn)
                if not open_now:
                    del conns[key]
                    continue
                age_ns = now_ns - conn.source.ts_ns
                if now_ns < conn.check_ns:
                    continue  # alive, checked early only to make room
                conn.check_ns = conn.source.ts_ns + 2 * age_ns
                src = conn.source
                out.append(ev.DerivedEvent.about(
                    "long_session", src, ts_ns=now_ns, seconds=round(age_ns / NS, 1), dip=src.addr,
                    dport=src.port, sport=src.local_port, proto="tcp"))
            if not conns:
                del self._conns[sandbox]
        self._netns_of, self._tables = {}, {}
        return out

    def _established(self, sandbox: int, conn: _Conn) -> bool:
        """Whether the connection is still ESTABLISHED in its namespace, as seen through the
        connecting process or else one of the sandbox's oldest live processes."""
        others = itertools.islice(self._live.get(sandbox, {}), _READERS)
        for pid in itertools.chain((conn.source.pid,), others):
            netns = self._netns_of.get(pid)
            if netns is None:
                netns = self._netns_of[pid] = _netns(pid)
            if netns == 0 or (conn.netns and netns != conn.netns):
                continue
            if netns not in self._tables:
                self._tables[netns] = established(pid)
            table = self._tables[netns]
            if table is None:
                continue
            lport, addr, port = conn.key
            if lport:
                return conn.key in table
            return any(k[1] == addr and k[2] == port for k in table)  # local port unknown
        return False
