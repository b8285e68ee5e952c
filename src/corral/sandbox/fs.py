"""The sandbox's filesystem and identity: one argv that runs a command inside it.

Design (bubblewrap 0.8, setpriv from util-linux; corral itself runs as root):

    [ip netns exec NAME]                      # the caller's, before us: network is not ours
    setpriv --reuid=U --regid=G --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs --
    bwrap --unshare-user --disable-userns --uid 1000 --gid 1000
          --unshare-pid --unshare-ipc --unshare-uts --hostname sandbox --unshare-cgroup-try
          --new-session --die-with-parent --cap-drop ALL
          <mounts, below> --chdir /workspace --clearenv --setenv ... -- COMMAND

Why it holds:

* Privilege is dropped *before* bwrap runs. setpriv turns root into the unprivileged host uid U
  (65534 unless configured), empties every capability set including the bounding set, and sets
  no_new_privs, which every descendant inherits and nothing can clear. bwrap is not setuid
  here, so it runs as U and builds the sandbox inside a user namespace that U owns; the
  capabilities it holds there reach only objects of that namespace (its own mounts, its pid
  namespace), never host files and never the network namespace, whose owner is the host's
  initial user namespace: the sandbox cannot change its own routes or firewall.
* The command runs as uid 1000 inside (U outside) with no capabilities. no_new_privs and the
  nosuid flag bwrap puts on every mount make setuid binaries and file capabilities inert.
  --disable-userns forbids nested user namespaces, which would otherwise hand the agent a
  fresh full capability set to mount, unshare and probe kernel attack surface with.
* The root is a fresh tmpfs holding only what is listed here (then remounted read-only), so
  /root, /home/*, /run (SSH agent, docker and containerd sockets), /var, /sys, /opt, /work and
  the like do not exist inside. Host permissions still apply underneath, to uid U: even a
  mistaken extra_ro cannot expose what nobody may read.
* /etc is visible read-only, with its secrets masked: shadow files and SSH host keys are
  overlaid by /dev/null (on a nodev mount, so opening them fails), /etc/ssl/private by an
  empty tmpfs. Mounts inherited from the host's mount namespace are locked by the kernel:
  the sandbox cannot unmount a mask to see beneath it.
* A new pid namespace with its own /proc: host processes are invisible and cannot be
  signalled or ptraced. --new-session stops TIOCSTI injection into the caller's terminal.
  --die-with-parent takes the sandbox down when the process that started it dies.
* The environment is rebuilt from nothing (--clearenv): PATH, HOME, USER, LOGNAME, LANG, TERM
  and what the caller passes; SSH_AUTH_SOCK and cloud credentials (AWS_*, GOOGLE_*, AZURE_*,
  CLOUDSDK_*) are refused even from the caller.

enter_argv() runs later steps inside a running sandbox (a "holder" started with sandbox_argv)
with nsenter; its docstring says why that holds too.

What the caller must still do: enter the network namespace first (we never --unshare-net);
put the process in its cgroup before bwrap starts, so the cgroup namespace is rooted at the
sandbox's cgroup; close file descriptors it does not mean to hand over (bwrap passes inherited
ones through; subprocess's close_fds=True default does this). Abstract unix sockets belong to
the network namespace, so they are isolated only once the caller has entered one.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError

SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "agent"
SANDBOX_HOME = "/home/agent"
WORKSPACE = "/workspace"
HOSTNAME = "sandbox"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"

SETPRIV = "/usr/bin/setpriv"
BWRAP = "/usr/bin/bwrap"
NSENTER = "/usr/bin/nsenter"
SETSID = "/usr/bin/setsid"
ENV = "/usr/bin/env"

# Top-level system entries: mirrored as symlinks on merged-/usr hosts, bound read-only otherwise.
_SYSTEM_TOP = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Files under /etc that must not be readable inside, whatever their host permissions.
_MASKED_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-")
_MASKED_GLOBS = ("/etc/ssh/ssh_host_*_key",)
_MASKED_DIRS = ("/etc/ssl/private",)

# Variables that carry host credentials or agent sockets; refused even when passed explicitly.
_REFUSED_ENV = ("SSH_AUTH_SOCK", "SSH_AGENT_PID")
_REFUSED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "CLOUDSDK_")

# extra_ro may not show these, nor anything below them: host secrets, sockets and devices.
_NOT_SHOWN = tuple(map(Path, ("/proc", "/sys", "/dev", "/run", "/var/run", "/root", "/home")))
# ... nor these wholesale: they would replace the sandbox's own (a subdirectory is fine).
_NOT_SHOWN_WHOLE = frozenset(map(Path, ("/", "/tmp", "/var/tmp", "/var", "/etc", "/usr")))

# Never chown these recursively, whatever a misconfigured layout says.
_NEVER_CHOWN = frozenset(map(Path, ("/", "/usr", "/etc", "/var", "/home", "/root", "/tmp", "/opt", "/srv",
                                    "/boot", "/run", "/proc", "/sys", "/dev")))

_PASSWD = (f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
           f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:{SANDBOX_USER}:{SANDBOX_HOME}:/bin/bash\n"
           f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
_GROUP = f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class FsLayout:
    """Host paths that make up one sandbox's filesystem.

    workspace and home are host directories owned by host_uid (see prepare_dirs), bound
    read-write at /workspace and /home/agent. resolv_conf, when given, is bound at
    /etc/resolv.conf. extra_ro are host paths shown read-only at the same place. etc_dir, when
    given, is a host directory where prepare_dirs writes a passwd and group naming uid 1000
    "agent" (otherwise the host's files show through, where uid 1000 may be someone else).
    Every path must be reachable by host_uid: bwrap opens them as that user.
    """

    workspace: Path
    home: Path
    resolv_conf: Path | None = None
    host_uid: int = 65534
    host_gid: int = 65534
    extra_ro: tuple[Path, ...] = ()
    etc_dir: Path | None = None


def sandbox_argv(layout: FsLayout, command: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The full argv (setpriv ... bwrap ... -- command) that runs command inside the sandbox."""
    _check_ids(layout)
    if not command:
        raise CorralError("no command to run in the sandbox")
    argv = [SETPRIV, f"--reuid={layout.host_uid}", f"--regid={layout.host_gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            BWRAP, "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", HOSTNAME, "--unshare-cgroup-try",
            "--new-session", "--die-with-parent", "--cap-drop", "ALL"]
    argv += _system_mounts()
    # Private scratch space; tmpfs pages are charged to the sandbox's memory cgroup.
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--tmpfs", "/dev/shm",
             "--perms", "1777", "--tmpfs", "/tmp",
             "--perms", "1777", "--tmpfs", "/var/tmp",
             "--tmpfs", "/run", "--symlink", "../run", "/var/run"]
    for path in layout.extra_ro:
        check_extra_ro(path)
        argv += ["--ro-bind", str(path), str(path)]
    argv += ["--bind", str(layout.workspace), WORKSPACE, "--bind", str(layout.home), SANDBOX_HOME]
    # Masks come after every bind, so no extra_ro entry can uncover what they hide.
    argv += _masks()
    if layout.etc_dir is not None:
        argv += ["--ro-bind", str(layout.etc_dir / "passwd"), "/etc/passwd",
                 "--ro-bind", str(layout.etc_dir / "group"), "/etc/group"]
    if layout.resolv_conf is not None:
        argv += ["--ro-bind", str(layout.resolv_conf), "/etc/resolv.conf"]
    # Last: nothing new can be created at / or in /dev (their submounts stay as they are).
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKSPACE, "--clearenv"]
    for name, value in _environment(env).items():
        argv += ["--setenv", name, value]
    return [*argv, "--", *command]


