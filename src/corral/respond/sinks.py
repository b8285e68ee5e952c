"""Record: where alerts go, losing none on the way.

A sink takes alert dicts (:meth:`corral.detect.engine.Alert.to_dict`) and
delivers them: :class:`JsonLinesSink` appends one JSON object per line to a
file, :class:`StdoutSink` prints them, :class:`WebhookSink` POSTs them over
HTTP from a background thread, each alert first written to a persistent
on-disk queue and removed from it only once the endpoint answered 2xx (so an
alert survives the endpoint being down and corral being restarted:
at-least-once, with the alert id to deduplicate).  Payloads are the alert as
is (``json``), a Slack incoming-webhook message (``slack``) or Falco's JSON
output (``falco``), which falcosidekick and Falco's consumers read unchanged.

:func:`make_sink` builds a sink from a command-line spec.  The format of
alerts and of each sink is documented for users in docs/alerts.md.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TextIO, runtime_checkable

from corral.errors import CorralError

log = logging.getLogger(__name__)

#: the forms make_sink accepts, as its errors list them
SPEC_FORMS = "jsonl:PATH, stdout, stdout:line, webhook:URL, slack:URL, falco:URL"
FORMATS = ("json", "slack", "falco")

#: corral severity -> Falco priority
FALCO_PRIORITY = {"critical": "Critical", "high": "Error", "medium": "Warning", "low": "Notice",
                  "info": "Informational"}
#: corral severity -> Slack attachment colour
SLACK_COLOUR = {"critical": "#b00020", "high": "#e8590c", "medium": "#f0b400", "low": "#2b8a3e",
                "info": "#1971c2"}


class SinkError(CorralError):
    """A sink cannot be made or used as asked; the message says why."""


@runtime_checkable
class Sink(Protocol):
    """Where alerts go.  Implementations are thread-safe."""

    def send(self, alert: dict[str, Any]) -> None:
        """Deliver one alert dict (or, for queued sinks, make it durable first)."""
        ...

    def close(self) -> None:
        """Flush what can be flushed and stop."""
        ...


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)


class _Closing:
    def close(self) -> None:  # overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ----------------------------------------------------------------- local sinks


class JsonLinesSink(_Closing):
    """Append each alert as one JSON object on its own line, flushed per alert
    (and fsynced too with ``fsync=True``).  Parent directories are created."""

    def __init__(self, path: Path | str, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise SinkError(f"cannot open {self.path} for alerts: {exc.strerror or exc}") from exc

    def send(self, alert: dict[str, Any]) -> None:
        line = _dumps(alert) + "\n"
        with self._lock:
            if self._file is None:
                raise SinkError(f"alert sink {self.path} is closed")
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                if self.fsync:
                    os.fsync(self._file.fileno())
                self._file.close()
                self._file = None


class StdoutSink(_Closing):
    """Print each alert: one JSON object per line (``json``) or the readable
    line a terminal shows (``line``)."""

    def __init__(self, stream: TextIO | None = None, fmt: str = "json") -> None:
        if fmt not in ("json", "line"):
            raise SinkError(f"stdout sink format must be json or line, not {fmt!r}")
        self.stream = stream if stream is not None else sys.stdout
        self.fmt = fmt
        self._lock = threading.Lock()

    def send(self, alert: dict[str, Any]) -> None:
        text = _dumps(alert) if self.fmt == "json" else alert_line(alert)
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            self.stream.flush()


def alert_line(alert: Mapping[str, Any]) -> str:
    """The readable line of an alert dict (what Alert.line() says of the Alert)."""
    where = f"{alert.get('sandbox') or 'sandbox ' + str(alert.get('sandbox_id', 0))} step {alert.get('step', 0)}"
    taken = str(alert.get("action_taken") or "alert")
    taken = f" -> {taken}" if taken != "alert" else ""
    if alert.get("action_result"):
        taken += f" ({alert['action_result']})"
    folded = f" (+{alert['folded']} folded)" if alert.get("folded") else ""
    return (f"corral: {str(alert.get('severity', '')).upper()} [{alert.get('category', '')}] "
            f"{alert.get('rule', '')}: {alert.get('output', '')} [{where}, pid {alert.get('pid', 0)}]{taken}{folded}")


# -------------------------------------------------------------------- payloads


_TIME_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)?")


def parse_time_ns(text: Any) -> int | None:
    """Nanoseconds since the epoch of an RFC 3339 time ("...T...[.frac]Z|+hh:mm"), or None."""
    if not isinstance(text, str):
        return None
    m = _TIME_RE.fullmatch(text.strip())
    if m is None:
        return None
    secs = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    frac = int((m.group(2) or "").ljust(9, "0"))
    zone = m.group(3) or "Z"
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        hh, mm = int(zone[1:3]), int(zone[-2:])
        secs -= sign * (hh * 3600 + mm * 60)
    return secs * 1_000_000_000 + frac


def rfc3339_ns(wall_ns: int, *, zulu: bool = True) -> str:
    """RFC 3339 in UTC with nanoseconds, as Falco writes ``time`` ("...Z"), or
    with a "+0000" offset as Falco's ISO 8601 output prefix."""
    secs, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}" + ("Z" if zulu else "+0000")


