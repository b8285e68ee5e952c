"""Run every benchmark, one after the other (``make bench``).

    .venv/bin/python benchmarks/run.py            # ~9 minutes; updates docs/performance.md
    .venv/bin/python benchmarks/run.py --quick    # ~1 minute smoke run; prints only

Options are passed on to each benchmark (--quick, --no-doc, --strict).  Each one runs in its own
process, so a failure in one does not stop the next; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("decode_throughput.py", "syscall_overhead.py", "sandbox_lifecycle.py", "workload_overhead.py",
              "scale.py", "engine_throughput.py", "pipeline_throughput.py", "detection_latency.py",
              "store_ingest.py", "console_latency.py")


def main() -> int:
    p = argparse.ArgumentParser(description="Run every corral benchmark.")
    p.add_argument("--quick", action="store_true", help="short smoke runs; docs/performance.md is left alone")
    p.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    p.add_argument("--strict", action="store_true", help="fail when a target is missed")
    p.add_argument("only", nargs="*", help="run only these (e.g. decode_throughput)")
    args = p.parse_args()
    passed = [flag for flag, on in (("--quick", args.quick), ("--no-doc", args.no_doc),
                                     ("--strict", args.strict)) if on]
    chosen = [b for b in BENCHMARKS if not args.only or b.removesuffix(".py") in args.only]
    unknown = set(args.only) - {b.removesuffix(".py") for b in BENCHMARKS}
    if unknown:
        p.error(f"no such benchmark: {', '.join(sorted(unknown))} (have: "
                f"{', '.join(b.removesuffix('.py') for b in BENCHMARKS)})")
    failed = []
    for name in chosen:
        print(f"== {name} {' '.join(passed)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, str(HERE / name), *passed])
        print(f"== {name}: exit {rc} after {time.monotonic() - t0:.0f} s\n", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
