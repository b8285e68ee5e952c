"""Default-deny network egress per sandbox, decided in the kernel.

:class:`EgressGuard` loads ``bpf/egress.bpf.c`` (cgroup connect4/6 and
sendmsg4/6 programs, and cgroup_skb egress/ingress) and attaches it once to
``<cgroup v2 root>/corral``; every sandbox cgroup below it is then judged by
its sandbox's mode and lists before a packet leaves.  A denied ``connect()`` or
UDP ``sendto()`` fails with EPERM.  In ``Mode.CUT`` every packet of the
sandbox's sockets is also dropped, both ways, so flows established before the
cut stall too.  Map layouts mirror ``bpf/egress.h``.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import os
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError
from corral.sensor.cgroups import attach_to_corral_cgroup
from corral.sensor.guard import U32, CgroupGuard
from corral.sensor.libbpf import Map

DEFAULT_OBJECT = Path(__file__).parent.parent / "_bpf" / "egress.bpf.o"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(enum.IntEnum):
    OBSERVE = 0  # allow everything, count what ENFORCE would deny
    ENFORCE = 1  # deny what the allow list does not admit
    CUT = 2      # deny everything, allowed or not, and drop established flows


class RuleError(CorralError, ValueError):
    """An egress rule that cannot be parsed; the message shows the accepted forms."""


_FORMS = "expected ADDR, CIDR, ADDR:PORT, CIDR:PORT or [IPv6 ADDR or CIDR]:PORT"
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True)
class Rule:
    """A destination: a network and a port (0 = any port)."""

    network: Network
    port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise RuleError(f"port {self.port} is out of range (0-65535; 0 means any port)")
        # The kernel judges ::ffff:a.b.c.d by the IPv4 lists, so keep such rules there.
        net = self.network
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
            v4 = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
            object.__setattr__(self, "network", v4)

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``198.51.100.7:22``, ``10.0.0.0/8``, ``[2001:db8::1]:443``, ``2001:db8::/32``."""
        s = text.strip()
        addr, port = s, "0"
        if s.startswith("["):
            addr, sep, rest = s[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise RuleError(f"bad egress rule {text!r}: {_FORMS}")
            port = rest[1:] if rest else "0"
        elif s.count(":") == 1:  # IPv4 with a port; bare IPv6 has two or more colons
            addr, port = s.split(":")
        if not port.isdigit():
            raise RuleError(f"bad port in egress rule {text!r}: {_FORMS}")
        try:
            network = ipaddress.ip_network(addr)
        except ValueError as exc:
            hint = ("domain names are resolved by the policy, not here; "
                    if addr and any(c.isalpha() for c in addr) and "." in addr and ":" not in addr else "")
            raise RuleError(f"bad egress rule {text!r} ({exc}): {hint}{_FORMS}") from None
        return cls(network, int(port))

    def __str__(self) -> str:
        net = str(self.network)
        if not self.port:
            return net
        return f"[{net}]:{self.port}" if self.network.version == 6 else f"{net}:{self.port}"


def _rules(*specs: str) -> tuple[Rule, ...]:
    return tuple(Rule.parse(s) for s in specs)


# Destinations no sandbox may reach, whatever its allow list says (deny wins).
ALWAYS_DENIED: tuple[Rule, ...] = _rules(
    "169.254.169.254/32",    # instance metadata: AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
    "169.254.170.2/32",      # AWS ECS task credentials
    "100.100.100.200/32",    # Alibaba Cloud metadata
    "[fd00:ec2::254]:0",     # AWS metadata over IPv6
    "[64:ff9b::a9fe:a9fe]:0",  # 169.254.169.254 through NAT64
    "0.0.0.0/0:2375",        # Docker API (plain), on any host: owning it owns the host
    "0.0.0.0/0:2376",        # Docker API (TLS)
    "[::/0]:2375",
    "[::/0]:2376",
)

# struct egress_key4/6: prefixlen, sandbox_id (host order), port (network order), pad, addr.
_KEY_HEAD = struct.Struct("=II")
_KEY_PORT = struct.Struct("!HH")
_KEY_FIXED_BITS = 64
_KEY_ADDR_OFFSET = _KEY_HEAD.size + _KEY_PORT.size
_KEY4_SIZE, _KEY6_SIZE = _KEY_ADDR_OFFSET + 4, _KEY_ADDR_OFFSET + 16
_COUNTERS = struct.Struct("=QQQ")
_PROGRAMS = {"cgroup/connect4", "cgroup/connect6", "cgroup/sendmsg4", "cgroup/sendmsg6",
             "cgroup_skb/egress", "cgroup_skb/ingress"}


def _key(sandbox_id: int, rule: Rule) -> bytes:
    net = rule.network
    return (_KEY_HEAD.pack(_KEY_FIXED_BITS + net.prefixlen, sandbox_id)
            + _KEY_PORT.pack(rule.port, 0) + net.network_address.packed)


def _key_sandbox(key: bytes) -> int:
    sandbox_id: int = _KEY_HEAD.unpack_from(key)[1]
    return sandbox_id


def object_path() -> Path:
    return Path(os.environ.get("CORRAL_EGRESS_OBJECT", DEFAULT_OBJECT))


class EgressGuard(CgroupGuard):
    """The egress programs of one corral process and the policy of its sandboxes.

    Cgroups not bound to one of this guard's sandboxes are never touched, so
    several guards (several corral processes) can be attached at once.  Methods
    may be called from several threads (the DNS resolver allows and revokes).
    """

    WHAT = "egress guard"

    def __init__(self, path: Path | None = None) -> None:
        # How many times each allow entry was granted: the same address can be
        # both a static rule and a DNS answer, and expiry of one must not revoke the other.
        self._grants: Counter[tuple[int, Rule]] = Counter()
        super().__init__(path or object_path(), lambda obj: attach_to_corral_cgroup(obj, _PROGRAMS))
        self._mode = self._maps["sandbox_mode"]
        self._counters = self._maps["counters"]
        self._allow = {4: self._maps["allow4"], 6: self._maps["allow6"]}
        self._deny = {4: self._maps["deny4"], 6: self._maps["deny6"]}

    @contextlib.contextmanager
    def _open(self, sandbox_id: int | None = None) -> Iterator[None]:
        """Hold the lock while maps are used; check the guard is open and the sandbox known."""
        with self._lock:
            self._check_closed()
            if sandbox_id is not None and self._mode.lookup(U32.pack(sandbox_id), U32.size) is None:
                raise CorralError(f"sandbox {sandbox_id} is not known to the egress guard: "
                                  "call add_sandbox() first")
            yield

    # -- sandboxes and their cgroups ----------------------------------------

    def add_sandbox(self, sandbox_id: int, mode: Mode, cgroup_ids: Iterable[int] = ()) -> None:
        """Start guarding a sandbox: empty allow list, ALWAYS_DENIED, zeroed counters."""
        self._check_id(sandbox_id)
        key = U32.pack(sandbox_id)
        with self._open():
            if self._mode.lookup(key, U32.size) is not None:
                raise CorralError(f"sandbox {sandbox_id} is already guarded: remove_sandbox() it first")
            # The whole policy goes in before the mode (which makes the sandbox
            # known) and the cgroups (which make it apply).
            for rule in ALWAYS_DENIED:
                self._deny[rule.network.version].update(_key(sandbox_id, rule), U32.pack(1))
            self._counters.update(key, _COUNTERS.pack(0, 0, 0))
            self._mode.update(key, U32.pack(Mode(mode)))
            for cgroup_id in cgroup_ids:
                self.bind_cgroup(cgroup_id, sandbox_id)

    def set_mode(self, sandbox_id: int, mode: Mode) -> None:
        """Switch mode in one map update; ``Mode.CUT`` cuts the sandbox's network at once,
        established flows included (their packets are dropped until the mode changes back)."""
        with self._open(sandbox_id):
            self._mode.update(U32.pack(sandbox_id), U32.pack(Mode(mode)))

    def remove_sandbox(self, sandbox_id: int) -> None:
        """Forget every entry of the sandbox: cgroups, lists, mode and counters."""
        with self._open():
            self._unbind_sandbox(sandbox_id)
            for trie, size in self._tries():
                for key in [k for k in trie.keys(size) if _key_sandbox(k) == sandbox_id]:
                    trie.delete(key)
            self._mode.delete(U32.pack(sandbox_id))
            self._counters.delete(U32.pack(sandbox_id))
            for grant in [g for g in self._grants if g[0] == sandbox_id]:
                del self._grants[grant]

    def _tries(self) -> list[tuple[Map, int]]:
        return [(self._allow[4], _KEY4_SIZE), (self._allow[6], _KEY6_SIZE),
                (self._deny[4], _KEY4_SIZE), (self._deny[6], _KEY6_SIZE)]

    # -- lists ---------------------------------------------------------------

    def allow(self, sandbox_id: int, rule: Rule) -> None:
        """Admit a destination.  Grants are counted: each allow() needs its own revoke()."""
        with self._open(sandbox_id):
            self._allow[rule.network.version].update(_key(sandbox_id, rule), U32.pack(1))
            self._grants[sandbox_id, rule] += 1

    def revoke(self, sandbox_id: int, rule: Rule) -> None:
        """Take back one allow() of exactly this rule; the entry goes with the last one."""
        with self._open(sandbox_id):
            if self._grants[sandbox_id, rule] > 1:
                self._grants[sandbox_id, rule] -= 1
                return
            self._grants.pop((sandbox_id, rule), None)
            self._allow[rule.network.version].delete(_key(sandbox_id, rule))

    def deny(self, sandbox_id: int, rule: Rule) -> None:
        """Refuse a destination even where an allow entry would admit it."""
        with self._open(sandbox_id):
            self._deny[rule.network.version].update(_key(sandbox_id, rule), U32.pack(1))

    def counters(self, sandbox_id: int) -> dict[str, int]:
        """Decisions so far: ``allowed``, ``denied`` and ``would_deny`` (observe mode)."""
        with self._open(sandbox_id):
            raw = self._counters.lookup(U32.pack(sandbox_id), _COUNTERS.size)
        allowed, denied, would_deny = _COUNTERS.unpack(raw) if raw else (0, 0, 0)
        return {"allowed": allowed, "denied": denied, "would_deny": would_deny}

    def rules(self, sandbox_id: int) -> dict[str, list[Rule]]:
        """The sandbox's ``allow`` and ``deny`` entries as the kernel holds them."""
        out: dict[str, list[Rule]] = {"allow": [], "deny": []}
        with self._open(sandbox_id):
            for name, tries in (("allow", self._allow), ("deny", self._deny)):
                for trie in tries.values():
                    size = _KEY4_SIZE if trie is tries[4] else _KEY6_SIZE
                    for key in trie.keys(size):
                        prefixlen, sid = _KEY_HEAD.unpack_from(key)
                        if sid == sandbox_id:
                            port = _KEY_PORT.unpack_from(key, _KEY_HEAD.size)[0]
                            addr = ipaddress.ip_address(key[_KEY_ADDR_OFFSET:])
                            net = ipaddress.ip_network((addr, prefixlen - _KEY_FIXED_BITS))
                            out[name].append(Rule(net, port))
        return out


__all__ = ["ALWAYS_DENIED", "EgressGuard", "Mode", "Rule", "RuleError"]
