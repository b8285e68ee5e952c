"""A tiny network lab for tests, with no route out (docs/design.md, "Test network").

``TestNet`` makes two namespaces joined by one veth and nothing else:

    client  192.0.2.2/24, 2001:db8:1::2/64      routes to the server's /32s and /128 only
    server  192.0.2.1/24, 2001:db8:1::1/64      plus 198.51.100.10, 198.51.100.11,
                                                203.0.113.10, 169.254.169.254 (a metadata
                                                stub) and 2001:db8::10

Neither namespace has a default route, and both are checked with
:func:`assert_no_route_out` before anything runs in them.  Processes started
here are ended by PID when the lab closes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Self

from corral.sensor.host import pid_alive

SERVER_V4 = "192.0.2.1"
CLIENT_V4 = "192.0.2.2"
SERVER_V6 = "2001:db8:1::1"
CLIENT_V6 = "2001:db8:1::2"
EXTRA_V4 = ("198.51.100.10", "198.51.100.11", "203.0.113.10", "169.254.169.254")
EXTRA_V6 = ("2001:db8::10",)

# Listens on "tcp:PORT" / "udp:PORT" (dual-stack on every address unless --bind
# ADDR, or PORT@ADDR for one socket), answers TCP with "ok" and echoes UDP;
# prints "ready PORT..." once every socket is bound.  A UDP socket bound to a
# wildcard replies from the route's source address, which a connected client
# ignores: bind UDP to each address that connected clients use.
SERVER_PY = r"""
import selectors, socket, sys
args = sys.argv[1:]
default = "::"
if args[:1] == ["--bind"]:
    default, args = args[1], args[2:]
sel = selectors.DefaultSelector()
ports = []
for spec in args:
    proto, _, rest = spec.partition(":")
    port, _, addr = rest.partition("@")
    addr = addr or default
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if addr == "::" else 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(port)))
    if proto == "tcp":
        s.listen(64)
    sel.register(s, selectors.EVENT_READ, proto)
    ports.append(str(s.getsockname()[1]))
