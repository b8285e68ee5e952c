"""cgroup v2 ids, the unit of the sensor's in-kernel scope."""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Set
from pathlib import Path

from corral.errors import CorralError, HostError
from corral.sensor.host import cgroup2_root, left_by_dead_owner
from corral.sensor.libbpf import BpfObject, Link


def cgroup_id(path: str | Path) -> int:
    """The kernel's id of a cgroup v2 directory (its kernfs inode number)."""
    return os.stat(path).st_ino


def cgroup_of_pid(pid: int) -> Path:
    """The cgroup v2 directory that process ``pid`` is in."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise CorralError(f"no process with pid {pid}") from None
    for line in lines:
        hier, _controllers, path = line.split(":", 2)
        if hier == "0":
            return cgroup2_root() / path.lstrip("/")
    raise CorralError(f"process {pid} is in no cgroup v2 (is cgroup2 mounted?)")


def resolve_cgroup(path: str) -> Path:
    """A cgroup named absolutely or relative to the cgroup v2 mount."""
    p = Path(path)
    if not p.is_absolute() or not p.exists():
        p = cgroup2_root() / path.lstrip("/")
    if not (p / "cgroup.procs").exists():
        raise CorralError(f"{path} is not a cgroup v2 directory (looked at {p})")
    return p


#: Every cgroup corral makes lives below this directory of each hierarchy.
CORRAL = "corral"
_held_by_us = False


def corral_cgroup() -> Path:
    """<v2root>/corral: sandboxes' cgroups live below it, corral's cgroup programs attach to it."""
    return cgroup2_root() / CORRAL


def hold_corral_cgroup() -> Path:
    """Make <v2root>/corral and keep it while this process has programs attached there.

    An empty child ``holder-<pid>`` stops another sandbox's cleanup from
    removing the directory (and with it our attachment) while we run; it is
    released at exit, and reap_stale_holders() removes those of dead processes.
    """
    global _held_by_us
    base = corral_cgroup()
    base.mkdir(exist_ok=True)
    if not _held_by_us:
        (base / f"holder-{os.getpid()}").mkdir(exist_ok=True)
        atexit.register(release_corral_cgroup)
        _held_by_us = True
    return base


def attach_to_corral_cgroup(obj: BpfObject, sections: Set[str]) -> list[Link]:
    """Attach the object's programs of these sections (cgroup hooks) to <v2root>/corral,
    where they see every sandbox's processes and sockets; held as hold_corral_cgroup says."""
    programs = [p for p in obj.programs() if p.section in sections]
    if {p.section for p in programs} != sections:
        raise HostError(f"{obj.path} lacks some of {sorted(sections)}: run `make setup`")
    links: list[Link] = []
    fd = os.open(hold_corral_cgroup(), os.O_RDONLY | os.O_DIRECTORY)
    try:  # a BPF link keeps the attachment; the directory fd is not needed after
        for prog in programs:
            links.append(prog.attach_cgroup(fd))
    except BaseException:
        for link in links:
            link.destroy()
        raise
    finally:
        os.close(fd)
    return links


def release_corral_cgroup() -> None:
    """Drop this process's hold on <v2root>/corral and remove it if nothing else is there."""
    global _held_by_us
    if _held_by_us:
        remove_if_empty(corral_cgroup() / f"holder-{os.getpid()}")
        _held_by_us = False
    remove_if_empty(corral_cgroup())


def reap_stale_holders() -> None:
    """Remove the holds of corral processes that died without releasing them."""
    with contextlib.suppress(FileNotFoundError):
        for entry in corral_cgroup().glob("holder-*"):
            pid = entry.name.removeprefix("holder-")
            if pid.isdigit() and left_by_dead_owner(entry, int(pid)):
                remove_if_empty(entry)


def remove_if_empty(cgroup: Path) -> None:
    """rmdir a cgroup unless it still has children or processes (or is gone already)."""
    with contextlib.suppress(OSError):  # ENOTEMPTY, EBUSY, ENOENT: not ours to remove now
        cgroup.rmdir()


class ScratchCgroup:
    """A fresh cgroup v2 directory to run something in, removed when done."""

    def __init__(self, name: str) -> None:
        self.path = corral_cgroup() / name
        self.path.mkdir(parents=True)  # (parents: another process may just have removed an empty corral/)
        self.id = cgroup_id(self.path)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        """Remove the directory; processes still in it move to the parent first."""
        parent_procs = self.path.parent.parent / "cgroup.procs"
        for pid in self.pids():
            with contextlib.suppress(OSError):  # already gone
                parent_procs.write_text(f"{pid}\n")
        with contextlib.suppress(FileNotFoundError):
            self.path.rmdir()
        remove_if_empty(self.path.parent)
