"""The lab's fake servers: one process, one thread per socket, every access logged.

    python3 -m corral.drills.servers --log-dir DIR SPEC...    # or: python3 servers.py ...

Prints ``ready`` once every socket listens.  Each SPEC is ``KIND@ADDR:PORT``:

- ``pool``: a stratum mining pool speaking JSON-RPC lines: ``mining.subscribe``, ``mining.authorize``,
  ``mining.submit`` (stratum v1) and XMRig's ``login``/``submit``/``keepalived``.
- ``http``: an HTTP/1.0 stub: ``/latest/meta-data/...`` answers like a cloud metadata service (AWS
  and Alibaba Cloud paths), ``/x.sh`` is a script that says ``echo hi``, any POST/PUT is swallowed
  (an upload sink) and answered ``ok``, everything else 404.
- ``shell``: a reverse-shell catcher: sends ``echo corral-lab-shell-$((6*7)); exit`` and logs what
  comes back (``corral-lab-shell-42`` proves a shell ran it), for at most 3 s.
- ``service``: a fake internal service whose answer depends on the port: an SSH banner (22), Redis
  (6379), the Docker API (2375), the Kubernetes API (6443), Ray's dashboard (8265), a kubelet (10250).
- ``dns``: a DNS server (UDP) answering the names in ``NAMES``; anything else is NXDOMAIN.

Every access is one JSON line in ``DIR/KIND.jsonl``: ``{"time", "server", "local", "peer", "what", ...}``,
so a drill can tell an attack that was prevented (no line) from one that happened.

Only the standard library (and dnslib, for ``dns``): this file also runs by path, with any python3.
The lab (corral.drills.lab) binds these only inside its own namespaces, which have no route out.
Every connection is bounded by timeouts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The lab's DNS zone: realistic pool and tunnel names, on documentation addresses.
NAMES = {
    "pool.supportxmr.example": "198.51.100.20",
    "gulf.moneroocean.example": "198.51.100.20",
    "xmr-eu1.nanopool.example": "198.51.100.20",
    "stratum.pool.example": "198.51.100.20",
    "relay.tunnel.example": "203.0.113.10",
    "tcp.ngrok.example": "203.0.113.10",
    "files.upload.example": "198.51.100.30",
    "c2.callback.example": "203.0.113.66",
    "metadata.google.internal": "169.254.169.254",
}

POOL_JOB = {"blob": "0707" + "00" * 39, "job_id": "7", "target": "b88d0600", "algo": "rx/0", "height": 1}

SHELL_COMMAND = b"echo corral-lab-shell-$((6*7)); exit\n"

METADATA = {
    "/latest/meta-data/": "ami-id\nhostname\niam/\ninstance-id\nram/\n",
    "/latest/meta-data/iam/security-credentials/": "lab-role\n",
    "/latest/meta-data/iam/security-credentials/lab-role":
        '{"AccessKeyId": "ASIAEXAMPLEEXAMPLE00", "SecretAccessKey": "not-a-secret", "Token": "lab"}\n',
    "/latest/meta-data/ram/security-credentials/": "lab-role\n",  # Alibaba Cloud's path
    "/latest/meta-data/ram/security-credentials/lab-role":
        '{"AccessKeyId": "STS.EXAMPLEEXAMPLE", "AccessKeySecret": "not-a-secret", "SecurityToken": "lab"}\n',
}


def _http_answer(status: str, body: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}").encode()


#: What each fake internal service says, by port: (sent on connect, answer to whatever comes in).
SERVICES: dict[int, tuple[bytes, bytes]] = {
    22: (b"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6\r\n", b""),
    6379: (b"", b"-NOAUTH Authentication required.\r\n"),
    2375: (b"", _http_answer("200 OK", '{"Version": "24.0.7", "ApiVersion": "1.43"}')),
    6443: (b"", b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"),
    8265: (b"", _http_answer("200 OK", '{"ray_version": "2.9.0", "jobs": []}')),
    10250: (b"", _http_answer("401 Unauthorized", "Unauthorized")),
}


class AccessLog:
    """JSON lines, one file per server kind, safe from every thread."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._lock = threading.Lock()

    def write(self, server: str, local: str, peer: str, what: str, **detail: Any) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        record = {"time": now, "server": server, "local": local, "peer": peer, "what": what, **detail}
        line = json.dumps(record) + "\n"
        with self._lock, open(self.directory / f"{server}.jsonl", "a") as f:
            f.write(line)


