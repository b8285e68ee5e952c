"""Store ingest: events/s from a Sandbox's event stream into the SQLite store, batched.

Real events: one sandbox step runs an agent-like loop (execs, opens, connects to loopback) and
its events are kept; they are replayed (cycled) into two writers, interleaved in one run:

- raw: the floor, SQLite alone: rows serialized beforehand, `executemany` in batches of 5000;
- recorder: what a sandbox does, `Recorder.event()` from the calling thread for every event,
  then `flush()`: serialization, queueing, the writer thread, batched transactions.

    .venv/bin/python benchmarks/store_ingest.py            # ~1 minute, updates the doc
    .venv/bin/python benchmarks/store_ingest.py --quick    # a few seconds, prints only
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _bench

from corral import Sandbox
from corral import events as ev
from corral.store import EventRow, Recorder, open_store
from corral.store.recorder import BATCH

TARGET = 100_000  # events/s
WORKLOAD = ("for i in $(seq 60); do cat /etc/hostname > /dev/null; ls /workspace > /dev/null; "
            "python3 -c 'import socket; s = socket.socket(); s.connect_ex((\"127.0.0.1\", 9))'; done")


def record_events() -> list[ev.Event]:
    with Sandbox(mode="observe") as sb:
        sb.exec(WORKLOAD)
        sb.flush_events()
        return list(sb.events)


def raw(rows: list[EventRow], directory: Path) -> float:
    store = open_store(directory)
    t0 = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        store.add_events(rows[i:i + BATCH])
    took = time.perf_counter() - t0
    store.close()
    return len(rows) / took


def recorder(stream: list[ev.Event], directory: Path) -> tuple[float, float]:
    """(events/s end to end, µs per event on the calling thread)."""
    rec = Recorder(open_store(directory))
    t0 = time.perf_counter()
    for e in stream:
        rec.event("sb-bench", e)
    queued = time.perf_counter() - t0
    if not rec.flush(timeout=600):
        raise RuntimeError("the recorder did not finish within 10 minutes")
    took = time.perf_counter() - t0
    if rec.dropped:
        raise RuntimeError(f"the recorder dropped {rec.dropped} events")
    rec.close()
    return len(stream) / took, queued / len(stream) * 1e6


def main() -> int:
    args = _bench.common_args(__doc__ or "").parse_args()
    _bench.require_host()
    n = 50_000 if args.quick else 300_000
    reps = 2 if args.quick else 5
    events = record_events()
    kinds = sorted({e.kind for e in events})
    stream = [events[i % len(events)] for i in range(n)]
    rows = [EventRow("sb-bench", e.step_id, e.time_ns, e.kind, e.pid, e.ppid, e.comm,
                     json.dumps(e.to_dict(), default=str)) for e in stream]
    size = sum(len(r.data) for r in rows) / len(rows)
    raw_rates, rec_rates, caller_us = [], [], []
    with _bench.terminate_as_exit():
        for _ in range(reps):
            for way in ("raw", "recorder"):
                directory = Path(tempfile.mkdtemp(prefix="corral-bench-store-"))
                try:
                    if way == "raw":
                        raw_rates.append(raw(rows, directory))
                    else:
                        r, us = recorder(stream, directory)
                        rec_rates.append(r)
                        caller_us.append(us)
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
    base, rec, caller = _bench.stats(raw_rates), _bench.stats(rec_rates), _bench.stats(caller_us)
    lines = [
        "## Store ingest: events into SQLite (WAL), batched",
        "",
        f"`.venv/bin/python benchmarks/store_ingest.py`: {len(events)} real events of a sandbox step "
        f"({', '.join(kinds)}; {size:.0f} bytes of JSON each on average) cycled to {n:,} and written "
        f"{reps} times each way, interleaved, each into a new store in the temporary directory.",
        "",
        *_bench.machine_lines(_bench.machine()),
        "",
        "| writer | events/s, median | min – max |",
        "|---|---:|---:|",
        f"| SQLite alone (pre-serialized rows, batches of {BATCH}) | {_bench.rate(base.median)} | "
        f"{_bench.rate(base.lo)} – {_bench.rate(base.hi)} |",
        f"| `Recorder` (serialize + queue + writer thread) | {_bench.rate(rec.median)} | "
        f"{_bench.rate(rec.lo)} – {_bench.rate(rec.hi)} |",
        "",
        f"**Ingest: {_bench.rate(rec.median)} events/s** (target ≥ {_bench.rate(TARGET)}: "
        f"{'met' if rec.median >= TARGET else 'MISSED'}), {rec.median / base.median:.2f}× SQLite's own rate; "
        f"the calling (pipeline) thread spends {caller.median:.2f} µs per event queueing it.",
    ]
    print("\n".join(lines))
    if not args.quick and not args.no_doc:
        _bench.update_doc("store_ingest", lines)
    return 1 if args.strict and rec.median < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
