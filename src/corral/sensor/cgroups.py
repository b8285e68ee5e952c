"""cgroup v2 ids, the unit of the sensor's in-kernel scope."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from corral.errors import CorralError
from corral.sensor.host import cgroup2_root


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


class ScratchCgroup:
    """A fresh cgroup v2 directory to run something in, removed when done."""

    def __init__(self, name: str) -> None:
        base = cgroup2_root() / "corral"
        base.mkdir(exist_ok=True)
        self.path = base / name
        self.path.mkdir()
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
