"""Small fake servers for the end-to-end detection tests, run in the lab's server namespace.

    python lab_servers.py [SPEC...]     # prints "ready" once every socket listens

Each SPEC is ``KIND@ADDR:PORT``:

- ``pool``: a stratum mining pool speaking JSON-RPC lines: answers ``mining.subscribe``,
  ``mining.authorize``, ``mining.submit`` and the XMRig-style ``login``/``submit``/``keepalived``.
- ``http``: an HTTP/1.0 stub: ``/latest/meta-data/...`` answers like a cloud metadata service,
  ``/x.sh`` is a script that says ``echo hi``, any POST/PUT is swallowed and answered ``ok``,
  everything else 404.
- ``shell``: a catcher for reverse shells: on each connection it sends ``echo PWNED-$((6*7)); exit``
  and reads what comes back for at most 3 s, then closes (so a shell on the other end ends).
- ``dns``: a DNS responder (UDP) answering A with 203.0.113.10, TXT with "ok", anything else empty.

Only documentation addresses are ever bound (the lab has no route out, tests/netlab.py).  Every
connection is bounded by timeouts: nothing here can hold a test up.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable

POOL_JOB = {"blob": "0707" + "00" * 39, "job_id": "7", "target": "b88d0600", "algo": "rx/0", "height": 1}

SHELL_COMMAND = b"echo PWNED-$((6*7)); exit\n"

METADATA = {
    "/latest/meta-data/": "ami-id\nhostname\niam/\ninstance-id\n",
    "/latest/meta-data/iam/security-credentials/": "lab-role\n",
    "/latest/meta-data/iam/security-credentials/lab-role":
        '{"AccessKeyId": "ASIAEXAMPLEEXAMPLE00", "SecretAccessKey": "not-a-secret", "Token": "lab"}\n',
}


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _serve_tcp(addr: str, port: int, handle: Callable[[socket.socket], None]) -> None:
    s = socket.socket(_family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)

    def serve(c: socket.socket) -> None:
        c.settimeout(5)
        with c, contextlib.suppress(OSError, ValueError):
            handle(c)

    def loop() -> None:
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def pool(c: socket.socket) -> None:
    for raw in c.makefile("rb"):
        try:
            msg = json.loads(raw)
        except ValueError:
            return
        method, mid = msg.get("method"), msg.get("id")
        if method == "mining.subscribe":
            replies = [{"id": mid, "result": [[["mining.set_difficulty", "1"], ["mining.notify", "ae68"]],
                                              "08000002", 4], "error": None},
                       {"id": None, "method": "mining.set_difficulty", "params": [1]},
                       {"id": None, "method": "mining.notify",
                        "params": ["ae68", "00" * 32, "01", "02", [], "20000000", "1d00ffff", "5f5e1000", True]}]
        elif method == "login":
            replies = [{"id": mid, "jsonrpc": "2.0", "error": None,
                        "result": {"id": "1", "job": POOL_JOB, "status": "OK"}}]
        else:  # mining.authorize, mining.submit, submit, keepalived
            replies = [{"id": mid, "jsonrpc": "2.0", "result": True if method != "submit" else {"status": "OK"},
                        "error": None}]
        c.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in replies))


def http(c: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    method, path = lines[0].split()[:2]
    length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                   if k.strip().lower() == "content-length"), 0)
    if "100-continue" in head.decode(errors="replace").lower():
        c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    deadline = time.monotonic() + 5
    while len(body) < length and time.monotonic() < deadline:
        chunk = c.recv(65536)
        if not chunk:
            break
        body += chunk
    if method in ("POST", "PUT"):
        status, text = "200 OK", "ok\n"
    elif path == "/x.sh":
        status, text = "200 OK", "echo hi\n"
    elif path in METADATA:
        status, text = "200 OK", METADATA[path]
    else:
        status, text = "404 Not Found", "not found\n"
    c.sendall(f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n"
              f"Connection: close\r\n\r\n{text}".encode())


def shell(c: socket.socket) -> None:
    c.sendall(SHELL_COMMAND)
    c.settimeout(0.5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            if not c.recv(4096):
                return
        except TimeoutError:
            continue


def _serve_dns(addr: str, port: int) -> None:
    from dnslib import QTYPE, RR, TXT, A, DNSRecord  # type: ignore[import-untyped]

    s = socket.socket(_family(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))

    def loop() -> None:
        while True:
            data, peer = s.recvfrom(4096)
            try:
                q = DNSRecord.parse(data)
                a = q.reply()
                for question in q.questions:
                    if question.qtype == QTYPE.A:
                        a.add_answer(RR(question.qname, QTYPE.A, rdata=A("203.0.113.10"), ttl=60))
                    elif question.qtype == QTYPE.TXT:
                        a.add_answer(RR(question.qname, QTYPE.TXT, rdata=TXT("ok"), ttl=60))
                s.sendto(a.pack(), peer)
            except Exception:  # garbage in, nothing out
                pass

    threading.Thread(target=loop, daemon=True).start()


HANDLERS: dict[str, Callable[[socket.socket], None]] = {"pool": pool, "http": http, "shell": shell}


def main(specs: list[str]) -> None:
    for spec in specs:
        kind, _, where = spec.partition("@")
        addr, _, port = where.rpartition(":")
        addr = addr.strip("[]")
        if kind == "dns":
            _serve_dns(addr, int(port))
        else:
            _serve_tcp(addr, int(port), HANDLERS[kind])
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
