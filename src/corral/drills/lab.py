"""The drill lab: a small fake world with no route out, for drills and the demo.

Two network namespaces joined by one veth, and nothing else (the host holds neither end):

    NAME (the sandbox side)    10.20.0.2/24 on eth0; routes to the lab's documentation networks
                               and metadata addresses via 10.20.0.1, and no default route.
                               `corral run --netns NAME` runs a sandbox here.
    NAME-world (everything else, on documentation and private addresses):
        203.0.113.10   "internet" relay: real OpenSSH on 22 and 443 (key login for the keys the
                       lab is told about, forwarding allowed, every request logged; no shell)
        198.51.100.20  stratum mining pool on 3333 and 443
        198.51.100.30  HTTP upload sink on 80 and 8080
        203.0.113.66   reverse-shell catcher on 4444 and 9001
        198.51.100.53  DNS: pool and tunnel names (pool.supportxmr.example -> 198.51.100.20, ...)
        10.20.0.10-12  the "internal network": 22, 2375, 6379, 6443, 8265, 10250 on each
        169.254.169.254, 100.100.100.200   cloud metadata stubs on 80

Both namespaces are proved to have no route out (a routing lookup, no packet sent) before any
server starts, and again whenever the lab is found up.  Every server logs each access under the
lab's state directory (``logs/KIND.jsonl``, ``sshd/sshd.log``), so a drill can tell an attack that
was prevented from one that happened.

The state file (``STATE_ROOT/NAME/state.json``) lets another process find a lab that is up: ``up``
is idempotent, ``down`` removes the namespaces, the servers (by PID) and the state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from corral.errors import CorralError, HostError
from corral.sensor.host import proc_stat

DEFAULT_NAME = "corral-lab"
#: Under corral's state directory (CORRAL_STATE_DIR), not /run: sshd gets a private tmpfs on /run
#: (it wants /run/sshd), which would hide its own files there.
STATE_ROOT = Path(os.environ.get("CORRAL_STATE_DIR", "/var/lib/corral")) / "lab"
SERVERS_PY = Path(__file__).with_name("servers.py")
SSHD = "/usr/sbin/sshd"

GATEWAY = "10.20.0.1"  # the world's end of the link: the sandbox side's router
CLIENT_ADDR = "10.20.0.2"
INTERNAL_NET = "10.20.0.0/24"
INTERNAL_HOSTS = ("10.20.0.10", "10.20.0.11", "10.20.0.12")
INTERNAL_PORTS = (22, 2375, 6379, 6443, 8265, 10250)
SSH_HOST, SSH_PORTS = "203.0.113.10", (22, 443)
POOL_HOST, POOL_PORTS = "198.51.100.20", (3333, 443)
SINK_HOST, SINK_PORTS = "198.51.100.30", (80, 8080)
SHELL_HOST, SHELL_PORTS = "203.0.113.66", (4444, 9001)
DNS_HOST = "198.51.100.53"
METADATA_HOSTS = ("169.254.169.254", "100.100.100.200")
WORLD_HOSTS = (SSH_HOST, POOL_HOST, SINK_HOST, SHELL_HOST, DNS_HOST, *METADATA_HOSTS)
#: what the sandbox side routes into the world; everything else is unreachable
ROUTED = ("198.51.100.0/24", "203.0.113.0/24", *(f"{h}/32" for h in METADATA_HOSTS))
#: addresses that must be unreachable from both namespaces: the internet, and this host's own network
#: (192.0.2.0/24 is this host's eth0 here: lab addresses never go there)
MUST_NOT_ROUTE = (("-4", "1.1.1.1"), ("-4", "192.0.2.2"), ("-6", "2606:4700:4700::1111"))

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}")
_READY_TIMEOUT_S = 10.0
Progress = Callable[[str], None]


def server_specs() -> list[str]:
    """What the servers process listens on (corral.drills.servers specs)."""
    specs = [f"pool@{POOL_HOST}:{p}" for p in POOL_PORTS]
    specs += [f"http@{SINK_HOST}:{p}" for p in SINK_PORTS]
    specs += [f"http@{h}:80" for h in METADATA_HOSTS]
    specs += [f"shell@{SHELL_HOST}:{p}" for p in SHELL_PORTS]
    specs += [f"dns@{DNS_HOST}:53"]
    specs += [f"service@{h}:{p}" for h in INTERNAL_HOSTS for p in INTERNAL_PORTS]
    return specs


def _ip(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(["ip", *args], input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HostError("the `ip` command is missing: install iproute2 (make setup does)") from None
    if check and res.returncode != 0:
        raise CorralError(f"`ip {' '.join(args)}` failed: {res.stderr.strip() or res.returncode}")
    return res


def _batch(netns: str | None, commands: list[str]) -> None:
    """Several `ip` commands in one process (each process start costs ms)."""
    _ip(*(["-n", netns] if netns else []), "-batch", "-", input="\n".join(commands) + "\n")


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def assert_no_route_out(netns: str) -> None:
    """Prove by routing lookups (no packet is sent) that `netns` reaches neither the internet nor
    this host's networks; raise CorralError otherwise.  Run before anything runs in the lab."""
    for family, addr in MUST_NOT_ROUTE:
        res = _ip("-n", netns, family, "route", "get", addr, check=False)
        if res.returncode == 0 or "unreachable" not in res.stderr.lower():
            raise CorralError(f"refusing to use the lab: namespace {netns} has a route to {addr} "
                              f"(`ip -n {netns} {family} route get {addr}`: "
                              f"{res.stdout.strip() or res.stderr.strip()!r})")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, an identity that survives
    pid reuse (a recycled pid has a later start time)."""
    fields = proc_stat(pid)
    if fields is None or fields[0] == b"Z":
        return None  # gone, or a zombie, which runs nothing
    return int(fields[19])


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in map(int, children):
        out.append(child)
        out += _descendants(child)
    return out


def _processes_in(netns: str) -> list[int]:
    """Pids of processes whose network namespace is `netns`."""
    try:
        target = os.stat(f"/run/netns/{netns}")
    except OSError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(entry / "ns" / "net")
                if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                    pids.append(int(entry.name))
    return pids


class Lab:
    """The lab, found by name.  As a context manager it brings the lab up and, if it made it, down.

        with Lab() as lab:
            lab.authorize_key(public_key)
            sandbox = Sandbox(netns=lab.client, ...)
            ...
            lab.accesses("pool")   # what the fake pool saw
    """

    def __init__(self, name: str = DEFAULT_NAME, *, state_root: Path | None = None,
                 progress: Progress | None = None) -> None:
        if not _NAME_RE.fullmatch(name):
            raise CorralError(f"bad lab name {name!r}: up to 41 letters, digits, '.', '_' or '-'")
        self.name = name
        self.client = name  # what `corral run --netns` takes
        self.world = f"{name}-world"
        self.state_dir = (state_root or STATE_ROOT) / name
        self.log_dir = self.state_dir / "logs"
        self.sshd_dir = self.state_dir / "sshd"
        self.state_file = self.state_dir / "state.json"
        self._lock_file = (state_root or STATE_ROOT) / f".{name}.lock"
        self._progress = progress or (lambda _: None)
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []  # (what, process) started here
        self.made = False  # whether this object brought the lab up (and so takes it down on exit)

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> Self:
        self.made = self.up()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.made:
            self.down()

    # -- lifecycle ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One up/down at a time per lab, across processes."""
        self._lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_file, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def up(self) -> bool:
        """Bring the lab up unless it is up already (then only re-prove it has no route out).
        Returns True if this call made it.  A half-made or broken lab is removed and made again."""
        if os.geteuid() != 0:
            raise HostError("the lab needs root (network namespaces, sshd)")
        with self._locked():
            if self._read_state() is None and (netns_exists(self.client) or netns_exists(self.world)):
                raise CorralError(f"network namespace {self.client} or {self.world} exists but is no corral lab "
                                  "(it has no state file): remove it (`ip netns del NAME`) or choose another --name")
            problems = self._problems()
            if not problems:
                assert_no_route_out(self.client)
                assert_no_route_out(self.world)
                return False
            if self.state_file.exists() or netns_exists(self.client) or netns_exists(self.world):
                self._progress(f"lab {self.name} is broken ({'; '.join(problems)}): removing it first")
                self._teardown()
            try:
                self._build()
            except BaseException:
                self._teardown()
                raise
            return True

    def down(self) -> list[str]:
        """Remove the lab: its servers (by PID), namespaces and state directory.  Returns what was
        removed.  Processes of others still in its namespaces are left alone (and named)."""
        with self._locked():
            return self._teardown()

    def is_up(self) -> bool:
        return not self._problems()

    def _problems(self) -> list[str]:
        """What is missing or dead; empty when the lab is up and whole."""
        state = self._read_state()
        if state is None:
            return ["no state file"]
        problems = [f"namespace {ns} is missing" for ns in (self.client, self.world) if not netns_exists(ns)]
        if not state.get("processes"):
            problems.append("it was never finished (its servers were not started)")
        for role, (pid, started) in state.get("processes", {}).items():
            if _start_time(pid) != started:
                problems.append(f"{role} (pid {pid}) is not running")
        return problems

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
            return state
        except (OSError, ValueError):
            return None

    def _build(self) -> None:
        started = time.monotonic()
        self._progress(f"lab {self.name}: making namespaces {self.client} and {self.world}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)
        # The state file first: whatever happens next, a later up/down knows what to remove.
        self._write_state({})
        _ip("netns", "add", self.client)
        _ip("netns", "add", self.world)
        _batch(self.client, [
            "link set lo up",
            # Made inside the namespaces: the host never holds either end.
            f"link add eth0 type veth peer name lab0 netns {self.world}",
            f"addr add {CLIENT_ADDR}/24 dev eth0",
            "link set eth0 up",
        ])
        _batch(self.world, [
            "link set lo up",
            f"addr add {GATEWAY}/24 dev lab0",
            *(f"addr add {h}/24 dev lab0" for h in INTERNAL_HOSTS),  # on the link: neighbours of the sandbox
            "link set lab0 up",
            *(f"addr add {h}/32 dev lo" for h in WORLD_HOSTS),
        ])
        _batch(self.client, [f"route add {net} via {GATEWAY}" for net in ROUTED])
        assert_no_route_out(self.client)
        assert_no_route_out(self.world)
        # `ip netns exec NAME` shows these over /etc: sandboxes in the lab resolve with the lab's DNS.
        etc = Path("/etc/netns", self.client)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {DNS_HOST}\n")

        self._progress(f"lab {self.name}: starting the fake servers and sshd")
        processes = {"servers": self._start_servers(), "sshd": self._start_sshd()}
        self._wait_ready()
        self._write_state({role: [pid, _start_time(pid)] for role, pid in processes.items()})
        self._progress(f"lab {self.name}: up in {time.monotonic() - started:.1f} s")

    def _write_state(self, processes: dict[str, list[int | None]]) -> None:
        state = {"name": self.name, "client": self.client, "world": self.world, "created": time.time(),
                 "created_by": os.getpid(), "processes": processes, "logs": str(self.log_dir)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.state_file)

    def _spawn(self, what: str, argv: list[str], output: Path) -> int:
        """Start a lab process in the world namespace, detached (its own session: it outlives a
        `corral lab up` and ignores the terminal's Ctrl-C); returns its pid."""
        with open(output, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.world, *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        self._children.append((what, proc))
        return proc.pid  # `ip netns exec` execs the command: this is the server's pid

    def _start_servers(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, str(SERVERS_PY), "--log-dir", str(self.log_dir), *server_specs()]
        return self._spawn("fake servers", argv, self.state_dir / "servers.out")

    def _start_sshd(self) -> int:
        if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
            raise HostError("the lab needs OpenSSH (openssh-server, openssh-client): make setup installs them")
        d = self.sshd_dir
        d.mkdir(parents=True, exist_ok=True)
        key = d / "host_ed25519"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corral-lab", "-f", str(key)],
                           check=True, capture_output=True, timeout=30)
        keys = d / "authorized_keys"
        keys.touch()
        keys.chmod(0o644)
        listen = "".join(f"ListenAddress {SSH_HOST}:{p}\n" for p in SSH_PORTS)
        # Key login only, for the keys in authorized_keys; forwarding allowed (that is what a drill
        # tests) and logged at DEBUG1 ("tcpip-forward"); no shell, command or subsystem runs, ever.
        (d / "sshd_config").write_text(
            f"{listen}HostKey {key}\nPidFile none\nUsePAM no\nStrictModes no\n"
            f"PubkeyAuthentication yes\nAuthorizedKeysFile {keys}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
            "GatewayPorts no\nPermitTTY no\nX11Forwarding no\nAllowAgentForwarding no\nPermitTunnel no\n"
            "PermitUserRC no\nAllowStreamLocalForwarding no\nForceCommand echo 'corral lab: no shell here'\n"
            "LoginGraceTime 10\nClientAliveInterval 10\nLogLevel DEBUG1\n")
        # sshd wants /run/sshd: `ip netns exec` gives it a mount namespace of its own, where a tmpfs on
        # /run hides nothing from the host.
        return self._spawn("sshd", ["sh", "-c", "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && "
                                        f"exec {SSHD} -D -E {d / 'sshd.log'} -f {d / 'sshd_config'}"],
                           d / "sshd.out")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        want_sshd = [f"Server listening on {SSH_HOST} port {p}." for p in SSH_PORTS]
        while True:
            servers = _read(self.state_dir / "servers.out")
            sshd = _read(self.sshd_dir / "sshd.log")
            if servers.startswith("ready") and all(w in sshd for w in want_sshd):
                return
            for what, proc in self._children:
                if proc.poll() is not None:
                    raise CorralError(f"the lab's {what} exited at start: "
                                      f"{(servers + _read(self.sshd_dir / 'sshd.out') + sshd)[-600:].strip()}")
            if time.monotonic() > deadline:
                raise CorralError(f"the lab's servers did not start within {_READY_TIMEOUT_S:.0f} s: "
                                  f"{(servers + sshd)[-600:].strip()}")
            time.sleep(0.02)

    def _teardown(self) -> list[str]:
        """Remove what the state file says the lab is (only then its namespaces: a namespace of that
        name without one is someone else's), and any server this object started."""
        removed = []
        state = self._read_state() or {}
        for role, (pid, started) in state.get("processes", {}).items():
            if started is not None and _start_time(pid) == started:
                self._end(pid)
                removed.append(f"{role} (pid {pid})")
        for _, proc in self._children:  # ours, also if the state file never got their pids
            if proc.poll() is None:
                self._end(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._children.clear()
        for ns in (self.client, self.world) if state else ():
            if netns_exists(ns):
                others = _processes_in(ns)
                if others:  # not ours to kill; the namespace lives on (unreachable) until they exit
                    removed.append(f"note: {len(others)} process(es) still in {ns}: pids "
                                   f"{' '.join(map(str, others[:10]))}")
                _ip("netns", "del", ns, check=False)  # its veth end goes with it
                removed.append(f"namespace {ns}")
        if state:
            shutil.rmtree(Path("/etc/netns", self.client), ignore_errors=True)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)
            removed.append(f"state {self.state_dir}")
        with contextlib.suppress(OSError):
            self._lock_file.unlink()
        with contextlib.suppress(OSError):
            self._lock_file.parent.rmdir()  # if no other lab is left
        return removed

    @staticmethod
    def _end(pid: int) -> None:
        """End a lab process and what it started (sshd's per-connection children): TERM, then KILL."""
        tree = [*_descendants(pid), pid]
        identity = {p: _start_time(p) for p in tree}
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(_start_time(p) == s for p, s in identity.items()):
            time.sleep(0.02)
        for p, s in identity.items():
            if s is not None and _start_time(p) == s:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    # -- using it ------------------------------------------------------------------------

    def check_no_route_out(self) -> None:
        """Raise CorralError unless both namespaces are proved to have no route out."""
        assert_no_route_out(self.client)
        assert_no_route_out(self.world)

    def authorize_key(self, public_key: str) -> None:
        """Let this SSH public key log in to the lab's sshd (which then allows forwarding)."""
        keys = self.sshd_dir / "authorized_keys"
        with self._locked():
            lines = _read(keys).splitlines()
            if public_key.strip() not in lines:
                keys.write_text("".join(f"{line}\n" for line in [*lines, public_key.strip()] if line))

    def revoke_key(self, public_key: str) -> None:
        keys = self.sshd_dir / "authorized_keys"
        with self._locked():
            if keys.exists():
                keys.write_text("".join(f"{line}\n" for line in _read(keys).splitlines()
                                        if line and line != public_key.strip()))

    def accesses(self, server: str | None = None) -> list[dict[str, Any]]:
        """What the lab's servers saw: the fake servers' JSON lines (kinds pool, http, shell, service,
        dns), oldest first, after sshd's connections, logins and forwarding requests (server "sshd",
        from its log, whose lines carry no time)."""
        records: list[dict[str, Any]] = []
        if server in (None, "sshd"):
            records += sshd_records(_read(self.sshd_dir / "sshd.log"))
        if server != "sshd":
            files = sorted(self.log_dir.glob("*.jsonl")) if server is None else [self.log_dir / f"{server}.jsonl"]
            for path in files:
                for line in _read(path).splitlines():
                    with contextlib.suppress(ValueError):
                        records.append(json.loads(line))
        return sorted(records, key=lambda r: str(r.get("time", "")))

    def status(self) -> dict[str, Any]:
        """Whether the lab is up, what is wrong if not, where everything is, and access counts."""
        problems = self._problems()
        counts: dict[str, int] = {}
        if self.state_dir.exists():
            for record in self.accesses():
                counts[record["server"]] = counts.get(record["server"], 0) + 1
        return {"name": self.name, "up": not problems, "problems": problems, "client_netns": self.client,
                "world_netns": self.world, "state_dir": str(self.state_dir), "logs": str(self.log_dir),
                "authorized_keys": str(self.sshd_dir / "authorized_keys"), "accesses": counts,
                "services": services()}


def agent_key(comment: str) -> tuple[str, str]:
    """A fresh ed25519 key pair (private, public) for an agent's tunnels to the lab's sshd
    (authorize_key() lets it in)."""
    with tempfile.TemporaryDirectory(prefix="corral-agent-key-") as d:
        key = Path(d) / "key"
        try:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                           check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CorralError(f"ssh-keygen failed ({exc}): the lab's drills need openssh-client (make setup)") from None
        return key.read_text(), key.with_suffix(".pub").read_text()


def services() -> list[tuple[str, str, str]]:
    """(what, where, note) of everything in the lab, for people."""
    ports = ",".join
    return [
        ("ssh relay", f"{SSH_HOST}:{ports(map(str, SSH_PORTS))}", "OpenSSH: key login, forwarding allowed, no shell"),
        ("mining pool", f"{POOL_HOST}:{ports(map(str, POOL_PORTS))}", "stratum v1 and XMRig login"),
        ("upload sink", f"{SINK_HOST}:{ports(map(str, SINK_PORTS))}", "HTTP: POST/PUT swallowed"),
        ("reverse-shell catcher", f"{SHELL_HOST}:{ports(map(str, SHELL_PORTS))}", "sends one harmless command"),
        ("DNS", f"{DNS_HOST}:53", "pool.supportxmr.example, relay.tunnel.example, ..."),
        ("internal network", f"{INTERNAL_HOSTS[0]}-{INTERNAL_HOSTS[-1].rsplit('.', 1)[1]}",
         "ports " + " ".join(map(str, INTERNAL_PORTS))),
        ("metadata", " ".join(f"{h}:80" for h in METADATA_HOSTS), "AWS and Alibaba Cloud paths"),
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


_SSHD_PATTERNS = (
    ("connect", re.compile(r"Connection from (\S+) port (\d+) on (\S+) port (\d+)")),
    ("login", re.compile(r"Accepted publickey for (\S+) from (\S+) port (\d+)")),
    ("forward", re.compile(r"server_input_global_request: rtype (tcpip-forward|streamlocal-forward@openssh\.com)")),
    ("forward", re.compile(r"server_request_direct_tcpip: originator (\S+) port (\d+), target (\S+) port (\d+)")),
)


def sshd_records(text: str) -> list[dict[str, Any]]:
    """sshd's log lines that say who connected, logged in or asked for forwarding."""
    out = []
    for line in text.splitlines():
        for what, pattern in _SSHD_PATTERNS:
            if pattern.search(line):
                out.append({"server": "sshd", "what": what, "line": line.strip()})
                break
    return out
