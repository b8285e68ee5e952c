"""`corral serve`: the daemon, its API on TCP (token) and on a Unix socket (root only), the web page."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from corral.console.api import make_app
from corral.console.client import DEFAULT_LISTEN, DEFAULT_SOCKET, TOKEN_FILE
from corral.console.daemon import Daemon
from corral.errors import CorralError
from corral.store import default_data_dir


def load_token(data_dir: Path) -> str:
    """The API's bearer token, made at first start and kept 0600 in the data directory."""
    path = data_dir / TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise CorralError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def _tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CorralError(f"{host}:{port} is in use (another `corral serve`?): stop it or pass "
                              "--listen HOST:PORT") from e
        raise CorralError(f"cannot listen on {host}:{port}: {e.strerror}; pass --listen HOST:PORT") from e
    sock.listen(128)
    return sock


def _unix_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a daemon that died: nobody answers on it
        else:
            raise CorralError(f"another `corral serve` answers on {path}: stop it or pass --socket PATH")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: there is no moment when others could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to serve(): two servers share one loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(*, data_dir: str | Path | None = None, listen: str | None = DEFAULT_LISTEN,
          socket_path: str | Path | None = DEFAULT_SOCKET, rules: tuple[str, ...] = (),
          max_age_s: float | None = None, max_bytes: int | None = None,
          say: Callable[[str], None] | None = None) -> int:
    """Run until SIGINT or SIGTERM; every sandbox is stopped and the store written before it returns."""
    tell = say or (lambda line: print(f"corral: {line}", file=sys.stderr, flush=True))
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    token = load_token(directory)
    sockets: list[tuple[socket.socket, str | None, str]] = []
    try:
        if listen:
            host, port = parse_listen(listen)
            tcp = _tcp_socket(host, port)
            bound_port = tcp.getsockname()[1]
            sockets.append((tcp, token, f"http://{host}:{bound_port}/?token={token}"))
        if socket_path:
            unix = _unix_socket(Path(socket_path))
            sockets.append((unix, None, f"unix:{socket_path}"))
        if not sockets:
            raise CorralError("nothing to listen on: give --listen HOST:PORT or --socket PATH")
        daemon = Daemon(directory, rules=rules, max_age_s=max_age_s, max_bytes=max_bytes)
    except BaseException:
        for sock, _, _ in sockets:
            sock.close()
        raise
    try:
        servers = [_Server(uvicorn.Config(make_app(daemon, tok), log_level="warning", lifespan="off",
                                          timeout_graceful_shutdown=2))
                   for _, tok, _ in sockets]
        tell(f"serving; data in {directory} (token in {directory / TOKEN_FILE})")
        for _, _, where in sockets:
            tell(f"  {where}")
        asyncio.run(_run(servers, [s for s, _, _ in sockets]))
    finally:
        tell("stopping: every sandbox of this daemon is stopped, the store written")
        daemon.close()
        for sock, _, where in sockets:
            sock.close()
            if where.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    Path(where[5:]).unlink()
    return 0


async def _run(servers: list[_Server], sockets: list[socket.socket]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in zip(servers, sockets, strict=True)))
