"""The sandbox's filesystem and identity, checked from inside real bubblewrap sandboxes."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.sandbox import canaries
from corral.sandbox.fs import DEFAULT_PATH, FsLayout, enter_argv, prepare_dirs, sandbox_argv

HOST_UID = 65534

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="dropping to the sandbox uid needs root"),
    pytest.mark.skipif(not (shutil.which("bwrap") and shutil.which("setpriv")), reason="needs bwrap and setpriv"),
]


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "resolv.conf").write_text("nameserver 192.0.2.53\n")
        self.suid_dir = root / "suid"
        self.suid_dir.mkdir()
        self.layout = FsLayout(workspace=root / "workspace", home=root / "home", resolv_conf=root / "resolv.conf",
                               host_uid=HOST_UID, host_gid=HOST_UID, etc_dir=root / "etc",
                               extra_ro=(self.suid_dir,))
        prepare_dirs(self.layout)
        self.canaries = canaries.plant(self.layout.home, HOST_UID, HOST_UID)

    def run(self, script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(sandbox_argv(self.layout, ["sh", "-c", script], env), capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def out(self, script: str) -> str:
        result = self.run(script)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    # Not pytest's tmp_path: it lives under a root-only directory the sandbox uid cannot enter.
    root = Path(tempfile.mkdtemp(prefix="corral-fs-test-", dir="/tmp"))
    try:
        root.chmod(0o755)
        yield Sandbox(root)
    finally:
        shutil.rmtree(root)


def test_runs_as_an_unprivileged_user_inside(sandbox: Sandbox) -> None:
    assert sandbox.out("id -u; id -g; id -un; echo $HOME; pwd").split() == [
        "1000", "1000", "agent", "/home/agent", "/workspace"]


def test_no_capabilities_and_no_new_privileges(sandbox: Sandbox) -> None:
    status = dict(line.split(":\t", 1) for line in sandbox.out("cat /proc/self/status").splitlines()
                  if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"].strip() == "1"


def test_host_sees_the_unprivileged_host_uid(sandbox: Sandbox) -> None:
    marker = _unique_sleep()
    proc = subprocess.Popen(sandbox_argv(sandbox.layout, ["sleep", marker]), stdin=subprocess.DEVNULL)
    try:
        pid = _wait_for_process(["sleep", marker])
        fields = _status(pid)
        assert fields["Uid"].split() == [str(HOST_UID)] * 4
        assert fields["Gid"].split() == [str(HOST_UID)] * 4
        assert fields["Groups"].split() == []
        assert int(fields["CapEff"], 16) == 0
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # --die-with-parent: the sandboxed process goes with bwrap.
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_host_processes_are_invisible(sandbox: Sandbox) -> None:
    pids = [p for p in sandbox.out("ls /proc").split() if p.isdigit()]
    assert len(pids) <= 4  # bwrap's init, sh, ls: nothing of the host
    commands = sandbox.out("ps -e -o comm=").split()
    assert commands[0] == "bwrap" and set(commands) <= {"bwrap", "sh", "ps"}


def test_host_secrets_are_not_there(sandbox: Sandbox) -> None:
    assert sandbox.run("ls /root").returncode != 0
    assert sandbox.out("ls -A /home").split() == ["agent"]
    assert sandbox.out("ls -A /run").split() == []
    assert sandbox.run("test -e /var/run/docker.sock || test -e /run/containerd/containerd.sock").returncode != 0
    for path in ("/etc/shadow", "/etc/gshadow"):
        result = sandbox.run(f"cat {path}")
        assert result.stdout == "", path  # unreadable (it is /dev/null on a nodev mount)
    for key in Path("/etc/ssh").glob("ssh_host_*_key"):
        assert sandbox.run(f"cat {key}").stdout == ""
    assert sandbox.out("ls -A /etc/ssl/private 2>/dev/null; true").split() == []


def test_system_is_read_only(sandbox: Sandbox) -> None:
    name = f"corral-probe-{uuid.uuid4().hex}"
    for directory in ("/usr", "/etc", "/usr/local/bin", "/", "/dev"):
        assert sandbox.run(f"touch {directory}/{name}").returncode != 0, directory
    assert not Path("/usr", name).exists() and not Path("/etc", name).exists()


def test_workspace_is_the_host_directory(sandbox: Sandbox) -> None:
    name = f"probe-{uuid.uuid4().hex}"
    sandbox.out(f"echo hello > /workspace/{name}")
    landed = sandbox.layout.workspace / name
    assert landed.read_text() == "hello\n"
    assert landed.stat().st_uid == HOST_UID


def test_tmp_and_shm_are_private(sandbox: Sandbox) -> None:
    name = f"corral-probe-{uuid.uuid4().hex}"
    sandbox.out(f"echo x > /tmp/{name} && echo x > /dev/shm/{name} && echo x > /var/tmp/{name}")
    assert not Path("/tmp", name).exists()
    assert not Path("/dev/shm", name).exists()
    assert not Path("/var/tmp", name).exists()
    assert sandbox.run(f"test -e /tmp/{name}").returncode != 0  # and gone in the next sandbox


def test_resolv_conf_is_the_given_file(sandbox: Sandbox) -> None:
    assert sandbox.out("cat /etc/resolv.conf") == "nameserver 192.0.2.53\n"


def test_no_user_namespaces_and_no_mounts(sandbox: Sandbox) -> None:
    assert sandbox.run("unshare -r true").returncode != 0
    assert sandbox.run("unshare -U true").returncode != 0
    assert sandbox.run("mount -t tmpfs none /tmp").returncode != 0
    assert sandbox.run("umount /etc/shadow").returncode != 0


def test_setuid_binaries_do_not_gain_root(sandbox: Sandbox) -> None:
    # A setuid-root copy of `id` really works outside (it reports euid=0 when run as nobody) ...
    suid_id = sandbox.suid_dir / "id"
    shutil.copy("/usr/bin/id", suid_id)
    os.chown(suid_id, 0, 0)
    suid_id.chmod(0o4755)
    outside = subprocess.run(["setpriv", f"--reuid={HOST_UID}", f"--regid={HOST_UID}", "--clear-groups",
                              str(suid_id)], capture_output=True, text=True, check=True)
    assert "euid=0" in outside.stdout
    # ... and gives nothing inside; nor do the system's own setuid binaries.
    inside = sandbox.out(f"{suid_id}")
    assert "euid" not in inside and inside.startswith("uid=1000(agent)")
    su = sandbox.run("su root -c 'id -u'")
    assert su.returncode != 0 and "0" not in su.stdout.split()
    assert sandbox.run("passwd -d agent").returncode != 0


def test_environment_is_clean(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/ssh-agent.sock")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "host-secret")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/root/gcp.json")
    env = dict(line.split("=", 1) for line in sandbox.run("env", env={"STEP": "3"}).stdout.splitlines())
    assert set(env) == {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TERM", "PWD", "STEP"}
    assert env["USER"] == "agent" and env["HOME"] == "/home/agent" and env["STEP"] == "3"


def test_credentials_cannot_be_passed_in(sandbox: Sandbox) -> None:
    for name in ("SSH_AUTH_SOCK", "AWS_ACCESS_KEY_ID", "AZURE_CLIENT_SECRET", "GOOGLE_API_KEY"):
        with pytest.raises(CorralError, match=name):
            sandbox_argv(sandbox.layout, ["true"], {name: "x"})


def test_canaries_are_readable_at_home(sandbox: Sandbox) -> None:
    for canary in sandbox.canaries:
        inside = sandbox.out(f"cat {canary.sandbox_path}")
        assert inside.encode() == canary.path.read_bytes()
        assert canaries.find_secret(inside.encode(), [canary]) is canary
    assert sandbox.out("ssh-keygen -y -f ~/.ssh/id_ed25519").startswith("ssh-ed25519 ")


def test_steps_enter_the_running_sandbox(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    holder_arg = _unique_sleep()
    script = f"echo held > /tmp/mark; exec sleep {holder_arg}"
    holder = subprocess.Popen(sandbox_argv(sandbox.layout, ["sh", "-c", script]), stdin=subprocess.DEVNULL)
    try:
        holder_pid = _wait_for_process(["sleep", holder_arg])
        monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/ssh-agent.sock")
        step = subprocess.run(enter_argv(holder_pid, ["sh", "-c", (
            "id -u; pwd; cat /tmp/mark; ps -e -o comm= | sort | tr '\\n' ' '; echo; env | sort | tr '\\n' ' '; echo;"
            "grep -E '^(CapEff|NoNewPrivs|Groups):' /proc/self/status | tr -s '\\t ' ' ';"
            "unshare -r true 2>/dev/null || echo no-userns; cat /dev/tty 2>/dev/null || echo no-tty")], {"STEP": "2"}),
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert step.returncode == 0, step.stderr
        lines = step.stdout.splitlines()
        assert lines[:3] == ["1000", "/workspace", "held"]  # same identity, same /tmp
        assert "sleep" in lines[3].split()  # same pid namespace as the holder
        assert lines[4].split() == ["HOME=/home/agent", "LANG=C.UTF-8", "LOGNAME=agent", "PATH=" + DEFAULT_PATH,
                                    "PWD=/workspace", "STEP=2", "TERM=xterm-256color", "USER=agent"]
        assert sorted(line.strip() for line in lines[5:]) == [
            "CapEff: 0000000000000000", "Groups:", "NoNewPrivs: 1", "no-tty", "no-userns"]

        # Seen from the host: the unprivileged uid, and none of root's groups.
        step_arg = _unique_sleep()
        proc = subprocess.Popen(enter_argv(holder_pid, ["sleep", step_arg]), stdin=subprocess.DEVNULL)
        try:
            status = _status(_wait_for_process(["sleep", step_arg]))
            assert status["Uid"].split() == [str(HOST_UID)] * 4 and status["Gid"].split() == [str(HOST_UID)] * 4
            assert status["Groups"].split() == [] and int(status["CapEff"], 16) == 0
        finally:
            proc.kill()
            proc.wait(timeout=10)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_stale_holder_pid_runs_nothing() -> None:
    # A pid that now names a host process: joining its (our own) user namespace fails.
    probe = Path("/tmp", f"corral-probe-{uuid.uuid4().hex}")
    result = subprocess.run(enter_argv(os.getpid(), ["touch", str(probe)]), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0 and not probe.exists()


def test_unreachable_directories_are_refused() -> None:
    hidden = Path(tempfile.mkdtemp(prefix="corral-fs-test-"))  # 0700 root: nobody cannot enter it
    try:
        layout = FsLayout(workspace=hidden / "ws", home=hidden / "home")
        with pytest.raises(CorralError, match="cannot reach"):
            prepare_dirs(layout)
    finally:
        shutil.rmtree(hidden)


def test_layouts_that_would_hand_over_the_host_are_refused() -> None:
    with pytest.raises(CorralError, match="unprivileged"):
        sandbox_argv(FsLayout(Path("/w"), Path("/h"), host_uid=0, host_gid=0), ["true"])
    with pytest.raises(CorralError, match="chowned"):
        prepare_dirs(FsLayout(workspace=Path("/usr"), home=Path("/tmp/x")))
    for path in ("/", "/root/.aws", "/home", "/run/docker.sock", "relative"):
        with pytest.raises(CorralError, match="extra read-only path"):
            sandbox_argv(FsLayout(Path("/w"), Path("/h"), extra_ro=(Path(path),)), ["true"])


def _wait_for_process(argv: list[str], timeout: float = 10.0) -> int:
    wanted = "\0".join(argv).encode() + b"\0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "cmdline").read_bytes() == wanted:
                        return int(entry.name)
                except OSError:
                    continue
        time.sleep(0.05)
    raise AssertionError(f"no process {argv} appeared")


def _unique_sleep() -> str:
    """A sleep argument no other process has, so the test can find its process from the host."""
    return f"{3000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
