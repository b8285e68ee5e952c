"""corral.Monitor: the sensor and the process table, as one object.

    with Monitor() as mon:
        mon.watch_cgroup("/sys/fs/cgroup/unified/my-agent")
        while True:
            for event in mon.read(timeout=1.0):
                print(event.kind, event.proc.cmdline if event.proc else event.comm)
"""

from __future__ import annotations

from pathlib import Path

from corral.enrich.proctable import Process, ProcessTable
from corral.events import Event, FileId
from corral.sensor.sensor import Sensor

#: Path prefixes watched by default: where credentials, persistence and
#: escape routes live.  Opens elsewhere are not reported (see trace_all_opens).
SYSTEM_PREFIXES = (
    "/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/cron", "/etc/systemd/system",
    "/etc/ld.so.preload", "/etc/profile.d/", "/var/spool/cron/", "/proc/sys/kernel/core_pattern",
    "/sys/kernel/uevent_helper", "/sys/fs/cgroup/", "/var/run/docker.sock", "/run/docker.sock",
    "/run/containerd/", "/dev/shm/", "/var/run/secrets/", "/var/lib/kubelet/",
)
#: Under each home directory.
HOME_ENTRIES = (
    ".ssh/", ".aws/", ".config/gcloud/", ".azure/", ".kube/", ".docker/config.json", ".netrc",
    ".git-credentials", ".pypirc", ".npmrc", ".env", ".bashrc", ".bash_profile", ".profile",
    ".bash_history", ".config/autostart/", ".config/systemd/", ".bitcoin/", ".ethereum/",
    ".electrum/", ".local/share/keyrings/",
)


def default_watched_prefixes() -> list[str]:
    """SYSTEM_PREFIXES, and HOME_ENTRIES under /root and every /home/* directory."""
    homes = [Path("/root"), *sorted(p for p in Path("/home").glob("*") if p.is_dir())]
    return list(SYSTEM_PREFIXES) + [f"{home}/{entry}" for home in homes for entry in HOME_ENTRIES]


class Monitor:
    """Watch cgroups and read their processes' events, each joined to its process."""

    def __init__(self, *, host_wide: bool = False, trace_all_opens: bool = False,
                 watched_prefixes: list[str] | None = None,
                 ring_size: int = 16 << 20) -> None:
        self.sensor = Sensor(host_wide=host_wide, trace_all_opens=trace_all_opens, ring_size=ring_size)
        try:
            for prefix in default_watched_prefixes() if watched_prefixes is None else watched_prefixes:
                self.sensor.watch_prefix(prefix)
            self.processes = ProcessTable()
        except BaseException:
            self.sensor.close()
            raise

    def watch_cgroup(self, cgroup: int | str | Path, sandbox_id: int = 0, step_id: int = 0) -> int:
        return self.sensor.watch_cgroup(cgroup, sandbox_id, step_id)

    def unwatch_cgroup(self, cgroup: int | str | Path) -> None:
        self.sensor.unwatch_cgroup(cgroup)

    def watch_prefix(self, prefix: str) -> None:
        self.sensor.watch_prefix(prefix)

    def watch_file(self, path: str | Path) -> FileId:
        return self.sensor.watch_file(path)

    def read(self, timeout: float = 0.0) -> list[Event]:
        """The next batch of events, in kernel order, each with ``.proc`` set."""
        batch = self.sensor.read(timeout)
        table = self.processes
        for event in batch:
            table.update(event)
            event.proc = table.get(event.pid) if event.pid else None
        return batch

    def ancestors(self, pid: int, depth: int = 8) -> list[Process]:
        return self.processes.ancestors(pid, depth)

    @property
    def drops(self) -> int:
        return self.sensor.drops_total

    def close(self) -> None:
        self.sensor.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
