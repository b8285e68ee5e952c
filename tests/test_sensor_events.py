"""Every event type, from a real action in a watched cgroup, with its fields checked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import python, run_in_cgroup

from corral import events as ev
from corral.monitor import Monitor


@pytest.fixture
def watched_dir(monitor: Monitor) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="corral-watched-") as d:
        monitor.watch_prefix(d + "/")
        yield Path(d)


def test_exec_reports_filename_argv_cwd_and_header(monitor: Monitor, tmp_path: Path) -> None:
    run = run_in_cgroup(monitor, ["/bin/echo", "hello", "two words", "--flag=x"], cwd=tmp_path)
    assert run.returncode == 0
    (exe,) = [e for e in run.of("exec") if e.pid == run.pid]
    assert isinstance(exe, ev.ExecEvent)
    assert exe.filename == "/bin/echo"
    assert exe.argv == ["/bin/echo", "hello", "two words", "--flag=x"]
    assert exe.cwd == str(tmp_path)
    assert not exe.args_truncated
    assert exe.comm == "echo"
    assert exe.uid == 0
    assert exe.ppid == os.getpid()
    assert exe.sandbox_id == run.sandbox_id and exe.cgroup_id == run.cgroup_id
    assert exe.proc is not None and exe.proc.exe == "/bin/echo"


def test_exec_long_argv_is_truncated_and_flagged(monitor: Monitor) -> None:
    args = [f"arg{i:05d}" for i in range(400)]  # ~3.6 KB, above the 2 KB kept
    run = run_in_cgroup(monitor, ["/bin/true", *args])
    (exe,) = run.of("exec")
    assert isinstance(exe, ev.ExecEvent)
    assert exe.args_truncated
    assert exe.argv[:3] == ["/bin/true", "arg00000", "arg00001"]
    assert 150 < len(exe.argv) < 400


def test_fork_and_exit_code(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, ["/bin/sh", "-c", "/bin/true; exit 7"])
    assert run.returncode == 7
    forks = [e for e in run.of("fork") if isinstance(e, ev.ForkEvent)]
    true_pid = next(e.pid for e in run.of("exec") if isinstance(e, ev.ExecEvent) and e.filename == "/bin/true")
    assert any(f.pid == run.pid and f.child_pid == true_pid for f in forks)
    exits = {e.pid: e for e in run.of("exit") if isinstance(e, ev.ExitEvent)}
    assert exits[run.pid].exit_code == 7 and exits[run.pid].signal == 0
    assert exits[true_pid].exit_code == 0


def test_exit_by_signal(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, ["/bin/sh", "-c", "kill -9 $$"])
    assert run.returncode == -signal.SIGKILL
    (exit_ev,) = [e for e in run.of("exit") if e.pid == run.pid]
    assert isinstance(exit_ev, ev.ExitEvent) and exit_ev.signal == signal.SIGKILL


def test_threads_are_not_reported_as_processes(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, python("import threading\nfor _ in range(5):\n"
                                        "    t = threading.Thread(target=lambda: None); t.start(); t.join()"))
    assert run.returncode == 0
    assert run.of("fork") == []
    assert [e.pid for e in run.of("exit")] == [run.pid]


def test_tcp_connect_ipv4(monitor: Monitor, tcp_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    run = run_in_cgroup(monitor, python(f"import socket; socket.create_connection(('127.0.0.1', {port}))"))
    assert run.returncode == 0
    conns = [e for e in run.of("connect") if isinstance(e, ev.NetEvent) and e.family == "inet"]
    assert len(conns) == 1
    c = conns[0]
    assert (c.addr, c.port, c.sock_type, c.protocol, c.result) == ("127.0.0.1", port, "stream", 6, 0)
    assert c.local_port != 0


def test_refused_connect_reports_the_error(monitor: Monitor) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    port = probe.getsockname()[1]
    try:
        run = run_in_cgroup(monitor, python(f"import socket; socket.socket().connect_ex(('127.0.0.1', {port}))"))
    finally:
        probe.close()
    (c,) = [e for e in run.of("connect") if isinstance(e, ev.NetEvent) and e.family == "inet"]
    assert c.result == -111  # ECONNREFUSED


def test_tcp_connect_ipv6_and_unix(monitor: Monitor, tmp_path: Path) -> None:
    srv6 = socket.socket(socket.AF_INET6)
    srv6.bind(("::1", 0))
    srv6.listen()
    path = str(tmp_path / "agent.sock")
    srvu = socket.socket(socket.AF_UNIX)
    srvu.bind(path)
    srvu.listen()
    port = srv6.getsockname()[1]
    try:
        run = run_in_cgroup(monitor, python(
            f"import socket; socket.create_connection(('::1', {port}));"
            f"u = socket.socket(socket.AF_UNIX); u.connect({path!r})"))
    finally:
        srv6.close()
        srvu.close()
    assert run.returncode == 0, run.stderr
    v6 = [e for e in run.of("connect") if isinstance(e, ev.NetEvent) and e.family == "inet6"]
    assert [(e.addr, e.port, e.result) for e in v6] == [("::1", port, 0)]
    unix = [e for e in run.of("connect") if isinstance(e, ev.NetEvent) and e.unix_path == path]
    assert len(unix) == 1 and unix[0].result == 0


def test_udp_send_destinations(monitor: Monitor) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    try:
        run = run_in_cgroup(monitor, python(
            "import socket; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"u.sendto(b'12345', ('127.0.0.1', {port}))\n"
            f"u.sendmsg([b'abc'], [], 0, ('127.0.0.1', {port}))"))
    finally:
        sink.close()
    sends = [e for e in run.of("send") if isinstance(e, ev.NetEvent)]
    assert [(e.addr, e.port, e.sock_type) for e in sends] == [("127.0.0.1", port, "dgram")] * 2
    assert sends[0].result == 5  # bytes asked to send, for sendto


def test_bind_listen_accept(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, python(
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "c = socket.create_connection(s.getsockname()); a, peer = s.accept(); print(s.getsockname()[1], peer[1])"))
    assert run.returncode == 0, run.stderr
    port, peer_port = map(int, run.stdout.split())
    (bind,) = [e for e in run.of("bind") if isinstance(e, ev.NetEvent) and e.family == "inet"]
    assert (bind.addr, bind.result) == ("127.0.0.1", 0)
    (listen,) = run.of("listen")
    assert isinstance(listen, ev.NetEvent) and (listen.addr, listen.port) == ("127.0.0.1", port)
    (accept,) = run.of("accept")
    assert isinstance(accept, ev.NetEvent)
    assert (accept.addr, accept.port, accept.local_port) == ("127.0.0.1", peer_port, port)


def test_open_of_watched_prefix_absolute_relative_and_failed(monitor: Monitor, watched_dir: Path) -> None:
    (watched_dir / "secret").write_text("x")
    (watched_dir / "sub").mkdir()
    run = run_in_cgroup(monitor, ["/bin/sh", "-c",
                                  f"cat {watched_dir}/secret; cd {watched_dir}/sub && cat ../secret ./nothere;"
                                  " cat /etc/hostname > /dev/null; echo hi > ./new"], cwd="/")
    opens = [e for e in run.of("open") if isinstance(e, ev.FileEvent)]
    seen = [(e.path, e.result >= 0, e.writable) for e in opens if e.path.startswith(str(watched_dir))]
    assert (f"{watched_dir}/secret", True, False) in seen
    assert seen.count((f"{watched_dir}/secret", True, False)) == 2  # absolute, then via ".."
    assert (f"{watched_dir}/sub/nothere", False, False) in seen  # failed opens resolve against the cwd
    assert (f"{watched_dir}/sub/new", True, True) in seen
    assert not any(e.path == "/etc/hostname" for e in opens)  # not a watched prefix
    failed = next(e for e in opens if e.path.endswith("nothere"))
    assert failed.result == -2 and failed.match == ["prefix"]


def test_open_of_watched_file_under_any_name(monitor: Monitor, tmp_path: Path) -> None:
    canary = tmp_path / "credentials"
    canary.write_text("[default]\naws_access_key_id = AKIAEXAMPLE\n")
    link = tmp_path / "innocent-name"
    link.symlink_to(canary)
    canary_id = monitor.watch_file(canary)
    try:
        run = run_in_cgroup(monitor, ["/bin/cat", str(link)])
    finally:
        monitor.sensor.unwatch_file(canary_id)
    (hit,) = [e for e in run.of("open") if isinstance(e, ev.FileEvent) and "inode" in e.match]
    assert hit.path == str(canary)  # the canonical path, not the link
    assert hit.ino == canary.stat().st_ino


def test_unlink_and_rename_in_watched_prefix(monitor: Monitor, watched_dir: Path, tmp_path: Path) -> None:
    (watched_dir / "a").write_text("x")
    (tmp_path / "payload").write_text("y")
    run = run_in_cgroup(monitor, ["/bin/sh", "-c",
                                  f"mv {watched_dir}/a {watched_dir}/b; rm {watched_dir}/b;"
                                  f" mv {tmp_path}/payload {watched_dir}/planted"])
    assert run.returncode == 0, run.stderr
    renames = [(e.path, e.path2) for e in run.of("rename") if isinstance(e, ev.FileEvent)]
    assert (f"{watched_dir}/a", f"{watched_dir}/b") in renames
    assert (f"{tmp_path}/payload", f"{watched_dir}/planted") in renames  # moved *into* a watched place
    assert [e.path for e in run.of("unlink") if isinstance(e, ev.FileEvent)] == [f"{watched_dir}/b"]


def test_dup_socket_onto_stdio_and_exec_with_socket_stdio(monitor: Monitor, tcp_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    run = run_in_cgroup(monitor, python(
        f"import os, socket; s = socket.create_connection(('127.0.0.1', {port}))\n"
        "os.dup2(s.fileno(), 0); os.dup2(s.fileno(), 2); os.execv('/bin/true', ['true'])"))
    dups = [e for e in run.of("dup_socket") if isinstance(e, ev.DupSocketEvent)]
    assert sorted(d.target_fd for d in dups) == [0, 2]
    assert all((d.addr, d.port) == ("127.0.0.1", port) for d in dups)
    true_exec = next(e for e in run.of("exec") if isinstance(e, ev.ExecEvent) and e.filename == "/bin/true")
    assert true_exec.stdio_sockets == [0, 2]


def test_dup_of_a_plain_file_is_not_reported(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, python("import os; fd = os.open('/dev/null', os.O_RDONLY); os.dup2(fd, 0)"))
    assert run.returncode == 0
    assert run.of("dup_socket") == []


def test_ptrace(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, python(
        "import ctypes, os, signal, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    time.sleep(5); os._exit(0)\n"
        "libc.ptrace(16, pid, 0, 0)\n"  # PTRACE_ATTACH
        "os.waitpid(pid, 0); os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)"))
    assert run.returncode == 0, run.stderr
    child = next(e.child_pid for e in run.of("fork") if isinstance(e, ev.ForkEvent))
    pt = [e for e in run.of("ptrace") if isinstance(e, ev.PtraceEvent)]
    assert [(p.request, p.target_pid) for p in pt] == [(16, child)]


def test_unshare_mount_and_setns(monitor: Monitor) -> None:
    # A private mount namespace: the tmpfs never appears on the host.
    run = run_in_cgroup(monitor, ["unshare", "-m", "--propagation", "private", "sh", "-c",
                                  "mount -t tmpfs corral-test /mnt && nsenter --net=/proc/self/ns/net true"])
    assert run.returncode == 0, run.stderr
    ns = [e for e in run.of("ns") if isinstance(e, ev.NsEvent)]
    assert any(e.op == "unshare" and e.namespaces == ["mnt"] for e in ns)
    assert any(e.op == "setns" and e.namespaces == ["net"] for e in ns)
    mounts = [e for e in run.of("mount") if isinstance(e, ev.MountEvent)]
    assert any((m.op, m.target, m.source, m.fstype) == ("mount", "/mnt", "corral-test", "tmpfs") for m in mounts)


def test_clone_with_namespace_flags(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, ["unshare", "--fork", "--pid", "--mount-proc", "true"])
    assert run.returncode == 0, run.stderr
    ns = [e for e in run.of("ns") if isinstance(e, ev.NsEvent)]
    assert any("pid" in e.namespaces for e in ns)


def test_bpf_syscall(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, ["bpftool", "prog", "list"])
    assert run.returncode == 0, run.stderr
    cmds = {e.cmd for e in run.of("bpf") if isinstance(e, ev.BpfEvent)}
    assert cmds  # bpftool asks the kernel about programs through bpf()


def test_module_load(monitor: Monitor) -> None:
    if any("init_module" in s for s in monitor.sensor.unavailable):
        pytest.skip("this kernel has no module loading tracepoints (built without CONFIG_MODULES)")
    run = run_in_cgroup(monitor, python(
        "import ctypes; ctypes.CDLL(None, use_errno=True).syscall(175, b'not a module', 12, b'')"))
    assert any(isinstance(e, ev.ModuleLoadEvent) for e in run.of("module_load"))


def test_memfd_exec(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, python(
        "import os, shutil; fd = os.memfd_create('payload')\n"
        "with open('/bin/true', 'rb') as src: os.write(fd, src.read())\n"
        "os.execv(f'/proc/self/fd/{fd}', ['true'])"))
    assert run.returncode == 0, run.stderr
    (m,) = run.of("memfd_exec")
    assert isinstance(m, ev.MemfdExecEvent)
    assert m.memfd_name.startswith("memfd:payload")
    assert m.filename.startswith("/proc/self/fd/")


def test_setuid_family_and_capset(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, python(
        "import os, subprocess; subprocess.run(['setpriv', '--inh-caps=-all', 'true'], check=True)\n"
        "os.setresgid(65534, 65534, 65534); os.setuid(65534)"))
    assert run.returncode == 0, run.stderr
    ops = [(e.op, e.ids) for e in run.of("setuid") if isinstance(e, ev.SetuidEvent)]
    assert ("setresgid", [65534, 65534, 65534]) in ops
    assert ("setuid", [65534]) in ops
    assert run.of("capset")


def test_signal_outside_own_cgroup_only(monitor: Monitor) -> None:
    outsider = subprocess.Popen(["sleep", "30"])
    try:
        run = run_in_cgroup(monitor, ["/bin/sh", "-c",
                                      f"kill -0 {outsider.pid}; sleep 30 & kill $!; wait"])
    finally:
        outsider.kill()
        outsider.wait()
    sigs = [e for e in run.of("signal") if isinstance(e, ev.SignalEvent)]
    assert [(s.target_pid, s.signal, s.op) for s in sigs] == [(outsider.pid, 0, "kill")]


def test_same_actions_in_an_unwatched_cgroup_produce_nothing(monitor: Monitor, tcp_listener: socket.socket,
                                                             watched_dir: Path) -> None:
    port = tcp_listener.getsockname()[1]
    script = (f"cat {watched_dir}/x 2>/dev/null; /bin/true a b;"
              f" python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}))\"")
    watched = run_in_cgroup(monitor, ["/bin/sh", "-c", script])
    unwatched = run_in_cgroup(monitor, ["/bin/sh", "-c", script], watch=False)
    assert {"exec", "fork", "exit", "connect", "open"} <= {e.kind for e in watched.events}
    assert unwatched.returncode == 0 and unwatched.events == []
    leftovers = [e for e in monitor.read(timeout=0.2) if e.cgroup_id == unwatched.cgroup_id]
    assert leftovers == []


def test_process_table_gives_ancestry(monitor: Monitor) -> None:
    run = run_in_cgroup(monitor, ["/bin/sh", "-c", "/bin/sh -c '/bin/echo deep'"])
    echo = next(e for e in run.of("exec") if isinstance(e, ev.ExecEvent) and e.filename == "/bin/echo")
    assert echo.proc is not None and echo.proc.cmdline == "/bin/echo deep"
    names = [p.name for p in monitor.ancestors(echo.pid)]
    assert names[:2] == ["sh", "sh"]
    assert names[2] == os.path.basename(sys.executable) or names[2].startswith("python")
