"""What a sandbox costs to make, use once and throw away.

Three ways to run `true`, interleaved in one run so they see the same machine:

- plain: `true` as a subprocess (the baseline);
- API: `with corral.Sandbox() as sb: sb.exec(["true"])`, reusing one already-loaded Monitor
  (how an RL trainer runs thousands of rollouts);
- CLI: `corral run -- true`, a cold process that loads the sensor itself.

    .venv/bin/python benchmarks/sandbox_lifecycle.py            # ~1 minute, updates the doc
    .venv/bin/python benchmarks/sandbox_lifecycle.py --quick    # a few seconds, prints only
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import _bench

from corral import Sandbox

API_TARGET_S = 0.150  # added over plain `true`, sensor already loaded
CLI_TARGET_S = 1.5    # added over plain `true`, cold
CORRAL = str(Path(sys.executable).parent / "corral")


def plain() -> float:
    t0 = time.perf_counter()
    subprocess.run(["true"], check=True)
    return time.perf_counter() - t0


def api() -> float:
    t0 = time.perf_counter()
    with Sandbox() as sb:
        if sb.exec(["true"]).exit_code != 0:
            raise RuntimeError("`true` failed in the sandbox")
    return time.perf_counter() - t0


def cli() -> float:
    t0 = time.perf_counter()
    subprocess.run([CORRAL, "run", "--", "true"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    args = _bench.common_args(__doc__ or "").parse_args()
    _bench.require_host()
    reps = 3 if args.quick else 15
    with Sandbox() as warm:  # loads the shared Monitor and egress guard once, as a long-lived user would
        warm.exec(["true"])
    times: dict[str, list[float]] = {"plain": [], "api": [], "cli": []}
    with _bench.terminate_as_exit():
        for _ in range(reps):
            for name, fn in (("plain", plain), ("api", api), ("cli", cli)):
                times[name].append(fn())
    base = _bench.stats(times["plain"])
    api_s, cli_s = _bench.stats(times["api"]), _bench.stats(times["cli"])
    api_added = api_s.median - base.median
    cli_added = cli_s.median - base.median
    lines = [
        "## Sandbox lifecycle: create, exec `true`, destroy",
        "",
        f"`.venv/bin/python benchmarks/sandbox_lifecycle.py`: {reps} interleaved rounds of plain `true`, "
        "`with Sandbox() as sb: sb.exec(['true'])` reusing one loaded Monitor, and a cold `corral run -- true`.",
        "",
        *_bench.machine_lines(_bench.machine()),
        "",
        "| way | median | min – max |",
        "|---|---:|---:|",
        f"| plain `true` | {base.median * 1000:.1f} ms | {base.lo * 1000:.1f} – {base.hi * 1000:.1f} ms |",
        f"| Python API, Monitor reused | {api_s.median * 1000:.0f} ms | {api_s.lo * 1000:.0f} – "
        f"{api_s.hi * 1000:.0f} ms |",
        f"| `corral run -- true`, cold | {cli_s.median * 1000:.0f} ms | {cli_s.lo * 1000:.0f} – "
        f"{cli_s.hi * 1000:.0f} ms |",
        "",
        f"**Added by a sandbox, API: {api_added * 1000:.0f} ms** (target ≤ {API_TARGET_S * 1000:.0f} ms: "
        f"{'met' if api_added <= API_TARGET_S else 'MISSED'}). "
        f"**Added by a cold CLI run: {cli_added * 1000:.0f} ms** (target ≤ {CLI_TARGET_S * 1000:.0f} ms: "
        f"{'met' if cli_added <= CLI_TARGET_S else 'MISSED'}).",
        "",
        "A sandbox is a cgroup in every hierarchy, a network namespace with a veth pair, egress map "
        "entries, canary credentials (an ssh-keygen run), a bubblewrap holder process and one nsenter step; "
        "a cold CLI run also starts Python, loads the sensor and attaches its programs.",
    ]
    print("\n".join(lines))
    if not args.quick and not args.no_doc:
        _bench.update_doc("sandbox_lifecycle", lines)
    missed = api_added > API_TARGET_S or cli_added > CLI_TARGET_S
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
