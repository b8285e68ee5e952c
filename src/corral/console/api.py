"""The HTTP API and web console of `corral serve` (FastAPI; JSON in and out).

    GET  /api/health                          daemon up, how many sandboxes
    GET  /api/sandboxes[?all=1]               sandboxes (live ones; all=1: also those in the store)
    POST /api/sandboxes                       make one: {policy, mode, episode, netns, allow, allow_domains,
                                              cpus, memory, pids}
    GET  /api/sandboxes/ID                    its record, steps, alerts, process tree, evidence
    POST /api/sandboxes/ID/exec               run a step: {command: str | [argv], timeout, input}
    POST /api/sandboxes/ID/release            thaw a frozen sandbox
    POST /api/sandboxes/ID/stop               kill everything in it and remove it (DELETE does the same)
    GET  /api/alerts?sandbox&episode&severity&since_ns&after&limit
    GET  /api/events?sandbox&kind&after&limit
    GET  /api/stream[?events=ID&after=SEQ]    server-sent events: alert, sandbox, step (and the stored events
                                              of one sandbox with events=ID, from after SEQ on)
    GET  /api/report/ID?format=json|md|html   the incident report of an episode or a sandbox

On TCP every request needs the bearer token (``Authorization: Bearer T``, or
the ``corral_token`` cookie the browser gets by opening ``/?token=T`` once);
on the Unix socket (mode 0600, root's) none is asked.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import Body, FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse

from corral import __version__
from corral.console import report as report_mod
from corral.console.daemon import Conflict, Daemon, NotFound
from corral.errors import CorralError
from corral.store import StoreError

COOKIE = "corral_token"
#: How often an events stream looks for new events in the store, and sends a keep-alive when idle.
EVENTS_POLL_S = 0.25
KEEPALIVE_S = 15.0
WEB = resources.files("corral.console") / "web"


def make_app(daemon: Daemon, token: str | None) -> FastAPI:
    """The API and the page; `token` None means no authentication (the Unix socket)."""
    app = FastAPI(title="corral", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if token is None or request.url.path.startswith("/static/"):
            return await call_next(request)
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given, token):
            # The browser's first visit: keep the token in a cookie, drop it from the address bar.
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        header = request.headers.get("authorization", "")
        offered = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
        if hmac.compare_digest(offered.encode(), token.encode()):
            return await call_next(request)
        message = ("a bearer token is required: `Authorization: Bearer TOKEN` (the token is in the data "
                   "directory's `token` file), or open the URL `corral serve` printed")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=401)
        return PlainTextResponse(message, status_code=401)

    @app.exception_handler(CorralError)
    async def corral_error(request: Request, exc: CorralError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound | report_mod.NotFound) else 409 if isinstance(exc, Conflict) \
            else 503 if isinstance(exc, StoreError) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    # -- the page ------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (WEB / "index.html").read_text()

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        types = {".js": "text/javascript", ".css": "text/css"}
        kind = next((t for ext, t in types.items() if name.endswith(ext)), None)
        file = WEB / name
        if kind is None or "/" in name or not file.is_file():
            return PlainTextResponse("not found", status_code=404)
        return Response(file.read_text(), media_type=kind)

    # -- sandboxes -------------------------------------------------------------------------

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "sandboxes": len(daemon.names()),
                "stream_messages_lost": daemon.hub.lost, "events_not_recorded": daemon.recorder.dropped}

    @app.get("/api/sandboxes")
    def sandboxes(all: bool = False) -> list[dict[str, Any]]:
        return daemon.sandboxes(all_=all)

    @app.post("/api/sandboxes", status_code=201)
    def create(spec: dict[str, Any] = Body(default_factory=dict)) -> dict[str, Any]:  # noqa: B008
        known = {"policy", "mode", "episode", "netns", "allow", "allow_domains", "cpus", "memory", "pids"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise CorralError(f"unknown field(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        return daemon.create(**spec)

    @app.get("/api/sandboxes/{name}")
    def sandbox(name: str) -> dict[str, Any]:
        return daemon.detail(name)

    @app.post("/api/sandboxes/{name}/exec")
    def exec_step(name: str, spec: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        command = spec.get("command")
        if not command or not isinstance(command, str | list):
            raise CorralError('"command" is required: a shell command string or an argv list')
        timeout = spec.get("timeout")
        return daemon.exec(name, command, timeout=float(timeout) if timeout is not None else None,
                           input=spec.get("input"))

    @app.post("/api/sandboxes/{name}/release")
    def release(name: str) -> dict[str, Any]:
        return daemon.release(name)

    @app.post("/api/sandboxes/{name}/stop")
    @app.delete("/api/sandboxes/{name}")
    def stop(name: str) -> dict[str, Any]:
        return daemon.stop(name)

    # -- the store -------------------------------------------------------------------------

    @app.get("/api/alerts")
    def alerts(sandbox: str | None = None, episode: str | None = None, severity: str | None = None,
               since_ns: int | None = None, after: int = 0, limit: int = Query(1000, le=100_000)) -> list[Any]:
        return daemon.store.alerts(sandbox=sandbox, episode=episode, min_severity=severity, since_ns=since_ns,
                                   after=after, limit=limit)

    @app.get("/api/events")
    def events(sandbox: str | None = None, kind: list[str] = Query(default_factory=list),  # noqa: B008
               after: int = 0, limit: int = Query(1000, le=100_000)) -> list[Any]:
        return daemon.store.events(sandbox=sandbox, kinds=kind, after=after, limit=limit)

    @app.get("/api/report/{ident}")
    def report(ident: str, format: str = "json") -> Response:
        data = report_mod.build_report(daemon.store, ident)
        if format == "md":
            return PlainTextResponse(report_mod.render_markdown(data), media_type="text/markdown")
        if format == "html":
            return HTMLResponse(report_mod.render_html(data))
        if format != "json":
            raise CorralError(f"unknown report format {format!r}: json, md or html")
        return JSONResponse(data)

    # -- live ------------------------------------------------------------------------------

    @app.get("/api/stream")
    async def stream(request: Request, events: str | None = None, after: int = 0) -> StreamingResponse:
        queue = daemon.hub.subscribe()

        async def messages() -> AsyncIterator[str]:
            seen = after
            idle = 0.0
            try:
                yield "retry: 1000\n\n"
                while not await request.is_disconnected():
                    try:
                        message = await asyncio.wait_for(queue.get(), EVENTS_POLL_S)
                        idle = 0.0
                        yield _sse(message["type"], message)
                        continue
                    except TimeoutError:
                        idle += EVENTS_POLL_S
                    if events:
                        for e in await asyncio.to_thread(daemon.store.events, sandbox=events, after=seen):
                            seen = e["seq"]
                            idle = 0.0
                            yield _sse("event", e)
                    if idle >= KEEPALIVE_S:
                        idle = 0.0
                        yield ": keep-alive\n\n"
            finally:
                daemon.hub.unsubscribe(queue)

        return StreamingResponse(messages(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return app


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
