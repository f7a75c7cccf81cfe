"""The web audit console: routes, the live tail (SSE) and the guards around them.

Everything goes through :class:`~shared.client.LogClient`, so the console
works with any store and any number of log-service instances.  It is
read-only (``GET``/``HEAD`` only) and serves data as JSON / JSONL; the pages
are static files that render it as text and verify the hash chain in the
browser, so a reviewer need not trust this server (see ``static/chain.js``).

Routes:
    ``/``                              the sessions page
    ``/sessions/<sid>``                one conversation
    ``/verify``                        verify a JSONL export from the reviewer's disk
    ``/api/sessions``                  ``?prefix=&cursor=&limit=`` newest first
    ``/sessions/<sid>/export.jsonl``   every envelope, then the log service's signed heads as
                                       ``{"signed_head": ...}`` lines (``?download=1``: as a file);
                                       ``X-Convlog-Witness: unavailable`` when the witness head
                                       could not be read (the heads are then the fresh one only)
    ``/sessions/<sid>/live``           SSE: every envelope after ``?after=`` / ``Last-Event-ID``
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.cli.audit import encode_head_line
from services.cli.common import is_loopback_host
from shared.client import LogClient, Unreadable
from shared.codec import MAX_SAFE_INT, encode, encode_envelope_line
from shared.errors import BadRequestError, ConvlogError, InvalidSessionIdError, UnavailableError
from shared.messages import Envelope, ReadReply, SignedHead
from shared.subjects import validate_session_id

from .index import SessionIndex

__all__ = ["WebOptions", "build_app"]

log = logging.getLogger("convlog.web")

STATIC = Path(__file__).parent / "static"
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{0,128}\Z")
_AFTER = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit()), and short: int() stays cheap
EXPORT_PAGE = 2000  # envelopes per read while streaming an export
EXPORT_CHUNK = 1 << 20  # bytes held before they are sent (about one read page, whatever the item sizes)
FIRST_PAGE = 200  # a small first read, so a browser can draw its first screen at once

# Pages load only our own files; no inline script or style can run even if
# something slipped past rendering-as-text.
_SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


@dataclass(frozen=True)
class WebOptions:
    """How the console guards itself.

    Attributes:
        token: when set, every request needs ``Authorization: Bearer <token>``
            or HTTP basic auth whose password is the token (any user name).
        loopback_only: the server is bound to a loopback address; without a
            token, requests must then name a loopback host (``Host`` header),
            which stops a DNS-rebinding page from reading the console.
        heartbeat: seconds between SSE comments on an idle live tail.
    """

    token: str | None = None
    loopback_only: bool = True
    heartbeat: float = 10.0


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers={"cache-control": "no-store"})


class _Guard:
    """Read-only, authenticated, security headers on every response (pure ASGI, so
    streaming responses pass through untouched)."""

    def __init__(self, app: ASGIApp, options: WebOptions) -> None:
        self.app = app
        self.options = options
        self._token = options.token.encode() if options.token else None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self._token is None:
            return True
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer":
            return hmac.compare_digest(value.strip(), self._token)
        if scheme == b"basic":
            try:
                _, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(password, self._token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the console has none: refuse before any route
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        headers = dict(scope.get("headers") or [])
        response: Response | None = None
        if scope["method"] not in ("GET", "HEAD"):
            response = _error(405, "read_only", "the console is read-only: GET and HEAD only")
            response.headers["allow"] = "GET, HEAD"
        elif not self._authorized(headers):
            response = _error(401, "unauthorized", "this console needs its token "
                              "(Authorization: Bearer, or basic auth with the token as password)")
            response.headers["www-authenticate"] = 'Basic realm="convlog", charset="UTF-8"'
        elif self._token is None and self.options.loopback_only:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback_host(name.lower()):  # 127.0.0.2 too: `convlog web --host 127.0.0.2`
                response = _error(421, "bad_host", f"this console answers only loopback host names, "
                                  f"not {host!r} (set a token to serve other names)")
        if response is not None:
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


class _Revalidated(StaticFiles):
    """The pages' scripts and stylesheet, which the browser checks with the console at each
    load (``no-cache``: a 304 while they are unchanged).

    Served with no Cache-Control, Chromium kept them fresh for a tenth of their age since
    modified and ran them from its cache unasked: after an upgrade of convlog a reviewer's
    browser went on running the old scripts, the old checks of the chain and signatures,
    for days.
    """

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "no-cache"
        return response


class _AnsweredOnStop:
    """A request still waiting for the log service when the console stops is answered
    503 at once (pure ASGI, around the routes).

    Reads wait up to the client's deadline (10 s with ``convlog web``) for a log service
    that does not answer; uvicorn would wait out its graceful timeout, then cancel the
    request with an ERROR and a traceback, and the page got no answer at all.  A
    response already started is left alone: a live tail ends on ``stopping`` and an
    export a reader is slow to take is cut off by the server's stop.
    """

    def __init__(self, app: ASGIApp, stopping: asyncio.Event) -> None:
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, send_noting_start))
        stopped = asyncio.ensure_future(self.stopping.wait())
        cut = False
        try:
            await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done() and not started:  # stopping (or cancelled ourselves) with no answer yet
                task.cancel()
                cut = True
        if not cut:
            await task
            return
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not started:
            await _error(503, "unavailable", "the console is stopping: the request was not "
                         "answered (load the page again once it is back)")(scope, receive, send)


def _sid(request: Request) -> str:
    sid = request.path_params["sid"]
    validate_session_id(sid)
    return sid


def _line(env: Envelope | Unreadable) -> bytes:
    if isinstance(env, Unreadable):  # no envelope: the line says so, and the chain breaks there
        return encode({"item_order": env.item_order, "unreadable": f"the stored envelope does not "
                       f"decode: {env.error}"}) + b"\n"
    return encode_envelope_line(env) + b"\n"


async def _signed_heads(client: LogClient, sid: str) -> tuple[list[SignedHead], bool]:
    """The session's heads the log service signed, as ``convlog replay`` exports them:
    the witness head (kept in ``<prefix>_heads``, outside the store) and a fresh one.
    None when the service has no key.  Read before the items, so every item a head
    covers is in the export (the log is append-only); the log service not answering for
    the fresh head (``UnavailableError``) is raised, as the items' read would be a deadline
    later.  Also whether the witness head could be read: when not, only the fresh head
    checks the tail, and a store restored from an older copy passes it (``convlog replay
    --verify`` fails then)."""
    from services.log.heads import read_witness_head

    heads: list[SignedHead | None] = []
    witnessed = True
    try:
        heads.append(await read_witness_head(client.nc, client.subjects, sid))
    except ConvlogError as e:  # the export still serves, with the fresh head (the page is told)
        log.warning("no witness head for %s: %s", sid, e.message)
        witnessed = False
    try:
        heads.append(await client.signed_head(sid))
    except UnavailableError:  # no log service: the items cannot be read either, so no second deadline
        raise
    except ConvlogError as e:  # the export still serves; the page then shows no fresh head
        log.warning("no signed head for %s: %s", sid, e.message)
    return [h for h in heads if h is not None], witnessed


def build_app(client: LogClient, options: WebOptions | None = None, *,
              stopping: asyncio.Event | None = None) -> ASGIApp:
    """The console as an ASGI app over ``client`` (which the caller owns and closes).

    ``stopping``: once set, every live tail ends and a request still waiting for the log
    service is answered 503 (so the server can stop at once).
    """
    options = options or WebOptions()
    stopping = stopping or asyncio.Event()
    index = SessionIndex(client)

    def html(name: str) -> Response:
        return FileResponse(STATIC / name, headers={"cache-control": "no-store"})

    async def home(request: Request) -> Response:
        return html("index.html")

    async def verify_page(request: Request) -> Response:
        return html("session.html")

    async def session_page(request: Request) -> Response:
        _sid(request)
        return html("session.html")

    async def api_sessions(request: Request) -> Response:
        q = request.query_params
        prefix = q.get("prefix", "")
        if not _PREFIX.match(prefix):
            return _error(400, "bad_request", "prefix: up to 128 of A-Z a-z 0-9 _ -")
        try:
            limit = int(q.get("limit", "50"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 500:
            return _error(400, "bad_request", f"limit must be 1..500, not {q.get('limit')!r}")
        rows, cursor, total = await index.page(prefix=prefix, cursor=q.get("cursor") or None, limit=limit)
        return JSONResponse({"sessions": [r.as_json() for r in rows], "next": cursor, "total": total},
                            headers={"cache-control": "no-store"})

    async def export(request: Request) -> Response:
        sid = _sid(request)
        heads, witnessed = await _signed_heads(client, sid)
        try:
            first = await client.read(sid, after=0, limit=FIRST_PAGE, raw=True)
        except BadRequestError:  # an envelope of the page does not decode: the export names it
            first = ReadReply(session_id=sid, items=[], last_order=await client.last_order(sid), more=True)
        # Read before the items: what the heads cover is in the log (see _signed_heads).
        signed = max((h.item_order for h in heads), default=0)
        if not first.items and not first.last_order and not signed:
            return _error(404, "not_found", f"session {sid!r} has no items")

        async def body() -> AsyncIterator[bytes]:
            if request.method == "HEAD":  # the server drops the body: reading the session was for nothing
                return
            yield b"".join(_line(e) for e in first.items)
            after = first.items[-1].item_order if first.items else 0
            if first.more or after < signed:
                # Items that end before a head are read on a moment, as `convlog replay
                # --verify` does: on an R3 JetStream log a follower trailing the leader
                # (milliseconds) may answer the reads, and the page would call the log
                # truncated.  Still short after that, the page's check says so.
                chunk: list[bytes] = []
                size = 0
                async for env in client.audit_items_through(sid, signed, after=after, page=EXPORT_PAGE):
                    chunk.append(_line(env))
                    size += len(chunk[-1])
                    if len(chunk) >= EXPORT_PAGE or size >= EXPORT_CHUNK:
                        yield b"".join(chunk)
                        chunk, size = [], 0
                if chunk:
                    yield b"".join(chunk)
            if heads:
                yield b"".join(encode_head_line(h) + b"\n" for h in heads)

        headers = {"cache-control": "no-store", "x-convlog-last-order": str(first.last_order)}
        if not witnessed:  # the body stays what `convlog replay --file` reads; the page is told here
            headers["x-convlog-witness"] = "unavailable"
        if request.query_params.get("download"):
            headers["content-disposition"] = f'attachment; filename="{sid}.jsonl"'
        return StreamingResponse(body(), media_type="application/jsonl; charset=utf-8", headers=headers)

    async def live(request: Request) -> Response:
        sid = _sid(request)
        raw_after = request.headers.get("last-event-id") or request.query_params.get("after", "0")
        # The log reads orders up to 2**53-1 (MAX_SAFE_INT) only: beyond, it refuses the read.
        if not _AFTER.fullmatch(raw_after) or int(raw_after) > MAX_SAFE_INT:
            return _error(400, "bad_request", f"after must be a non-negative integer, not {raw_after!r}")
        after = int(raw_after)
        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        if request.method == "HEAD":  # no body: a tail would never end the response
            return Response(media_type="text/event-stream", headers=headers)
        return StreamingResponse(_sse(client, sid, after, options.heartbeat, stopping),
                                 media_type="text/event-stream", headers=headers)

    routes = [
        Route("/", home),
        Route("/verify", verify_page),
        Route("/sessions/{sid}", session_page),
        Route("/api/sessions", api_sessions),
        Route("/sessions/{sid}/export.jsonl", export),
        Route("/sessions/{sid}/live", live),
        Mount("/static", _Revalidated(directory=STATIC), name="static"),
    ]

    async def invalid_sid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConvlogError)
        return _error(400, exc.code, exc.message)

    async def convlog_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConvlogError)
        status = {"not_found": 404, "unavailable": 503, "forbidden": 403}.get(exc.code, 400)
        return _error(status, exc.code, exc.message)

    app = Starlette(routes=routes, exception_handlers={
        InvalidSessionIdError: invalid_sid, ConvlogError: convlog_error,
    })
    return _Guard(_AnsweredOnStop(app, stopping), options)


async def _sse(client: LogClient, sid: str, after: int, heartbeat: float,
               stopping: asyncio.Event) -> AsyncIterator[bytes]:
    """Every envelope after ``after`` as SSE events (``id`` = item_order), until ``stopping``.

    A comment goes out after ``heartbeat`` idle seconds, so a closed tab is
    noticed and its follower stopped.  A follower that fails (an error it does not
    wait out, e.g. the log refusing the read) ends the stream at once, with a
    ``failed`` event saying why (the page stops reconnecting) and one WARNING.
    """
    # Events, held by bytes (items may be large): the follower waits while a slow reader
    # has EXPORT_CHUNK of them unsent, and a piece sent is at most about as much.
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    held = 0
    room = asyncio.Event()

    async def pump() -> None:
        nonlocal held
        async for env in client.follow(sid, after=after):
            while held >= EXPORT_CHUNK:
                room.clear()
                await room.wait()
            event = b"id: %d\ndata: %s\n\n" % (env.item_order, encode_envelope_line(env))
            held += len(event)
            queue.put_nowait(event)

    task = asyncio.create_task(pump(), name=f"web-live-{sid}")
    stopped = asyncio.ensure_future(stopping.wait())
    get: asyncio.Future[bytes] | None = None
    try:
        yield b"retry: 1000\n: following\n\n"
        while not stopped.done():
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait((get, stopped, task), timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():  # the server is stopping, the follower failed, or the tail is idle
                get.cancel()
                if stopped.done():
                    return
                if task.done():
                    rest = []  # what it queued goes out first (at most about EXPORT_CHUNK)
                    while not queue.empty():
                        rest.append(queue.get_nowait())
                    if rest:
                        yield b"".join(rest)
                    error = None if task.cancelled() else task.exception()
                    log.warning("live tail of session %s ended: its follower failed: %s", sid,
                                error.message if isinstance(error, ConvlogError) else repr(error))
                    reason = f"{error.code}: {error.message}" if isinstance(error, ConvlogError) \
                        else f"internal error ({type(error).__name__})"
                    yield b"event: failed\ndata: %s\n\n" % encode({"error": reason})
                    return
                yield b": idle\n\n"
                continue
            batch = [get.result()]
            size = len(batch[0])
            while not queue.empty() and size < EXPORT_CHUNK:
                batch.append(queue.get_nowait())
                size += len(batch[-1])
            held -= size
            room.set()
            yield b"".join(batch)
    finally:
        for t in (stopped, get, task):
            if t is not None:
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
