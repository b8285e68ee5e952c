"""Network namespaces for sandboxes.

A :class:`NetNamespace` is a fresh ``ip netns`` namespace ``corral-<name>``
with loopback up and one veth pair to the host: a /30 from 100.64.0.0/10
(shared address space, chosen not to clash with the host's addresses or
routes), the host end at ``.1`` and the sandbox end at ``.2``.  There is no
default route inside unless ``route_out=True``: the sandbox can then reach
only its own loopback and the host end of its veth, and the egress guard
decides even that.  :class:`ExistingNetns` wraps a namespace someone else made
(``--netns NAME``), which corral never destroys.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from corral.errors import CorralError, HostError
from corral.sensor.host import left_by_dead_owner

PREFIX = "corral-"
POOL = ipaddress.IPv4Network("100.64.0.0/10")
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
LOCK_FILE = Path("/run/corral/netns.lock")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_STALE_RE = re.compile(rf"{PREFIX}sb-(\d+)-.+")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HostError("the `ip` command is missing: install iproute2 (make setup does)") from None
    if check and res.returncode != 0:
        raise CorralError(f"`ip {' '.join(args)}` failed: {res.stderr.strip() or res.returncode}")
    return res


def _ip_batch(options: list[str], commands: list[str]) -> None:
    """Run several `ip` commands in one process; the first failure stops the rest."""
    try:
        res = subprocess.run(["ip", *options, "-batch", "-"], input="\n".join(commands) + "\n",
                             capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HostError("the `ip` command is missing: install iproute2 (make setup does)") from None
    if res.returncode != 0:
        raise CorralError(f"`ip {' '.join(options)} -batch` failed: {res.stderr.strip() or res.returncode} "
                          f"(commands: {'; '.join(commands)})")


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = _ip("-j", *args).stdout.strip()
    data: list[dict[str, Any]] = json.loads(out) if out else []
    return data


def netns_names() -> list[str]:
    """Names in ``ip netns list`` (which prints "NAME" or "NAME (id: N)")."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def sandbox_netns_name(sandbox_id: int | str) -> str:
    """The name for a sandbox of this process: ``sb-<pid>-<id>``, reapable once we are gone."""
    return f"sb-{os.getpid()}-{sandbox_id}"