print("ready", *ports, flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            if key.data == "tcp":
                c, _ = s.accept()
                c.sendall(b"ok\n")
                c.close()
            else:
                data, addr = s.recvfrom(2048)
                s.sendto(data, addr)
        except OSError:
            pass
"""

# One attempt: "tcp" connects and reads, "tfo" does so by sendto(MSG_FASTOPEN),
# "udp" sendto()s and reads the echo, "udpc" connect()s a UDP socket first.  Prints OK, TIMEOUT or "ERR <errno>".
CLIENT_PY = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM if proto in ("tcp", "tfo") else socket.SOCK_DGRAM)
s.settimeout(3)
try:
    if proto == "tcp":
        s.connect((host, port))
    elif proto == "tfo":  # TCP Fast Open: connect() inside sendto()
        s.settimeout(None)  # non-blocking, it would fail with EINPROGRESS after the SYN
        s.sendto(b"x", socket.MSG_FASTOPEN, (host, port))
        s.settimeout(3)
    elif proto == "udpc":
        s.connect((host, port))
        s.send(b"ping")
    else:
        s.sendto(b"ping", (host, port))
    s.recv(16)
    print("OK")
except socket.timeout:
    print("TIMEOUT")
except OSError as e:
    print("ERR", e.errno)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def assert_no_route_out(ns: str) -> None:
    """Prove by a routing lookup (no packet is sent) that ``ns`` has no way to the internet."""
    for family, addr in (("-4", "1.1.1.1"), ("-6", "2606:4700:4700::1111")):
        res = subprocess.run(["ip", "-n", ns, family, "route", "get", addr], capture_output=True, text=True)
        if res.returncode == 0 or "unreachable" not in res.stderr.lower():
            raise AssertionError(f"namespace {ns} has a route out: `ip -n {ns} {family} route get {addr}` "
                                 f"said {res.stdout.strip() or res.stderr.strip()!r}")


def _prefix(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def _joiner(cgroup_procs_files: Sequence[str]) -> Callable[[], None] | None:
    files = [str(f) for f in cgroup_procs_files]

    def join() -> None:  # runs in the child between fork and exec
        for path in files:
            with open(path, "w") as f:
                f.write(f"{os.getpid()}\n")

    return join if files else None


class Processes:
    """Processes started for a test, in a namespace or the host's, ended by PID on close."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._procs.clear()

    def start_server(self, ns: str | None, argv: Sequence[str]) -> subprocess.Popen[str]:
        """Start ``argv`` in ``ns`` (None: the host namespace); killed by PID on close.
        `ip netns exec` execs the command itself, so the PID is the server's."""
        proc = subprocess.Popen([*_prefix(ns), *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, text=True)
        self._procs.append(proc)
        return proc

    def start_listener(self, ns: str | None, specs: Iterable[str], bind: str | None = None) -> list[int]:
        """A SERVER_PY listener on ``tcp:PORT``/``udp:PORT[@ADDR]`` specs (port 0: any); returns the ports."""
        extra = ["--bind", bind] if bind else []
        proc = self.start_server(ns, [sys.executable, "-c", SERVER_PY, *extra, *specs])
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"test listener in {ns or 'the host namespace'} did not start")
        return [int(p) for p in line[1:]]

    def run_in(self, ns: str | None, argv: Sequence[str], cgroup_procs_files: Sequence[str] = (),
               timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``ns`` and in each given cgroup (joined before exec, so every
        socket it opens is born there)."""
        return subprocess.run([*_prefix(ns), *argv], capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_joiner(cgroup_procs_files))

    def attempt_in(self, ns: str | None, proto: str, host: str, port: int,
                   cgroup_procs_files: Sequence[str] = ()) -> str:
        """One CLIENT_PY connect/send from ``ns``: "OK", "TIMEOUT" or "ERR <errno>"."""
        res = self.run_in(ns, [sys.executable, "-c", CLIENT_PY, proto, host, str(port)], cgroup_procs_files)
        if res.returncode != 0:
            raise RuntimeError(f"test client failed: {res.stderr.strip()}")
        return res.stdout.strip()


def reap_stale_labs() -> None:
    """Remove the namespaces of test labs whose test process died without closing them."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in (line.split()[0] for line in listing.splitlines() if line.strip()):
        parts = name.split("-")
        if (len(parts) >= 3 and name.startswith("corral-test-") and parts[2].isdigit()
                and not pid_alive(int(parts[2]))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class TestNet(Processes):
    """The lab; use as a context manager.  ``client`` and ``server`` are namespace names."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        super().__init__()
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.client = f"corral-test-{tag}-c"
        self.server = f"corral-test-{tag}-s"
        self._veth = f"ct{secrets.token_hex(4)}"  # +c/+s: 11 characters
        self._made: list[str] = []

    def __enter__(self) -> Self:
        reap_stale_labs()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        c, s = self.client, self.server
        for ns in (c, s):
            ip("netns", "add", ns)
            self._made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        # Made inside the client namespace, so the host never holds either end.
        ip("-n", c, "link", "add", f"{self._veth}c", "type", "veth", "peer", "name", f"{self._veth}s",
           "netns", s)
        ip("-n", c, "addr", "add", f"{CLIENT_V4}/24", "dev", f"{self._veth}c")
        ip("-n", c, "addr", "add", f"{CLIENT_V6}/64", "dev", f"{self._veth}c", "nodad")
        ip("-n", s, "addr", "add", f"{SERVER_V4}/24", "dev", f"{self._veth}s")
        ip("-n", s, "addr", "add", f"{SERVER_V6}/64", "dev", f"{self._veth}s", "nodad")
        for addr in EXTRA_V4:
            ip("-n", s, "addr", "add", f"{addr}/32", "dev", "lo")
        for addr in EXTRA_V6:
            ip("-n", s, "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
        ip("-n", c, "link", "set", f"{self._veth}c", "up")
        ip("-n", s, "link", "set", f"{self._veth}s", "up")
        for addr in EXTRA_V4:
            ip("-n", c, "route", "add", f"{addr}/32", "via", SERVER_V4)
        for addr in EXTRA_V6:
            ip("-n", c, "-6", "route", "add", f"{addr}/128", "via", SERVER_V6)
        assert_no_route_out(c)
        assert_no_route_out(s)

    def close(self) -> None:
        super().close()
        for ns in self._made:  # the veth goes with its namespaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def attempt(self, proto: str, host: str, port: int, cgroup_procs_files: Sequence[str] = ()) -> str:
        """One connect/send from the client namespace: "OK", "TIMEOUT" or "ERR <errno>"."""
        return self.attempt_in(self.client, proto, host, port, cgroup_procs_files)
