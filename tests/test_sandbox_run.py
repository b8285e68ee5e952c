"""corral run / corral.Sandbox end to end: containment, egress, domains, steps, cleanup.

Test hosts live in the lab (tests/netlab.py): namespaces with no route out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import TestNet, assert_no_route_out

from corral import events as ev
from corral.sandbox.runner import STATE_DIR, Sandbox
from corral.sensor.cgroups import corral_cgroup
from corral.sensor.host import cgroup2_root

CORRAL = str(Path(sys.executable).parent / "corral")
HOST = "198.51.100.10"
OTHER = "198.51.100.11"

CONNECT = ("import socket, sys\n"
           "try:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('OK')\n"
           "except OSError as e:\n    print('ERR', e.errno)")


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[TestNet, int]]:
    with TestNet() as net:
        (port,) = net.start_listener(net.server, ["tcp:0"])
        yield net, port


def connect(sb: Sandbox, host: str, port: int) -> str:
    return sb.exec(["python3", "-c", CONNECT, host, str(port)]).stdout.strip()


def leftovers(name: str) -> list[str]:
    found = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/corral/{name}")]
    found += [str(p) for p in (cgroup2_root() / "corral").glob(name)]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [line for line in netns.splitlines() if name in line]
    if (STATE_DIR / "sandboxes" / name).exists():
        found.append(str(STATE_DIR / "sandboxes" / name))
    return found


def test_enforce_allows_only_the_allow_list(lab: tuple[TestNet, int]) -> None:
    net, port = lab
    with Sandbox(netns=net.client, allow=[f"{HOST}:{port}"]) as sb:
        assert connect(sb, HOST, port) == "OK"
        assert connect(sb, OTHER, port) == "ERR 1"  # EPERM: refused before a packet left
        assert connect(sb, "169.254.169.254", 80) == "ERR 1"
        sb.flush_events()
    results = [(e.addr, e.result) for e in sb.events if isinstance(e, ev.NetEvent) and e.kind == "connect"
               and e.family == "inet"]
    assert (HOST, -115) in results and (OTHER, -1) in results  # EINPROGRESS: a timeout makes it non-blocking


def test_observe_mode_lets_traffic_through_and_records_it(lab: tuple[TestNet, int]) -> None:
    net, port = lab
    assert_no_route_out(net.client)  # observe mode blocks nothing: prove nothing can leak first
    with Sandbox(netns=net.client, mode="observe") as sb:
        assert connect(sb, OTHER, port) == "OK"
        sb.flush_events()
        assert sb.guard.counters(sb.id)["would_deny"] >= 1
    assert any(isinstance(e, ev.NetEvent) and e.kind == "connect" and e.addr == OTHER for e in sb.events)


def test_own_namespace_has_no_way_out() -> None:
    with Sandbox(mode="observe") as sb:
        assert_no_route_out(sb.netns.exec_prefix()[-1])
        assert connect(sb, HOST, 80) == "ERR 101"  # ENETUNREACH: no route, even unblocked


def _fake_dns(answers: dict[str, str]) -> tuple[tuple[str, int], threading.Event]:
    """An upstream DNS server on loopback answering A records from `answers`."""
    from dnslib import QTYPE, RR, A, DNSRecord  # type: ignore[import-untyped]

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.77", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = DNSRecord.parse(data)
            reply = query.reply()
            name = str(query.q.qname).rstrip(".")
            if name in answers and query.q.qtype == QTYPE.A:
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(answers[name]), ttl=60))
            sock.sendto(reply.pack(), peer)
        sock.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname(), stop


def test_allowed_domain_resolves_and_connects_denied_does_not(lab: tuple[TestNet, int]) -> None:
    net, port = lab
    upstream, stop = _fake_dns({"registry.example": HOST, "evil.example": OTHER})
    try:
        with Sandbox(netns=net.client, allow_domains=["registry.example"], dns_upstream=upstream) as sb:
            assert connect(sb, "registry.example", port) == "OK"
            assert connect(sb, "evil.example", port).startswith("ERR")  # not resolved at all
            assert connect(sb, OTHER, port) == "ERR 1"  # and its address is not admitted
    finally:
        stop.set()
    asked = {(q.name, q.allowed) for q in sb.questions}
    assert ("registry.example", True) in asked and ("evil.example", False) in asked


def test_containment_inside() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="corral-ws-"))  # pytest's tmp_path is not reachable by the sandbox user
    try:
        # observe: the mount attempt would otherwise (rightly) freeze the sandbox mid-step
        with Sandbox(workdir=workdir, mode="observe") as sb:
            r = sb.exec("id -u; ls /root 2>&1; ls /proc | grep -c '^[0-9]'; touch /usr/x 2>&1; echo ok > /workspace/f;"
                        " unshare -r true 2>&1 || echo no-userns; mount -t tmpfs none /mnt 2>&1 || echo no-mount")
        assert (workdir / "f").read_text() == "ok\n"
    finally:
        shutil.rmtree(workdir)
    lines = r.stdout.splitlines()
    assert lines[0] == "1000"
    assert "No such file" in lines[1]
    assert int(lines[2]) < 10  # the sandbox's own processes, not the host's hundreds
    assert "Read-only file system" in lines[3]
    assert "no-userns" in r.stdout and "no-mount" in r.stdout


def test_detached_process_keeps_its_step(lab: tuple[TestNet, int]) -> None:
    net, port = lab
    with Sandbox(netns=net.client, allow=[f"{HOST}:{port}"]) as sb:
        sb.exec(["sh", "-c", f"setsid nohup python3 -c \"import time, socket; time.sleep(1.5);"
                             f" socket.create_connection(('{HOST}', {port}))\" >/dev/null 2>&1 &"])
        sb.exec(["true"])
        third = sb.exec(["sleep", "3"])
        sb.flush_events()
    assert third.step == 3
    (conn,) = [e for e in sb.events if isinstance(e, ev.NetEvent) and e.kind == "connect" and e.addr == HOST]
    assert conn.step_id == 1 and conn.result == 0 and conn.pid not in {e.pid for e in sb.events if e.step_id == 3}


def test_canary_open_is_an_event() -> None:
    with Sandbox() as sb:
        sb.exec("cd ~/.aws && cat credentials >/dev/null")
        sb.flush_events()
        aws = next(c for c in sb.canaries if c.kind == "aws_credentials")
        inode = os.stat(aws.path).st_ino
    hits = [e for e in sb.events if isinstance(e, ev.FileEvent) and "inode" in e.match]
    assert [(e.ino, e.path) for e in hits] == [(inode, "/home/agent/.aws/credentials")]  # as the agent sees it


def test_a_deleted_canarys_inode_never_passes_for_another_file() -> None:
    """Canaries are known by inode number.  The agent deletes them and makes files in their
    place: none gets a canary's number (opening it would be a critical alert), and once the
    sandbox is gone its numbers are canaries no more."""
    with Sandbox(mode="observe") as sb:
        context = sb.pipeline.engine.context
        planted = {ev.file_id(c.path): c.kind for c in sb.canaries}
        assert {fid: context.canary_kind(*fid) for fid in planted} == planted
        sb.exec(f"rm {' '.join(c.sandbox_path for c in sb.canaries)}")
        places = (".", ".aws", ".ssh", ".electrum/wallets")  # where the canaries were
        made_in = " ".join(f"~/{d}" for d in places)
        sb.exec(f"for d in {made_in}; do for i in $(seq 100); do echo $i >$d/new$i; cat $d/new$i; done; done")
        sb.flush_events()
        made = {ev.file_id(p) for d in places for p in (sb.layout.home / d).glob("new*")}
        assert len(made) == 400 and not made & planted.keys()
        assert not [a for a in sb.alerts if a.rule == "Canary credential opened"]
    assert {context.canary_kind(*fid) for fid in planted} == {None}


def test_cleanup_leaves_nothing_behind() -> None:
    with Sandbox() as sb:
        sb.exec("sleep 60 >/dev/null 2>&1 &")
        name = sb.name
        assert leftovers(name)
    assert leftovers(name) == []


def test_cli_exit_status_and_events_file(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    res = subprocess.run([CORRAL, "run", "--events", str(events), "--", "sh", "-c", "echo out; exit 3"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and res.stdout == "out\n"
    records = [json.loads(line) for line in events.read_text().splitlines()]
    execs = [r for r in records if r["kind"] == "exec" and r["step_id"] == 1]
    assert any(r["argv"] == ["sh", "-c", "echo out; exit 3"] for r in execs)
    killed = subprocess.run([CORRAL, "run", "--", "sh", "-c", "kill -9 $$"], capture_output=True, timeout=60)
    assert killed.returncode == 128 + 9


def test_cli_limits(tmp_path: Path) -> None:
    balloon = "b = bytearray(300 * 1024 * 1024); print('survived')"
    res = subprocess.run([CORRAL, "run", "--memory", "64M", "--", "python3", "-c", balloon],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 128 + 9 and "survived" not in res.stdout
    bomb = ("import subprocess\nps = []\ntry:\n    while len(ps) < 100: ps.append(subprocess.Popen(['sleep', '5']))\n"
            "except OSError as e:\n    print('stopped at', len(ps), e.errno)")
    res = subprocess.run([CORRAL, "run", "--pids", "20", "--", "python3", "-c", bomb],
                         capture_output=True, text=True, timeout=60)
    words = res.stdout.split()
    assert words[:2] == ["stopped", "at"] and int(words[2]) < 20 and words[3] == "11"  # EAGAIN
    assert subprocess.run(["true"]).returncode == 0  # the host is fine


def test_cli_ctrl_c_and_kill_clean_up() -> None:
    proc = subprocess.Popen([CORRAL, "run", "--", "sleep", "60"], stderr=subprocess.PIPE, text=True)
    name = _wait_for_sandbox(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert leftovers(name) == []

    proc = subprocess.Popen([CORRAL, "run", "--", "sleep", "60"], stderr=subprocess.DEVNULL)
    name = _wait_for_sandbox(proc.pid)
    proc.kill()  # no chance to clean up: the next run reaps it
    proc.wait()
    assert leftovers(name)
    assert subprocess.run([CORRAL, "run", "--", "true"], timeout=60).returncode == 0
    assert leftovers(name) == []


def _wait_for_sandbox(owner: int) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for d in (cgroup2_root() / "corral").glob(f"sb-{owner}-*"):
            if any(d.glob("step-1")):
                return d.name
        time.sleep(0.05)
    raise AssertionError("corral run did not start its sandbox")


def test_cli_bad_policy_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("name: x\nmode: enforce\negres:\n  allow: []\n")
    res = subprocess.run([CORRAL, "run", "--policy", str(bad), "--", "true"], capture_output=True, text=True)
    assert res.returncode == 2
    assert f"{bad}:3" in res.stderr and "egres" in res.stderr


def test_a_sandbox_made_in_a_short_lived_thread_keeps_working() -> None:
    # bwrap's --die-with-parent follows the thread that forked it: holders are started
    # from one long-lived thread, so a worker thread's exit does not end its sandbox.
    made: list[Sandbox] = []
    worker = threading.Thread(target=lambda: made.append(Sandbox().__enter__()))
    worker.start()
    worker.join()
    with made[0] as sb:
        assert sb.exec(["echo", "alive"]).stdout == "alive\n"


def test_cli_releases_its_hold_on_the_corral_cgroup() -> None:
    """A corral process holds <v2root>/corral while its programs are attached there
    (an empty holder-<pid> child); it lets go when it exits, so the last one out
    leaves no corral directory behind."""
    holders = lambda: {p.name for p in corral_cgroup().glob("holder-*")}  # noqa: E731
    before = holders()
    assert subprocess.run([CORRAL, "run", "--", "true"], timeout=60).returncode == 0
    assert holders() == before