def _alert_ns(alert: Mapping[str, Any]) -> int:
    """When the event behind the alert happened (Falco's time is the event's)."""
    for key in ("event_time", "time"):
        found = parse_time_ns(alert.get(key))
        if found is not None:
            return found
    return time.time_ns()


def _scalar(value: Any) -> Any:
    """Falco's output_fields hold strings, numbers, booleans and nulls."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(str(v) for v in value)
    return _dumps(value)


# event dict keys every event has, mapped separately
_HEADER_KEYS = frozenset({"kind", "time", "ts_ns", "pid", "tid", "ppid", "uid", "comm", "cgroup_id", "sandbox_id",
                          "step_id", "proc"})
_PEER_KINDS = frozenset({"connect", "send", "accept", "dup_socket"})
_LOCAL_KINDS = frozenset({"bind", "listen"})
_FILE_KINDS = frozenset({"open", "unlink", "rename"})
#: (kind or kind group, event key) -> output field
_RENAMES: dict[str, dict[str, str]] = {
    "peer": {"addr": "net.dip", "port": "net.dport", "local_port": "net.sport", "family": "net.family",
             "unix_path": "net.unix_path", "result": "evt.res", "fd": "fd.num", "target_fd": "dup.fd",
             "source_fd": "evt.arg.source_fd", "protocol": "evt.arg.protocol", "sock_type": "evt.arg.sock_type"},
    "local": {"addr": "evt.arg.addr", "port": "net.sport", "local_port": "evt.arg.local_port",
              "family": "net.family", "unix_path": "net.unix_path", "result": "evt.res", "fd": "fd.num",
              "protocol": "evt.arg.protocol", "sock_type": "evt.arg.sock_type"},
    "file": {"path": "file.path", "path2": "file.path2", "flags": "file.flags", "result": "evt.res",
             "match": "evt.arg.match", "dev": "fd.dev", "ino": "fd.ino"},
    "exec": {"filename": "evt.arg.filename", "cwd": "proc.cwd", "args_truncated": "evt.arg.args_truncated",
             "stdio_sockets": "evt.arg.stdio_sockets"},
    "memfd_exec": {"memfd_name": "memfd.name", "filename": "evt.arg.filename"},
    "ns": {"namespaces": "ns.types", "fd": "evt.arg.fd"},
    "signal": {"signal": "signal.sig"},
    "module_load": {"op": "module.op", "params": "module.params"},
}
#: kinds whose own keys take a namespace (the rule fields' name: a dns event's "qtype" is dns.qtype)
_PREFIXES = {"flow": "net", "dns": "dns", "scan": "scan", "cpu_saturation": "cpu", "long_session": "session",
             "cred_then_egress": "cred", "dns_tunnel": "tunnel", "outlives_step": "outlives", "drop": "drop",
             "ptrace": "ptrace", "mount": "mount", "ns": "ns", "bpf": "bpf", "setuid": "setuid",
             "capset": "capset", "signal": "signal"}


def _event_fields(kind: str, event: Mapping[str, Any]) -> dict[str, Any]:
    group = "peer" if kind in _PEER_KINDS else "local" if kind in _LOCAL_KINDS else "file" if kind in _FILE_KINDS \
        else kind
    renames = _RENAMES.get(group, {})
    prefix = _PREFIXES.get(kind, "evt.arg")
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in _HEADER_KEYS:
            continue
        if kind == "exec" and key == "argv":
            out["proc.args"] = " ".join(str(a) for a in list(value)[1:]) if isinstance(value, list) else value
            continue
        out[renames.get(key) or f"{prefix}.{key}"] = value
    if group in ("peer", "local") and "evt.arg.sock_type" in out:
        fam, stype = event.get("family"), out["evt.arg.sock_type"]
        out["net.proto"] = "unix" if fam == "unix" else {"stream": "tcp", "dgram": "udp"}.get(stype, stype)
    if out.get("net.family") == "unix":  # no addresses or ports on a unix socket
        for key in ("net.dip", "net.dport", "net.sport"):
            out.pop(key, None)
    # Falco's own names for the same things, for tools that know only those
    for ours, falcos in (("net.dip", "fd.rip"), ("net.dport", "fd.rport"), ("net.sport", "fd.lport"),
                         ("file.path", "fd.name")):
        if out.get(ours) not in (None, ""):
            out.setdefault(falcos, out[ours])
    if out.get("net.proto") in ("tcp", "udp"):
        out.setdefault("fd.l4proto", out["net.proto"])
    return out


def falco_fields(alert: Mapping[str, Any]) -> dict[str, Any]:
    """The ``output_fields`` of an alert: Falco's field names where Falco has
    one (proc.*, user.uid, evt.*, fd.*), corral's rule field names otherwise
    (sandbox.*, step.*, episode.*, net.*, file.*, dns.*, ...), and corral.* for
    what the alert itself says.  Values are strings, numbers, booleans or null."""
    event: Mapping[str, Any] = alert.get("event") or {}
    proc: Mapping[str, Any] = event.get("proc") or {}
    kind = str(event.get("kind") or "")
    exe = alert.get("exe") or proc.get("exe") or ""
    parents = [str(p) for p in alert.get("parents") or ()]
    fields: dict[str, Any] = {
        "evt.time": _alert_ns(alert),
        "evt.type": kind or None,
        "proc.pid": alert.get("pid", event.get("pid")),
        "proc.ppid": event.get("ppid"),
        "thread.tid": event.get("tid"),
        "proc.name": proc.get("name") or (os.path.basename(exe) if exe else event.get("comm")) or None,
        "proc.exepath": exe or None,
        "proc.cmdline": alert.get("cmdline") or proc.get("cmdline") or None,
        "proc.cwd": proc.get("cwd") or None,
        "proc.pname": re.sub(r"\[\d+\]$", "", parents[0]) if parents else None,
        "user.uid": event.get("uid"),
        "sandbox.id": alert.get("sandbox_id", event.get("sandbox_id")),
        "sandbox.name": alert.get("sandbox"),
        "step.id": alert.get("step", event.get("step_id")),
        "step.cmdline": alert.get("step_cmdline"),
        "episode.id": alert.get("episode"),
        "cgroup.id": event.get("cgroup_id"),
    }
    fields.update(_event_fields(kind, event))
    fields.update({
        "corral.alert_id": alert.get("id"),
        "corral.alert_time": alert.get("time"),
        "corral.severity": alert.get("severity"),
        "corral.category": alert.get("category"),
        "corral.action": alert.get("action"),
        "corral.action_taken": alert.get("action_taken"),
        "corral.action_result": alert.get("action_result") or None,
        "corral.folded": alert.get("folded", 0),
        "corral.parents": parents,
        "corral.rule_source": alert.get("source"),
    })
    return {key: _scalar(value) for key, value in fields.items()}


def _falco_uuid(alert_id: Any) -> str:
    text = str(alert_id or "")
    try:
        return str(uuid.UUID(hex=text))
    except ValueError:
        return text or str(uuid.uuid4())


def falco_payload(alert: Mapping[str, Any], *, hostname: str | None = None) -> dict[str, Any]:
    """The alert as Falco's JSON output (json_output: true, with the output
    property, tags and hostname) — what falcosidekick's POST / accepts."""
    wall_ns = _alert_ns(alert)
    priority = FALCO_PRIORITY.get(str(alert.get("severity", "")).lower(), "Warning")
    return {
        "uuid": _falco_uuid(alert.get("id")),
        "output": f"{rfc3339_ns(wall_ns, zulu=False)}: {priority} {alert.get('output', '')}",
        "priority": priority,
        "rule": str(alert.get("rule") or "corral alert"),
        "time": rfc3339_ns(wall_ns),
        "output_fields": falco_fields(alert),
        "source": "corral",
        "tags": [str(t) for t in alert.get("tags") or ()],
        "hostname": hostname or socket.gethostname(),
    }


