"""`corral serve`, its API, `corral exec|sandbox`, and the web console in a real headless Chromium.

Each test starts the real daemon (`corral serve`) as a child process with a data directory and
socket of its own, and a free TCP port on loopback; the browser test drives Debian's chromium
with Playwright.  Sandboxes are made by the daemon, as an agent framework would make them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral.console.client import Client
from corral.errors import CorralError
from corral.sandbox.runner import STATE_DIR
from corral.store import open_store

CORRAL = str(Path(sys.executable).with_name("corral"))
RESPOND_RULES = str(Path(__file__).parent / "rules" / "respond.yaml")
CHROMIUM = shutil.which("chromium")
SCREENSHOTS = Path(os.environ.get("CORRAL_SCREENSHOTS", "")) if os.environ.get("CORRAL_SCREENSHOTS") else None

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None,
                                reason="needs root and bubblewrap (sandboxes, BPF)")


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    data: Path
    socket: Path
    url: str  # http://127.0.0.1:PORT
    token: str
    log: list[str]

    @property
    def client(self) -> Client:
        return Client(f"unix:{self.socket}")

    def http(self, path: str, *, token: str | None = None, method: str = "GET") -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _start(tmp_path: Path, *extra: str) -> Daemon:
    data, sock = tmp_path / "data", tmp_path / "corral.sock"
    process = subprocess.Popen([CORRAL, "serve", "--data", str(data), "--socket", str(sock),
                                "--listen", "127.0.0.1:0", *extra],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    found: dict[str, str] = {}
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
            if m:
                found["url"], found["token"] = m.group(1), m.group(2)
            if line.strip().startswith("corral:   unix:"):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(60)
    if "url" not in found:
        process.kill()
        process.wait()
        pytest.fail("corral serve did not start:\n" + "".join(log))
    return Daemon(process, data, sock, found["url"], found["token"], log)


def _stop(daemon: Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(60)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = _start(tmp_path, "--rules", RESPOND_RULES)
    try:
        yield d
    finally:
        _stop(d)
    # Stopping the daemon stops its sandboxes: none of their cgroups is left.
    assert not [p for p in Path("/sys/fs/cgroup/unified/corral").glob("sb-*")
                if p.name.startswith(f"sb-{d.process.pid}-")]


def _corral(*args: str, daemon: Daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CORRAL, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CORRAL_URL": f"unix:{daemon.socket}"})


# -- the API ------------------------------------------------------------------------------------

def test_tcp_needs_the_token_the_socket_is_roots(daemon: Daemon) -> None:
    assert daemon.http("/api/health")[0] == 401
    assert daemon.http("/api/health", token="wrong")[0] == 401
    status, body = daemon.http("/api/health", token=daemon.token)
    assert status == 200 and body["ok"] is True
    assert daemon.client.call("GET", "/api/health")["ok"] is True  # no token on the socket
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    token_file = daemon.data / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == daemon.token


def test_exec_through_the_daemon(daemon: Daemon) -> None:
    made = _corral("sandbox", "create", "--mode", "observe", "--episode", "ep-cli", daemon=daemon)
    assert made.returncode == 0, made.stderr
    name = made.stdout.strip()
    assert re.fullmatch(r"sb-\d+-[0-9a-f]{8}", name)

    ok = _corral("exec", "--sandbox", name, "--", "sh", "-c", "echo out; echo err >&2; exit 3", daemon=daemon)
    assert (ok.returncode, ok.stdout, ok.stderr) == (3, "out\n", "err\n")

    caught = _corral("exec", "--sandbox", name, "--", "cat ~/.aws/credentials > /dev/null", daemon=daemon)
    assert caught.returncode == 0
    assert "CRITICAL [credential_access] Canary credential opened" in caught.stderr

    missing = _corral("exec", "--sandbox", "sb-1-00000000", "--", "true", daemon=daemon)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("corral: error: corral serve: no running sandbox sb-1-00000000")

    # Everything is in the store, read without the daemon.
    listed = daemon.client.call("GET", "/api/sandboxes")
    assert [s["name"] for s in listed] == [name] and listed[0]["steps"] == 2 and listed[0]["alerts"] >= 1
    detail = daemon.client.call("GET", f"/api/sandboxes/{name}")
    assert [(s["step"], s["exit_code"]) for s in detail["steps"]] == [(1, 3), (2, 0)]
    assert "Canary credential opened" in {a["rule"] for a in detail["alerts"]}

    stopped = _corral("sandbox", "stop", name, daemon=daemon)
    assert stopped.returncode == 0
    assert daemon.client.call("GET", "/api/sandboxes") == []
    assert daemon.client.call("GET", "/api/sandboxes?all=1")[0]["state"] == "stopped"


def test_freeze_evidence_release_and_stop(daemon: Daemon) -> None:
    client = daemon.client
    name = client.call("POST", "/api/sandboxes", {"mode": "enforce"})["name"]
    try:
        with pytest.raises(CorralError, match="was frozen during step 1"):
            client.call("POST", f"/api/sandboxes/{name}/exec",
                        {"command": ["sh", "-c", "sleep 30", "corral-test-freeze"]})
        detail = client.call("GET", f"/api/sandboxes/{name}")
        assert detail["sandbox"]["state"] == "frozen"
        [evidence] = detail["evidence"]
        assert evidence["bundle"]["alert"]["rule"] == "Test freeze marker"
        assert any("corral-test-freeze" in " ".join(p.get("argv", [])) for p in evidence["bundle"]["processes"])
        with pytest.raises(CorralError, match="is frozen"):
            client.call("POST", f"/api/sandboxes/{name}/exec", {"command": "true"})

        assert client.call("POST", f"/api/sandboxes/{name}/release")["state"] == "running"
        assert client.call("POST", f"/api/sandboxes/{name}/exec", {"command": "echo again"})["stdout"] == "again\n"
        assert client.call("POST", f"/api/sandboxes/{name}/stop")["state"] == "stopped"
        with pytest.raises(CorralError, match="no running sandbox"):
            client.call("POST", f"/api/sandboxes/{name}/exec", {"command": "true"})
    finally:
        shutil.rmtree(STATE_DIR / "evidence" / name, ignore_errors=True)  # the freeze's bundle


def test_bad_requests_get_clear_errors(daemon: Daemon) -> None:
    with pytest.raises(CorralError, match=r"unknown field\(s\) colour"):
        daemon.client.call("POST", "/api/sandboxes", {"colour": "red"})
    with pytest.raises(CorralError, match="no policy file or built-in policy named 'no-such-policy'"):
        daemon.client.call("POST", "/api/sandboxes", {"policy": "no-such-policy"})
    name = daemon.client.call("POST", "/api/sandboxes", {"mode": "observe"})["name"]
    with pytest.raises(CorralError, match='"command" is required'):
        daemon.client.call("POST", f"/api/sandboxes/{name}/exec", {})
    with pytest.raises(CorralError, match="not frozen"):
        daemon.client.call("POST", f"/api/sandboxes/{name}/release")


def test_a_second_daemon_on_the_same_socket_or_port_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    port = daemon.url.rsplit(":", 1)[1]
    same_port = subprocess.run([CORRAL, "serve", "--data", str(tmp_path / "d2"), "--socket", "",
                                "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert same_port.returncode == 2
    assert f"127.0.0.1:{port} is in use" in same_port.stderr
    same_socket = subprocess.run([CORRAL, "serve", "--data", str(tmp_path / "d3"), "--socket", str(daemon.socket),
                                  "--listen", ""], capture_output=True, text=True, timeout=60)
    assert same_socket.returncode == 2
    assert "another `corral serve` answers on" in same_socket.stderr


# -- the web console in a real browser ------------------------------------------------------------

@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_web_console_live_alert_tree_and_stop(daemon: Daemon, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = SCREENSHOTS or tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    client = daemon.client
    name = client.call("POST", "/api/sandboxes", {"mode": "observe", "episode": "ep-browser"})["name"]
    client.call("POST", f"/api/sandboxes/{name}/exec", {"command": "python3 -c 'print(sum(range(10)))'"})

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{daemon.url}/?token={daemon.token}")
            expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
            expect(page.locator(f"#sandboxes tr[data-sandbox='{name}']")).to_be_visible()
            page.evaluate("window.notReloaded = true")

            # The agent reads a canary: the alert must appear in the open page without a reload.
            result = client.call("POST", f"/api/sandboxes/{name}/exec",
                                 {"command": "cat ~/.aws/credentials > /dev/null"})
            assert "Canary credential opened" in {a["rule"] for a in result["alerts"]}
            alert = page.locator("#feed .alert[data-rule='Canary credential opened']")
            expect(alert).to_be_visible(timeout=2_000)
            assert page.evaluate("window.notReloaded") is True
            expect(alert).to_contain_text(name)
            page.screenshot(path=str(shots / "console-live.png"))

            # Its sandbox page: the step, and the process marked in the tree.
            alert.locator(f"a[href='#/sandbox/{name}']").click()
            offender = page.locator("#tree .proc.offending", has_text="cat /home/agent/.aws/credentials")
            expect(offender).to_be_visible(timeout=10_000)
            expect(offender).to_contain_text("Canary credential opened")
            expect(page.locator(".timeline .step.flagged")).to_contain_text("cat ~/.aws/credentials > /dev/null")
            assert "null" not in page.locator("#view").inner_text().split()  # nothing rendered from a missing value
            page.screenshot(path=str(shots / "console-sandbox.png"), full_page=True)

            # Stop from the page.
            page.locator("#stop").click()
            expect(page.locator("#state")).to_have_text("stopped", timeout=30_000)
            assert client.call("GET", "/api/sandboxes") == []

            # The incident report of the episode.
            page.goto(f"{daemon.url}/#/report/ep-browser")
            frame = page.frame_locator("iframe.report")
            expect(frame.locator("body")).to_contain_text("Canary credential opened", timeout=10_000)
            page.screenshot(path=str(shots / "console-report.png"), full_page=True)
        finally:
            browser.close()


def test_the_page_without_the_token_says_how_to_get_in(daemon: Daemon) -> None:
    try:
        urllib.request.urlopen(daemon.url + "/", timeout=30)
        pytest.fail("the page opened without the token")
    except urllib.error.HTTPError as e:
        assert e.code == 401
        assert b"open the URL `corral serve` printed" in e.read()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())  # keeps the cookie it is given
    with browser.open(f"{daemon.url}/?token={daemon.token}", timeout=30) as response:
        # Redirected to / with the cookie: the page itself.
        assert b'<script src="/static/app.js">' in response.read()
        assert response.url == daemon.url + "/"


def test_stopping_the_daemon_stops_its_sandboxes(tmp_path: Path) -> None:
    d = _start(tmp_path)
    try:
        name = d.client.call("POST", "/api/sandboxes", {"mode": "observe"})["name"]
        holder_cgroup = Path("/sys/fs/cgroup/unified/corral") / name
        assert holder_cgroup.is_dir()
    finally:
        _stop(d)
    assert d.process.returncode == 0, "".join(d.log)
    assert not holder_cgroup.exists()
    assert not d.socket.exists()
    store = open_store(d.data)
    assert store.sandbox(name)["state"] == "stopped"  # type: ignore[index]
    store.close()