def _endpoint(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class Conn:
    """One accepted connection: the socket and a way to log about it."""

    def __init__(self, sock: socket.socket, kind: str, log: AccessLog) -> None:
        self.sock = sock
        self.kind = kind
        self.local = _endpoint(sock.getsockname())
        self.peer = _endpoint(sock.getpeername())
        self._log = log

    def log(self, what: str, **detail: Any) -> None:
        self._log.write(self.kind, self.local, self.peer, what, **detail)


def _serve_tcp(kind: str, addr: str, port: int, handle: Callable[[Conn], None], log: AccessLog) -> None:
    s = socket.socket(_family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)

    def serve(c: socket.socket) -> None:
        c.settimeout(5)
        with c, contextlib.suppress(OSError, ValueError):
            conn = Conn(c, kind, log)
            conn.log("connect")
            handle(conn)

    def loop() -> None:
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def pool(conn: Conn) -> None:
    for raw in conn.sock.makefile("rb"):
        try:
            msg = json.loads(raw)
        except ValueError:
            conn.log("garbage", data=raw[:200].decode(errors="replace"))
            return
        method, mid, params = msg.get("method"), msg.get("id"), msg.get("params")
        if method == "login" and isinstance(params, dict):
            conn.log("login", login=params.get("login"), agent=params.get("agent"))
        elif method == "mining.authorize" and isinstance(params, list):
            conn.log(method, worker=params[0] if params else None)
        else:
            conn.log(str(method))
        if method == "mining.subscribe":
            replies: list[dict[str, Any]] = [
                {"id": mid, "result": [[["mining.set_difficulty", "1"], ["mining.notify", "ae68"]], "08000002", 4],
                 "error": None},
                {"id": None, "method": "mining.set_difficulty", "params": [1]},
                {"id": None, "method": "mining.notify",
                 "params": ["ae68", "00" * 32, "01", "02", [], "20000000", "1d00ffff", "5f5e1000", True]}]
        elif method == "login":
            replies = [{"id": mid, "jsonrpc": "2.0", "error": None,
                        "result": {"id": "1", "job": POOL_JOB, "status": "OK"}}]
        else:  # mining.authorize, mining.submit, submit, keepalived
            replies = [{"id": mid, "jsonrpc": "2.0", "result": True if method != "submit" else {"status": "OK"},
                        "error": None}]
        conn.sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in replies))


def _read_request(sock: socket.socket) -> tuple[list[str], bytes, bytes] | None:
    """An HTTP request's head lines, raw head and body (bounded by Content-Length and 5 s)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                   if k.strip().lower() == "content-length"), 0)
    if "100-continue" in head.decode(errors="replace").lower():
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    deadline = time.monotonic() + 5
    while len(body) < length and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return lines, head, body


def http(conn: Conn) -> None:
    request = _read_request(conn.sock)
    if request is None:
        return
    lines, _, body = request
    method, path = [*lines[0].split(), "", ""][:2]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    host = headers.get("host", "")
    conn.log("request", method=method, path=path, host=host, body_bytes=len(body))
    if method in ("POST", "PUT"):
        status, text = "200 OK", "ok\n"
    elif path == "/x.sh":
        status, text = "200 OK", "echo hi\n"
    elif path in METADATA:
        status, text = "200 OK", METADATA[path]
    else:
        status, text = "404 Not Found", "not found\n"
    conn.sock.sendall(f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n"
                      f"Connection: close\r\n\r\n{text}".encode())


def shell(conn: Conn) -> None:
    conn.sock.sendall(SHELL_COMMAND)
    conn.sock.settimeout(0.5)
    got = b""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            chunk = conn.sock.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += chunk
    conn.log("shell output", output=got[:500].decode(errors="replace"))


def service(conn: Conn) -> None:
    port = int(conn.local.rsplit(":", 1)[1])
    hello, answer = SERVICES.get(port, (b"", b""))
    if hello:
        conn.sock.sendall(hello)
    conn.sock.settimeout(2)
    try:
        data = conn.sock.recv(4096)
    except TimeoutError:
        data = b""
    conn.log("request", port=port, data=data[:200].decode(errors="replace"))
    if data and answer:
        conn.sock.sendall(answer)


def _serve_dns(addr: str, port: int, log: AccessLog) -> None:
    from dnslib import QTYPE, RCODE, RR, A, DNSRecord  # type: ignore[import-untyped]

    s = socket.socket(_family(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))
    local = _endpoint(s.getsockname())

    def loop() -> None:
        while True:
            data, peer = s.recvfrom(4096)
            try:
                q = DNSRecord.parse(data)
                reply = q.reply()
                for question in q.questions:
                    name = str(question.qname).rstrip(".").lower()
                    address = NAMES.get(name)
                    answer = address if question.qtype == QTYPE.A else None
                    log.write("dns", local, _endpoint(peer), "question", name=name,
                              qtype=QTYPE.get(question.qtype, str(question.qtype)), answer=answer)
                    if address is None:
                        reply.header.rcode = RCODE.NXDOMAIN
                    elif answer is not None:
                        reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(answer), ttl=60))
                s.sendto(reply.pack(), peer)
            except Exception:  # garbage in, nothing out
                log.write("dns", local, _endpoint(peer), "garbage", size=len(data))

    threading.Thread(target=loop, daemon=True).start()


HANDLERS: dict[str, Callable[[Conn], None]] = {"pool": pool, "http": http, "shell": shell, "service": service}
KINDS = (*HANDLERS, "dns")


def parse_spec(spec: str) -> tuple[str, str, int]:
    """``KIND@ADDR:PORT`` (``[ADDR]`` for IPv6) -> (kind, addr, port)."""
    kind, _, where = spec.partition("@")
    addr, _, port = where.rpartition(":")
    if kind not in KINDS or not addr or not port.isdigit():
        raise ValueError(f"bad server spec {spec!r}: expected KIND@ADDR:PORT with KIND one of {', '.join(KINDS)}")
    return kind, addr.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The corral lab's fake servers (see the module's docstring).")
    parser.add_argument("--log-dir", required=True, type=Path, help="one KIND.jsonl access log per kind here")
    parser.add_argument("specs", nargs="+", metavar="KIND@ADDR:PORT")
    args = parser.parse_args(argv)
    log = AccessLog(args.log_dir)
    for spec in args.specs:
        kind, addr, port = parse_spec(spec)
        if kind == "dns":
            _serve_dns(addr, port, log)
        else:
            _serve_tcp(kind, addr, port, HANDLERS[kind], log)
    print("ready", os.getpid(), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