def _mrkdwn(text: Any) -> str:
    """Slack's escaping: &, < and > only."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: Any) -> str:
    return "`" + _mrkdwn(text).replace("`", "'") + "`"


def slack_payload(alert: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message (also read by Mattermost and Rocket.Chat):
    a one-line ``text`` for notifications and an attachment coloured by
    severity with the rule, output, sandbox, step, process and action."""
    sev = str(alert.get("severity", ""))
    rule, output = alert.get("rule", ""), alert.get("output", "")
    sandbox = f"{alert.get('sandbox') or '-'} (id {alert.get('sandbox_id', 0)})"
    step = f"{alert.get('step', 0)}"
    if alert.get("step_cmdline"):
        step += " " + _code(alert["step_cmdline"])
    process = f"pid {alert.get('pid', 0)} " + _code(alert.get("cmdline") or alert.get("exe") or "?")
    if alert.get("parents"):
        process += " " + _mrkdwn("".join(f"<- {p} " for p in alert["parents"]).strip())
    action = str(alert.get("action_taken") or alert.get("action") or "alert")
    if alert.get("action_result"):
        action += f" ({alert['action_result']})"
    fields = [
        {"title": "Severity", "value": sev, "short": True},
        {"title": "Category", "value": _mrkdwn(alert.get("category", "")), "short": True},
        {"title": "Sandbox", "value": _mrkdwn(sandbox), "short": True},
        {"title": "Step", "value": step, "short": True},
        {"title": "Process", "value": process, "short": False},
        {"title": "Action", "value": _mrkdwn(action), "short": True},
    ]
    if alert.get("episode"):
        fields.append({"title": "Episode", "value": _mrkdwn(alert["episode"]), "short": True})
    if alert.get("tags"):
        fields.append({"title": "Tags", "value": _mrkdwn(", ".join(map(str, alert["tags"]))), "short": True})
    if alert.get("folded"):
        fields.append({"title": "Folded", "value": f"+{alert['folded']} like it", "short": True})
    fields.append({"title": "Alert id", "value": _mrkdwn(alert.get("id", "")), "short": True})
    ns = _alert_ns(alert)
    plain = f"corral {sev.upper()}: {rule}: {output}"
    return {
        "text": f"*{_mrkdwn(sev.upper())}* {_mrkdwn(rule)}: {_mrkdwn(output)}",
        "attachments": [{
            "fallback": plain,
            "color": SLACK_COLOUR.get(sev.lower(), "#868e96"),
            "title": str(rule),
            "text": _mrkdwn(output),
            "fields": fields,
            "mrkdwn_in": ["text", "fields"],
            "footer": "corral",
            "ts": ns // 1_000_000_000,
        }],
    }


