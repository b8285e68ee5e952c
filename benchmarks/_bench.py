"""What the benchmarks share: the machine, statistics, C helpers, cleanup and docs/performance.md.

Every benchmark is one command that prints its figures and (unless ``--quick`` or ``--no-doc``)
replaces its own section of docs/performance.md, between markers, leaving the rest of the file
as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.sensor.cgroups import ScratchCgroup

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"

DOC_HEADER = """\
# Performance

Figures measured by the scripts in [benchmarks/](../benchmarks/README.md); each script rewrites
its own section below (between its `BEGIN`/`END` markers) when run without `--quick`, so edit the
script, not the section.  `make bench` runs them all.

The development machines are small and shared (2 vCPUs, other people building and testing on
them at the same time), so every comparison is made between runs interleaved in the same
invocation (A, B, B, A, ...), figures are medians over repeats with their spread, and absolute
times are only context.
"""


# -- the machine --------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str]:
    load = os.getloadavg()
    return {
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} online, {len(os.sched_getaffinity(0))} usable by this process",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min, at start)",
        "code": code_version(),
    }


def code_version() -> str:
    """The checkout measured: its commit, and whether files differ from it."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty=+uncommitted changes",
                              "--exclude", "*"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    text = out.stdout.strip()
    return text.replace("+", " + ") if out.returncode == 0 and text else "unknown"


def machine_lines(m: dict[str, str]) -> list[str]:
    return [
        f"- Machine: {m['cpu']}, {m['cores']}; kernel {m['kernel']}; {m['python']}",
        f"- Date: {m['date']}; load average {m['load']}; code: commit {m['code']}",
    ]


def bpf_programs() -> int | None:
    """BPF programs loaded on the host now, of any kind and owner, or None if unknown.

    On a quiet host this is 0 while no sensor is loaded; other people's sensors or tests
    (tracepoints, cgroup hooks) make the processes a benchmark measures slower.
    """
    bpftool = shutil.which("bpftool") or ("/usr/sbin/bpftool" if os.path.exists("/usr/sbin/bpftool") else None)
    if bpftool is None:
        return None
    try:
        out = subprocess.run([bpftool, "-j", "prog", "show"], capture_output=True, text=True, timeout=20)
        return len(json.loads(out.stdout or "[]"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


# -- statistics ---------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent."""
        return (self.hi - self.lo) / self.median * 100 if self.median else 0.0


def stats(values: Sequence[float]) -> Stats:
    if not values:
        raise ValueError("no measurements")
    return Stats(tuple(values))


def rate(x: float) -> str:
    return f"{x:,.0f}"


def pct(ratio: float) -> str:
    """A slowdown ratio (1.03) as a signed percentage (+3.0%)."""
    return f"{(ratio - 1) * 100:+.1f}%"


#: A C load generator (compile it with Workdir.compile) used by the benchmarks that need a paced
#: kernel event storm from one process: detection_latency.py (connects only) and pipeline_throughput.py.
PACED_LOADGEN_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* loadgen RATE MIX STOPFILE MAX_S PATH: events at RATE a second, paced in 1 ms ticks (a late tick
 * catches up), until STOPFILE exists or MAX_S seconds have passed.  The steps cycle through MIX:
 * c  connect() a UDP socket to 127.0.0.1:1 (no packet is sent)       -> connect
 * o  open() and close() PATH, under a watched prefix                  -> open
 * x  fork(); the child execs /bin/true (children are not waited for)  -> fork, exec, exit
 * Prints the events made and the seconds taken. */
int main(int argc, char **argv)
{
	if (argc != 6)
		return 2;
	double rate = atof(argv[1]), max_s = atof(argv[4]);
	const char *mix = argv[2], *stop = argv[3], *path = argv[5];
	size_t n = strlen(mix), step = 0;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(1) };
	struct timespec t0, next, now;
	long done = 0;

	if (s < 0 || n == 0)
		return 3;
	signal(SIGCHLD, SIG_IGN); /* children reap themselves */
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	next = t0;
	for (long tick = 1;; tick++) {
		long due = (long)(rate * tick / 1000.0);

		while (done < due) {
			char what = mix[step++ % n];

			if (what == 'c') {
				connect(s, (struct sockaddr *)&a, sizeof(a));
				done++;
			} else if (what == 'o') {
				int fd = open(path, O_RDONLY | O_CLOEXEC);

				if (fd >= 0)
					close(fd);
				done++;
			} else {
				pid_t pid = fork();

				if (pid == 0) {
					execl("/bin/true", "true", (char *)NULL);
					_exit(127);
				}
				done += 3;
			}
		}
		if (tick % 10 == 0 && (access(stop, F_OK) == 0 || tick >= max_s * 1000))
			break;
		next.tv_nsec += 1000000;
		if (next.tv_nsec >= 1000000000) {
			next.tv_nsec -= 1000000000;
			next.tv_sec++;
		}
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
	}
	clock_gettime(CLOCK_MONOTONIC, &now);
	printf("%ld %.6f\n", done, (now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) / 1e9);
	return 0;
}
"""


# -- running things -------------------------------------------------------------

def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run (a few seconds); does not touch docs/performance.md")
    p.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    return p


def require_host() -> None:
    """Root, gcc and the sensor's object: say what is missing in one line."""
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (they load the kernel sensor): run them with sudo")
    if shutil.which("gcc") is None:
        sys.exit("benchmarks compile small C load generators: install gcc")
    from corral.sensor.sensor import object_path

    if not object_path().exists():
        sys.exit(f"{object_path()} is not built: run `make setup` first")


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the ``finally`` clauses clean up."""
    def raise_exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class Workdir:
    """A temporary directory for compiled load generators and their files, removed on exit."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="corral-bench-"))

    def compile(self, name: str, source: str) -> Path:
        src = self.path / f"{name}.c"
        src.write_text(source)
        exe = self.path / name
        res = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"gcc failed on {name}.c:\n{res.stderr}")
        return exe

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def schedstat(tid: int | None) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for a CPU) of a thread of this process, or None."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            on_cpu, waiting, _slices = f.read().split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError, TypeError):
        return None


def kill_and_reap(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None) -> None:
    """End a child this benchmark started (by its own Popen), if it still runs."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def empty_cgroup(cg: ScratchCgroup) -> None:
    """SIGKILL what is left in a scratch cgroup this benchmark made and filled, then remove it.

    Every process in it was started by the benchmark (its load generators and their children).
    """
    with contextlib.suppress(OSError):
        for pid in cg.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    cg.remove()


# -- docs/performance.md ------------------------------------------------------------

def update_doc(key: str, lines: list[str], doc: Path = DOC) -> None:
    """Replace (or append) the section between this key's markers."""
    begin = f"<!-- BEGIN {key}: generated by benchmarks/{key}.py, edit the script, not this -->"
    end = f"<!-- END {key} -->"
    block = "\n".join([begin, *lines, end]) + "\n"
    text = doc.read_text() if doc.exists() else DOC_HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(key)}:.*?<!-- END {re.escape(key)} -->\n?", re.S)
    found = pattern.search(text)
    text = pattern.sub(lambda _m: block, text, count=1) if found else text.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)
