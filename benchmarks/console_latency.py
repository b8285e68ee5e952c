"""The daemon's two figures: alert-to-browser latency and the API's exec round trip.

Starts `corral serve` (its own data directory, socket and loopback port), and:

- exec round trip: `POST /api/sandboxes/ID/exec {"command": ["true"]}` over the Unix socket,
  interleaved with the baseline, `Sandbox.exec(["true"])` called directly in this process
  (sensor loaded, no daemon, no HTTP): the difference is what the API adds;
- alert to browser: a headless Chromium (Playwright, Debian's chromium) has the console open;
  each round a step reads a canary credential, and the page notes when the `alert` message
  arrives (Date.now() in the page); latency = that moment minus the alert's own time (when the
  engine made it, wall clock, same machine).

    .venv/bin/python benchmarks/console_latency.py            # ~1 minute, updates the doc
    .venv/bin/python benchmarks/console_latency.py --quick    # a few seconds, prints only
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import _bench

from corral import Sandbox
from corral.console.client import Client
from corral.store.sqlite import ns_of

EXEC_TARGET_MS = 150.0
ALERT_P99_TARGET_MS = 500.0
CORRAL = str(Path(sys.executable).parent / "corral")
CHROMIUM = shutil.which("chromium")


@contextlib.contextmanager
def daemon(tmp: Path) -> Iterator[tuple[Client, str]]:
    sock = tmp / "corral.sock"
    proc = subprocess.Popen([CORRAL, "serve", "--data", str(tmp / "data"), "--socket", str(sock),
                             "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", line)
            url = url or (m.group(1) if m else None)
            if "unix:" in line:
                break
        if url is None:
            raise RuntimeError("corral serve did not start")
        yield Client(f"unix:{sock}"), url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                _bench.kill_and_reap(proc)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    args = _bench.common_args(__doc__ or "").parse_args()
    _bench.require_host()
    if CHROMIUM is None:
        sys.exit("the alert-to-browser figure needs Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    rounds = 5 if args.quick else 40
    api_ms, direct_ms, alert_ms = [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-console-"))
    try:
        with _bench.terminate_as_exit(), daemon(tmp) as (client, url), Sandbox(mode="observe") as direct, \
                sync_playwright() as p:
            name = client.call("POST", "/api/sandboxes", {"mode": "observe"})["name"]
            for _ in range(3):  # warm both ways
                client.call("POST", f"/api/sandboxes/{name}/exec", {"command": ["true"]})
                direct.exec(["true"])
            for _ in range(rounds):
                t0 = time.perf_counter()
                client.call("POST", f"/api/sandboxes/{name}/exec", {"command": ["true"]})
                api_ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                direct.exec(["true"])
                direct_ms.append((time.perf_counter() - t0) * 1000)

            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.add_init_script("window.arrivals = {};"
                                     "const Real = window.EventSource;"
                                     "window.EventSource = function (u) { const s = new Real(u);"
                                     " s.addEventListener('alert', (m) => {"
                                     "  window.arrivals[JSON.parse(m.data).alert.id] = Date.now(); });"
                                     " return s; };")
                page.goto(url)
                page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=15_000)
                for _ in range(rounds):
                    result = client.call("POST", f"/api/sandboxes/{name}/exec",
                                         {"command": "cat ~/.aws/credentials > /dev/null"})
                    for alert in result["alerts"]:
                        page.wait_for_function(f"window.arrivals[{alert['id']!r}] !== undefined", timeout=10_000)
                        arrived_ms = page.evaluate(f"window.arrivals[{alert['id']!r}]")
                        alert_ms.append(arrived_ms - ns_of(alert["time"]) / 1e6)
            finally:
                browser.close()
            client.call("POST", f"/api/sandboxes/{name}/stop")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    api_s, direct_s = _bench.stats(api_ms), _bench.stats(direct_ms)
    added = api_s.median - direct_s.median
    p50, p99 = statistics.median(alert_ms), percentile(alert_ms, 99)
    lines = [
        "## The daemon: API exec round trip, alert to browser",
        "",
        f"`.venv/bin/python benchmarks/console_latency.py`: `corral serve` in a child process; {rounds} "
        "interleaved rounds of `POST /api/sandboxes/ID/exec` of `true` over the Unix socket and of "
        "`Sandbox.exec(['true'])` in this process; then the console open in headless Chromium while "
        f"{rounds} steps each read a canary credential ({len(alert_ms)} alerts timed from the alert's "
        "own time to its arrival in the page).",
        "",
        *_bench.machine_lines(_bench.machine()),
        "",
        "| | median | min – max |",
        "|---|---:|---:|",
        f"| `Sandbox.exec(['true'])`, in process | {direct_s.median:.1f} ms | {direct_s.lo:.1f} – "
        f"{direct_s.hi:.1f} ms |",
        f"| API exec of `true` (HTTP over the Unix socket) | {api_s.median:.1f} ms | {api_s.lo:.1f} – "
        f"{api_s.hi:.1f} ms |",
        "",
        f"**API exec round trip: {api_s.median:.1f} ms** (target ≤ {EXEC_TARGET_MS:.0f} ms: "
        f"{'met' if api_s.median <= EXEC_TARGET_MS else 'MISSED'}), of which the API adds {added:.1f} ms.",
        f"**Alert to browser: p50 {p50:.0f} ms, p99 {p99:.0f} ms**, max {max(alert_ms):.0f} ms "
        f"(target p99 ≤ {ALERT_P99_TARGET_MS:.0f} ms: {'met' if p99 <= ALERT_P99_TARGET_MS else 'MISSED'}).",
    ]
    print("\n".join(lines))
    if not args.quick and not args.no_doc:
        _bench.update_doc("console_latency", lines)
    missed = api_s.median > EXEC_TARGET_MS or p99 > ALERT_P99_TARGET_MS
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