def render(alert: Mapping[str, Any], fmt: str, *, hostname: str | None = None) -> bytes:
    """The HTTP body of an alert in one of FORMATS."""
    if fmt == "json":
        return _dumps(alert).encode()
    if fmt == "slack":
        return _dumps(slack_payload(alert)).encode()
    if fmt == "falco":
        return _dumps(falco_payload(alert, hostname=hostname)).encode()
    raise SinkError(f"unknown payload format {fmt!r} (one of {', '.join(FORMATS)})")


# --------------------------------------------------------------------- webhook


#: a queued alert's file: <20-digit sequence>-<alert id>.json (the sequence keeps the order)
_QUEUE_NAME = re.compile(r"(\d{20})-[A-Za-z0-9_.-]{0,64}\.json")
_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(directory: Path, name: str, data: bytes) -> None:
    """data as directory/name, whole or not at all, and on disk when this returns."""
    tmp = directory / (_TMP_PREFIX + name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / name)
    _fsync_dir(directory)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST is not delivered (urllib would resend it as a GET)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


_RETRY = "retry"
_DONE = "done"
_DEAD = "dead"


class WebhookSink(_Closing):
    """POST each alert to ``url`` from a background thread, at least once.

    :meth:`send` writes the alert to ``queue_dir`` (one file per alert: write
    to a temporary name, fsync, rename, fsync the directory) and returns; the
    thread sends the queue in order and removes a file only when the endpoint
    answered 2xx.  While the endpoint is unreachable, times out or answers 5xx,
    408 or 429, the head of the queue is retried with exponential backoff and
    jitter (``min_backoff_s`` doubling up to ``max_backoff_s``, Retry-After
    honoured up to that); any other answer (4xx, an unfollowed 3xx) moves the
    file to ``queue_dir/dead`` with one log line — never retried, never lost.
    Whatever a previous run left in the queue is sent first.  Each request
    carries the alert id in ``X-Corral-Alert-Id`` (and in the body) so that a
    receiver can drop the duplicates a crash between 2xx and removal can cause.

    One sink per queue directory (a lock file says so; a second is refused).
    """

    def __init__(self, url: str, *, queue_dir: Path | str, fmt: str = "json",
                 headers: Mapping[str, str] | None = None, timeout: float = 5.0, max_backoff_s: float = 60.0,
                 min_backoff_s: float = 0.5, hostname: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SinkError(f"webhook URL must be http:// or https:// with a host, not {url!r}")
        if fmt not in FORMATS:
            raise SinkError(f"unknown payload format {fmt!r} (one of {', '.join(FORMATS)})")
        if min_backoff_s <= 0 or max_backoff_s < min_backoff_s:
            raise SinkError("webhook backoff must be 0 < min_backoff_s <= max_backoff_s")
        self.headers = {str(k): str(v) for k, v in (headers or {}).items()}
        for key, value in self.headers.items():
            if not key or re.search(r"[\r\n:]", key) or re.search(r"[\r\n]", value):
                raise SinkError(f"bad webhook header {key!r}")
        self.url = url
        self.fmt = fmt
        self.timeout = float(timeout)
        self.min_backoff_s = float(min_backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.hostname = hostname or socket.gethostname()
        self.queue_dir = Path(queue_dir)
        self.dead_dir = self.queue_dir / "dead"
        #: counters, for metrics and tests
        self.delivered = 0
        self.dead = 0
        self.attempts = 0
        self.last_error = ""

        try:
            self.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.dead_dir.mkdir(exist_ok=True, mode=0o700)
            self._lock_fd: int | None = os.open(self.queue_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                                0o600)
        except OSError as exc:
            raise SinkError(f"cannot use {self.queue_dir} as an alert queue: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SinkError(f"alert queue {self.queue_dir} is in use by another sink") from exc
            raise SinkError(f"cannot lock alert queue {self.queue_dir}: {exc.strerror or exc}") from exc

        names = []
        last = 0
        for entry in os.listdir(self.queue_dir):
            if entry.startswith(_TMP_PREFIX):  # a write that never completed: send() never returned for it
                with contextlib.suppress(OSError):
                    os.unlink(self.queue_dir / entry)
            elif _QUEUE_NAME.fullmatch(entry):
                names.append(entry)
        for entry in names + os.listdir(self.dead_dir):
            if m := _QUEUE_NAME.fullmatch(entry):
                last = max(last, int(m.group(1)))
        names.sort()
        self._queue: deque[str] = deque(names)
        self._last_seq = last
        self._cond = threading.Condition()
        self._closing = False
        self._closed = False
        self._deadline = 0.0
        self._opener = urllib.request.build_opener(_NoRedirect())
        if names:
            log.info("webhook %s: %d alert(s) left queued by a previous run, resending", self._where(), len(names))
        self._thread = threading.Thread(target=self._run, name="corral-webhook", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------

    def send(self, alert: dict[str, Any]) -> None:
        """Queue the alert durably (it is on disk when this returns)."""
        data = _dumps(alert).encode()
        alert_id = re.sub(r"[^A-Za-z0-9_.-]", "_", str(alert.get("id", "")))[:64]
        with self._cond:
            if self._closing:
                raise SinkError(f"webhook sink {self._where()} is closed")
            seq = max(time.time_ns(), self._last_seq + 1)
            name = f"{seq:020d}-{alert_id}.json"
            try:
                _write_atomic(self.queue_dir, name, data)
            except OSError as exc:
                raise SinkError(f"cannot queue alert in {self.queue_dir}: {exc.strerror or exc}") from exc
            self._last_seq = seq
            self._queue.append(name)
            self._cond.notify_all()

    def pending(self) -> int:
        """Alerts queued and not yet acknowledged (the one in flight included)."""
        with self._cond:
            return len(self._queue)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` seconds for the queue to empty; whether it did."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue:
                left = end - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Try to deliver what is queued for up to ``timeout`` seconds, then stop;
        what is left stays on disk for the next run."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout) + self.timeout + 1.0)
        if self._thread.is_alive():
            log.warning("webhook %s: sender still busy after close; its queue stays locked until exit",
                        self._where())
            return
        if self._queue:
            log.warning("webhook %s: %d alert(s) not delivered, kept in %s for the next run", self._where(),
                        len(self._queue), self.queue_dir)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- the sender thread -------------------------------------------------

    def _where(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"

    def _stopping(self) -> bool:
        return self._closing and time.monotonic() >= self._deadline

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._stopping():
                    self._cond.notify_all()
                    return
                name = self._queue[0]
            try:
                outcome, retry_after = self._deliver(name)
            except Exception as exc:  # a bug must not end delivery silently: log it and retry
                log.exception("webhook %s: unexpected error sending %s", self._where(), name)
                outcome, retry_after = _RETRY, None
                self.last_error = repr(exc)
            if outcome != _RETRY:
                failures = 0
                with self._cond:
                    if self._queue and self._queue[0] == name:
                        self._queue.popleft()
                    self._cond.notify_all()
                continue
            failures += 1
            delay = self._backoff(failures)
            if retry_after is not None:
                delay = min(max(delay, retry_after), self.max_backoff_s)
            if failures == 1 or failures % 10 == 0:
                log.warning("webhook %s: not delivered (%s); %d queued, retrying in %.1fs", self._where(),
                            self.last_error, self.pending(), delay)
            wake = time.monotonic() + delay
            with self._cond:
                while True:
                    end = min(wake, self._deadline) if self._closing else wake
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)

    def _backoff(self, failures: int) -> float:
        base = min(self.max_backoff_s, self.min_backoff_s * 2.0 ** min(failures - 1, 60))
        return random.uniform(base / 2, base)

    def _deliver(self, name: str) -> tuple[str, float | None]:
        path = self.queue_dir / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return _DONE, None
        try:
            alert = json.loads(raw)
            if not isinstance(alert, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self._bury(name, f"unreadable queue file ({exc})")
            return _DEAD, None
        alert_id = str(alert.get("id", ""))
        try:
            body = render(alert, self.fmt, hostname=self.hostname)
        except Exception as exc:  # retrying cannot help: keep it aside
            self._bury(name, f"cannot be rendered as {self.fmt} ({exc!r})", alert_id)
            return _DEAD, None
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "corral", "X-Corral-Alert-Id": alert_id,
            **self.headers})
        self.attempts += 1
        retry_after: float | None = None
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status = int(response.status)
                response.read(65536)
            reason = ""
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
            reason = str(exc.reason)
            retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            with contextlib.suppress(Exception):
                exc.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, refused, timeout, reset
            self.last_error = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
            return _RETRY, None
        if 200 <= status < 300:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.delivered += 1
            self.last_error = ""
            return _DONE, None
        if status >= 500 or status in (408, 429):
            self.last_error = f"HTTP {status} {reason}".strip()
            return _RETRY, retry_after
        why = "a redirect (not followed)" if 300 <= status < 400 else "a refusal"
        self._bury(name, f"HTTP {status} {reason}: {why}, will not retry".replace("  ", " "), alert_id)
        return _DEAD, None

    def _bury(self, name: str, why: str, alert_id: str = "") -> None:
        try:
            os.replace(self.queue_dir / name, self.dead_dir / name)
            _fsync_dir(self.dead_dir)
            _fsync_dir(self.queue_dir)
        except OSError as exc:
            # cannot move it aside: leave it queued (retried later) rather than lose it
            self.last_error = f"cannot move {name} to {self.dead_dir}: {exc.strerror or exc}"
            raise
        self.dead += 1
        log.error("webhook %s: alert %s %s; kept in %s", self._where(), alert_id or name, why,
                  self.dead_dir / name)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: the backoff will do


# ------------------------------------------------------------------ CLI specs


def make_sink(spec: str, state_dir: Path | str, *, timeout: float = 5.0, max_backoff_s: float = 60.0,
              min_backoff_s: float = 0.5) -> Sink:
    """A sink from a command-line spec: ``jsonl:PATH``, ``stdout``,
    ``stdout:line``, ``webhook:URL``, ``slack:URL`` or ``falco:URL``.  A webhook's
    queue is ``state_dir/queue/<kind>-<hash of the URL>``, so each endpoint keeps
    its own queue across runs."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()

    def bad(why: str) -> SinkError:
        return SinkError(f"bad alert sink {spec!r}: {why}; accepted forms: {SPEC_FORMS}")

    if kind == "stdout":
        if not sep or rest in ("", "json"):
            return StdoutSink()
        if rest == "line":
            return StdoutSink(fmt="line")
        raise bad(f"stdout takes json or line, not {rest!r}")
    if kind == "jsonl":
        if not rest.strip():
            raise bad("jsonl needs a file path")
        return JsonLinesSink(Path(rest).expanduser())
    if kind in ("webhook", "slack", "falco"):
        parts = urllib.parse.urlsplit(rest)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad(f"{kind} needs an http:// or https:// URL")
        digest = hashlib.sha256(rest.encode()).hexdigest()[:16]
        fmt = "json" if kind == "webhook" else kind
        return WebhookSink(rest, queue_dir=Path(state_dir) / "queue" / f"{kind}-{digest}", fmt=fmt,
                           timeout=timeout, max_backoff_s=max_backoff_s, min_backoff_s=min_backoff_s)
    raise bad("unknown kind" if sep or kind else "empty")


__all__ = ["FALCO_PRIORITY", "FORMATS", "SPEC_FORMS", "JsonLinesSink", "Sink", "SinkError", "StdoutSink",
           "WebhookSink", "alert_line", "falco_fields", "falco_payload", "make_sink", "parse_time_ns", "render",
           "rfc3339_ns", "slack_payload"]