def enter_argv(holder_pid: int, command: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The argv that runs command in the running sandbox whose process (inside) has host pid holder_pid.

    Steps share the holder's namespaces (mounts, /tmp, pids, network, hostname), identity
    (uid 1000 inside, host_uid outside), a clean environment and no_new_privs:

        setpriv --clear-groups --                       # root's own groups must not come along
        nsenter --target PID --user --mount --pid --ipc --uts --net --cgroup
                --setuid 1000 --setgid 1000 --wdns /workspace --
        setpriv --no-new-privs --inh-caps=-all --       # from the sandbox's own /usr
        setsid --wait env -i -- NAME=VALUE... COMMAND

    nsenter must start as root: the mount and other namespaces belong to the user namespace
    bwrap made, while the agent lives in a nested one (--disable-userns), which an unprivileged
    process cannot reach back out of. The uid 1000 it switches to maps to host_uid; exec then
    clears every capability (uid 0 is not mapped there), so nothing privileged reaches the
    command. The bounding set stays full, as in any process that joins a user namespace, but
    it has nothing to act on: uid 0 does not exist inside, no_new_privs and nosuid mounts
    ignore setuid bits and file capabilities, and no new user namespace can be made.
    setsid detaches the step from the caller's terminal (no TIOCSTI into the caller's shell).

    A stale holder_pid is caught when it names a host process: joining one's own user
    namespace fails (EINVAL) and nothing runs. Still check the holder is alive first: a pid
    reused by another sandbox's process would be entered.
    """
    if not command:
        raise CorralError("no command to run in the sandbox")
    if "=" in command[0]:
        raise CorralError(f"command name {command[0]!r} contains '='")  # env(1) would read it as a variable
    return [SETPRIV, "--clear-groups", "--",
            NSENTER, f"--target={holder_pid}", "--user", "--mount", "--pid", "--ipc", "--uts", "--net", "--cgroup",
            f"--setuid={SANDBOX_UID}", f"--setgid={SANDBOX_GID}", f"--wdns={WORKSPACE}", "--",
            SETPRIV, "--no-new-privs", "--inh-caps=-all", "--",
            SETSID, "--wait", ENV, "-i", "--", *(f"{k}={v}" for k, v in _environment(env).items()), *command]


def prepare_dirs(layout: FsLayout) -> None:
    """Create workspace and home for host_uid, write etc_dir, and check host_uid can reach it all.

    The workspace and home trees become the sandbox's: they are chowned, recursively, to
    host_uid:host_gid. To run on a user's own checkout and keep its ownership, set host_uid
    and host_gid to that user's.
    """
    _check_ids(layout)
    for path in (layout.workspace, layout.home):
        _check_absolute(path, "workspace/home")
        if path.resolve() in _NEVER_CHOWN:
            raise CorralError(f"refusing to use {path} as a sandbox directory: it would be chowned "
                              f"to uid {layout.host_uid}")
        path.mkdir(parents=True, exist_ok=True)
        _chown_tree(path, layout.host_uid, layout.host_gid)
        path.chmod(0o700)
    if layout.etc_dir is not None:
        _check_absolute(layout.etc_dir, "etc_dir")
        layout.etc_dir.mkdir(parents=True, exist_ok=True)
        # Root-owned and bound read-only: the agent cannot edit its own account.
        for name, text in (("passwd", _PASSWD), ("group", _GROUP)):
            (layout.etc_dir / name).write_text(text)
            (layout.etc_dir / name).chmod(0o644)
    used = [layout.workspace, layout.home, layout.etc_dir, layout.resolv_conf, *layout.extra_ro]
    for needed in used:
        if needed is not None:
            _check_reachable(needed, layout.host_uid, layout.host_gid)


def check_extra_ro(path: Path) -> None:
    """Refuse an extra read-only path that is relative, the root, or under a hidden area."""
    if not path.is_absolute() or path != Path(os.path.normpath(path)):
        raise CorralError(f"extra read-only path {str(path)!r} must be absolute and normalised")
    if path in _NOT_SHOWN_WHOLE or any(path == top or top in path.parents for top in _NOT_SHOWN):
        raise CorralError(f"extra read-only path {str(path)!r} cannot be shown in a sandbox: it is a "
                          f"system directory as a whole, or under {', '.join(map(str, _NOT_SHOWN))}, "
                          "which hold host secrets, sockets and devices")


def _check_ids(layout: FsLayout) -> None:
    if layout.host_uid <= 0 or layout.host_gid <= 0:
        raise CorralError(f"the sandbox must run as an unprivileged host uid/gid, not "
                          f"{layout.host_uid}:{layout.host_gid}")


def _check_absolute(path: Path, what: str) -> None:
    if not path.is_absolute():
        raise CorralError(f"{what} path {path} must be absolute")


def _system_mounts() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in _SYSTEM_TOP:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return [*args, "--ro-bind", "/etc", "/etc"]


def _masks() -> list[str]:
    files = [*_MASKED_FILES, *(p for pattern in _MASKED_GLOBS for p in sorted(glob.glob(pattern)))]
    # Only what exists: bwrap cannot create a mount point in the read-only /etc.
    args = [a for f in files if os.path.lexists(f) for a in ("--ro-bind", "/dev/null", f)]
    return args + [a for d in _MASKED_DIRS if os.path.isdir(d) for a in ("--tmpfs", d)]


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": SANDBOX_HOME, "USER": SANDBOX_USER, "LOGNAME": SANDBOX_USER,
           "LANG": "C.UTF-8", "TERM": "xterm-256color"}
    for name, value in (extra or {}).items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise CorralError(f"invalid environment variable name or value: {name!r}")
        if name in _REFUSED_ENV or name.startswith(_REFUSED_ENV_PREFIXES):
            raise CorralError(f"refusing to pass {name} into a sandbox: it carries host credentials "
                              f"or an agent socket")
        env[name] = value
    return env


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    # lchown and os.walk's default of not following symlinks keep this inside the tree.
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _check_reachable(path: Path, uid: int, gid: int) -> None:
    """Fail now, with the fix, if uid cannot reach path (bwrap would fail with less to say)."""
    if not path.exists():
        raise CorralError(f"{path} does not exist")
    for ancestor in reversed(path.absolute().parents):
        if not _may(ancestor.stat(), uid, gid, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            raise CorralError(f"uid {uid} cannot reach {path}: {ancestor} is not searchable by it "
                              f"(chmod o+x {ancestor}, or keep sandbox files elsewhere)")
    if not _may(path.stat(), uid, gid, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
        raise CorralError(f"uid {uid} cannot read {path}")


def _may(st: os.stat_result, uid: int, gid: int, user_bit: int, group_bit: int, other_bit: int) -> bool:
    # Classic owner/group/other check for a process whose only group is gid (setpriv clears the rest).
    if st.st_uid == uid:
        return bool(st.st_mode & user_bit)
    if st.st_gid == gid:
        return bool(st.st_mode & group_bit)
    return bool(st.st_mode & other_bit)
