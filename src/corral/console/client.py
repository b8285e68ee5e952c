"""A small client of `corral serve`'s API, over its Unix socket (default) or TCP with the token."""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from corral.errors import CorralError
from corral.store import default_data_dir

DEFAULT_LISTEN = "127.0.0.1:7077"
DEFAULT_SOCKET = Path("/run/corral/corral.sock")
TOKEN_FILE = "token"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Client:
    """`url`: ``unix:PATH`` or ``http://HOST:PORT`` (default $CORRAL_URL, else the default socket).
    On TCP the token is $CORRAL_TOKEN, else the data directory's token file."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 3600.0) -> None:
        self.url = url or os.environ.get("CORRAL_URL") or f"unix:{DEFAULT_SOCKET}"
        self.timeout = timeout
        self.token = token or os.environ.get("CORRAL_TOKEN")
        if not self.url.startswith("unix:") and not self.token:
            with_token = default_data_dir() / TOKEN_FILE
            if with_token.is_file():
                self.token = with_token.read_text().strip()

    def _connection(self) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            return _UnixConnection(self.url[5:], self.timeout)
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise CorralError(f"--url {self.url!r}: expected unix:PATH or http://HOST:PORT")
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; the decoded JSON answer, or CorralError with the daemon's message."""
        headers = {"Content-Type": "application/json"}
        if self.token and not self.url.startswith("unix:"):
            headers["Authorization"] = f"Bearer {self.token}"
        connection = self._connection()
        try:
            connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise CorralError(f"no `corral serve` answers on {self.url}: start it (`corral serve`) or pass "
                              "--url") from e
        except PermissionError as e:
            raise CorralError(f"cannot connect to {self.url}: the socket is root's; run as root or use "
                              "--url http://HOST:PORT with the token") from e
        except OSError as e:
            raise CorralError(f"cannot talk to `corral serve` at {self.url}: {e}") from e
        finally:
            connection.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = {"error": raw.decode(errors="replace")[:200]}
        if response.status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise CorralError(f"corral serve: {message or response.reason} (HTTP {response.status})")
        return data