def _veth_names(netns: str) -> tuple[str, str]:
    """Host and sandbox ends, derived from the namespace name so reap_stale can find them.
    "cr" + 8 hex + "h"/"s" = 11 characters, under the 15 of IFNAMSIZ."""
    tag = hashlib.sha256(netns.encode()).hexdigest()[:8]
    return f"cr{tag}h", f"cr{tag}s"


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks a new /30 must not overlap: every address on the host and
    every specific route (broad ones such as a default or a VPN's /10 are fine:
    the /30 is more specific and only shadows itself)."""
    taken = []
    for link in _ip_json("-4", "addr", "show"):
        for a in link.get("addr_info", []):
            taken.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        net = ipaddress.IPv4Network(dst, strict=False)
        if net.prefixlen > POOL.prefixlen:
            taken.append(net)
    return [n for n in taken if n.overlaps(POOL)]


def _free_subnet(taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    for candidate in POOL.subnets(new_prefix=30):
        if not any(candidate.overlaps(n) for n in taken):
            return candidate
    raise CorralError(f"no free /30 left in {POOL} for a sandbox network: remove stale corral-* "
                      "namespaces (`ip netns list`; NetNamespace.reap_stale() removes those of dead "
                      "corral processes) or free addresses there")


@contextlib.contextmanager
def _netns_lock() -> Iterator[None]:
    """Serialise making and reaping namespaces between corral processes, so that two
    never pick the same /30 and a reaper never removes a namespace half made."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class NetNamespace:
    """A network namespace corral made for a sandbox; :meth:`destroy` removes it."""

    def __init__(self, name: str, *, route_out: bool = False) -> None:
        if not _NAME_RE.fullmatch(name):
            raise CorralError(f"bad network namespace name {name!r}: use up to 64 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")
        self.name = PREFIX + name
        self.host_veth, self.sandbox_veth = _veth_names(self.name)
        self.route_out = route_out
        self._subnet: ipaddress.IPv4Network | None = None
        self._owned = False  # set once `ip netns add` made it ours: never remove another's
        if (NETNS_RUN / self.name).exists():
            raise CorralError(f"network namespace {self.name} already exists: remove it with "
                              f"`ip netns del {self.name}` if nothing uses it")
        if _link_exists(self.host_veth):
            raise CorralError(f"interface {self.host_veth} (for {self.name}) already exists: remove it "
                              f"with `ip link del {self.host_veth}`")
        try:
            with _netns_lock():
                self._create()
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> None:
        # Two `ip -batch` runs (host side, then inside) instead of one `ip` per
        # step: a sandbox is made per rollout, and each process start costs ms.
        self._subnet = _free_subnet(_taken_networks())
        self._owned = True  # from here on, destroy() removes whatever part exists
        _ip_batch([], [
            f"netns add {self.name}",
            f"link add {self.host_veth} type veth peer name {self.sandbox_veth} netns {self.name}",
            f"addr add {self.host_address}/30 dev {self.host_veth}",
            f"link set {self.host_veth} up",
        ])
        inside = ["link set lo up", f"addr add {self.sandbox_address}/30 dev {self.sandbox_veth}",
                  f"link set {self.sandbox_veth} up"]
        if self.route_out:
            # Only a route: whether packets go further is the host's forwarding/NAT, not ours.
            inside.append(f"route add default via {self.host_address}")
        _ip_batch(["-n", self.name], inside)
        self.etc_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        if self._subnet is None:
            raise CorralError(f"network namespace {self.name} has no addresses yet")
        return self._subnet

    @property
    def host_address(self) -> ipaddress.IPv4Address:
        """The host end of the veth, as the sandbox sees the host."""
        return self.subnet.network_address + 1

    @property
    def sandbox_address(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2

    @property
    def etc_dir(self) -> Path:
        """Files here are bind-mounted over /etc by ``ip netns exec`` (resolv.conf, hosts)."""
        return NETNS_ETC / self.name

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def destroy(self) -> None:
        """Remove the veth, the namespace and its /etc/netns files; safe to call twice."""
        if not self._owned:
            return
        _remove(self.name)
        self._owned = False

    @staticmethod
    def reap_stale() -> list[str]:
        """Remove namespaces ``corral-sb-<pid>-*`` whose corral process is gone; returns their names."""
        reaped = []
        with _netns_lock():
            for name in netns_names():
                m = _STALE_RE.fullmatch(name)
                if m and left_by_dead_owner(NETNS_RUN / name, int(m.group(1))):
                    _remove(name)
                    reaped.append(name)
        return reaped



def _remove(netns: str) -> None:
    # Deleting the host end deletes its peer too, even if a leftover process
    # keeps the namespace itself alive after `ip netns del`.
    host_veth, _ = _veth_names(netns)
    if _link_exists(host_veth):
        _ip("link", "del", host_veth, check=False)
    if (NETNS_RUN / netns).exists():
        res = _ip("netns", "del", netns, check=False)
        if res.returncode != 0 and (NETNS_RUN / netns).exists():
            raise CorralError(f"could not remove network namespace {netns}: {res.stderr.strip()}; "
                              f"try `ip netns del {netns}`")
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


class ExistingNetns:
    """A namespace made outside corral (``--netns NAME``); corral never removes it."""

    def __init__(self, name: str) -> None:
        names = netns_names()
        if name not in names:
            known = ", ".join(names) or "none"
            raise CorralError(f"network namespace {name!r} does not exist (ip netns list: {known}): "
                              f"create it with `ip netns add {name}` or leave out --netns")
        self.name = name

    @property
    def host_address(self) -> None:
        """Unknown: corral did not wire this namespace."""
        return None

    @property
    def sandbox_address(self) -> None:
        return None

    @property
    def etc_dir(self) -> Path:
        return NETNS_ETC / self.name

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def destroy(self) -> None:
        """Nothing to do: the namespace belongs to whoever made it."""
