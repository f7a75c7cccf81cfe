"""A scripted OpenAI-compatible HTTP server on loopback, for driving the real client.

Supported endpoints (everything else answers 404 with an OpenAI error body):

* ``POST /v1/chat/completions`` — JSON, or SSE ``chat.completion.chunk`` events
  ending in ``data: [DONE]`` when ``"stream": true`` (a usage chunk is added
  when ``stream_options.include_usage`` is set). This is what convlog workers
  and the Agents SDK's ``OpenAIChatCompletionsModel`` use.
* ``POST /v1/responses`` — the Responses API object, or its SSE event sequence
  (``response.created`` … ``response.completed``) when streaming; enough for the
  Agents SDK's default ``OpenAIResponsesModel`` (``Runner.run`` and ``run_streamed``).
* ``POST /v1/responses/compact`` — what ``client.responses.compact`` calls: a
  ``response.compaction`` object whose ``output`` is, as the real API's is,
  every user message of the history followed by one ``compaction`` item.  The
  history is the request's ``input``, or with ``previous_response_id`` the
  chain of responses this server produced.  The item's ``encrypted_content``
  is opaque to clients; :func:`compacted_items` decodes the fake's (base64
  JSON of the items it replaced), so a test can check what was summarised.
  Compaction replies are computed, never taken from the script; what
  :meth:`FakeOpenAI.script_compact` queues (a ``slow`` delay, an ``error``)
  comes first.

Replies come from a script queue, then an optional responder, then a default::

    with FakeOpenAI() as fake:
        fake.script([tool_call("transfer_to_billing", {}), text("Billing here.")])
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="test")
        ...
        assert fake.requests[0]["model"] == "gpt-4o-mini"

The server runs in its own thread (``ThreadingHTTPServer``, one thread per
connection), so it keeps answering while the test's event loop is busy and a
``slow`` reply never blocks other requests. Standard library only.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from . import openai_wire as wire

__all__ = [
    "COMPACT_PATH", "Body", "Disconnect", "Entry", "Error", "FakeOpenAI", "RecordedRequest", "Reply", "Slow",
    "ToolCall", "compacted_items", "disconnect", "error", "slow", "text", "tool_call", "tool_calls",
]

COMPACT_PATH = "/v1/responses/compact"

# -- script entries ---------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One function call the fake model makes; ``arguments`` is a JSON string."""

    name: str
    arguments: str
    call_id: str | None = None


@dataclass(frozen=True)
class Reply:
    """A successful completion: assistant text and/or tool calls."""

    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Error:
    """An HTTP error with an OpenAI-shaped body and optional ``Retry-After``."""

    status: int
    message: str
    retry_after: float | None = None
    code: str | None = None


@dataclass(frozen=True)
class Slow:
    """Wait ``seconds`` (cut short by ``stop()``), then answer ``then`` (default reply if None)."""

    seconds: float
    then: Entry | None = None


@dataclass(frozen=True)
class Disconnect:
    """Close the connection without any response (client sees a connection error)."""


@dataclass(frozen=True)
class Body:
    """A 200 answer whose body is ``data`` as is (a server answering garbage)."""

    data: bytes


Entry = Reply | Error | Slow | Disconnect | Body


def text(content: str) -> Reply:
    """An assistant text reply (``finish_reason: "stop"``)."""
    return Reply(content=content)


def tool_call(
    name: str, arguments: dict[str, Any] | str | None = None, *, call_id: str | None = None
) -> Reply:
    """A reply with one function call (``finish_reason: "tool_calls"``)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    return Reply(tool_calls=(ToolCall(name, args, call_id),))


def tool_calls(*replies: Reply, content: str | None = None) -> Reply:
    """Merge several :func:`tool_call` replies into one parallel-calls reply."""
    return Reply(content=content, tool_calls=tuple(c for r in replies for c in r.tool_calls))


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error(
    status: int, message: str | None = None, *, retry_after: float | None = None,
    code: str | None = None,
) -> Error:
    """An HTTP error reply, e.g. ``error(429, retry_after=1)`` or ``error(500)``."""
    default_code = "rate_limit_exceeded" if status == 429 else None
    return Error(status, message or f"fake error {status}", retry_after, code or default_code)


def slow(seconds: float, then: Entry | None = None) -> Slow:
    """Delay the answer (for client timeouts and cancellation tests)."""
    return Slow(seconds, then)


def disconnect() -> Disconnect:
    """Drop the connection with no response."""
    return Disconnect()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received: path, lower-cased headers, parsed JSON body."""

    path: str
    headers: dict[str, str]
    body: Any


# -- the server ---------------------------------------------------------------


class FakeOpenAI:
    """The fake server. ``start()``/``stop()`` or use as a context manager.

    Args:
        default: answer when the script is empty and no responder answers
            (default ``text("ok")``).
    """

    def __init__(self, *, default: Entry | None = None) -> None:
        self.default: Entry = default or text("ok")
        self._lock = threading.Lock()
        self._script: deque[Entry] = deque()
        self._responder: Callable[[Any], Entry | None] | None = None
        self._compact_script: deque[Slow | Error] = deque()
        self._recorded: list[RecordedRequest] = []
        self._chains: dict[str, list[Any]] = {}  # response id -> its whole history (for compact)
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind 127.0.0.1 on an ephemeral port and serve in a background thread."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name="fake-openai", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections, join the thread. Idempotent."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()  # joins the per-connection threads
        if self._thread is not None:
            self._thread.join()
        self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeOpenAI not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1`` — pass as ``base_url`` / ``OPENAI_BASE_URL``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, entries: Iterable[Entry]) -> None:
        """Queue replies; each request consumes one, in order (appends to the queue)."""
        with self._lock:
            self._script.extend(entries)

    def script_compact(self, entries: Iterable[Slow | Error]) -> None:
        """Queue how ``responses.compact`` requests answer, one entry each: a
        ``slow(seconds)`` delays the computed reply, an ``error`` replaces it."""
        with self._lock:
            self._compact_script.extend(entries)

    def responder(self, fn: Callable[[Any], Entry | None] | None) -> None:
        """Answer from ``fn(request_json)`` once the script is empty; ``None`` from
        ``fn`` means the default reply. Pass ``None`` to remove the responder."""
        with self._lock:
            self._responder = fn

    @property
    def pending(self) -> int:
        """Scripted entries not yet consumed."""
        with self._lock:
            return len(self._script)

    @property
    def requests(self) -> list[Any]:
        """Parsed JSON bodies of every model request so far (a snapshot copy; compactions
        are in :attr:`compactions`)."""
        with self._lock:
            return [r.body for r in self._recorded if r.path != COMPACT_PATH]

    @property
    def compactions(self) -> list[Any]:
        """Parsed JSON bodies of every ``responses.compact`` request so far."""
        with self._lock:
            return [r.body for r in self._recorded if r.path == COMPACT_PATH]

    @property
    def recorded(self) -> list[RecordedRequest]:
        """Every request with its path and headers (a snapshot copy)."""
        with self._lock:
            return list(self._recorded)

    def reset(self) -> None:
        """Forget recorded requests, the script and the responder."""
        with self._lock:
            self._recorded.clear()
            self._script.clear()
            self._responder = None
            self._compact_script.clear()
            self._chains.clear()

    # called from handler threads
    def _next_entry(self, request: RecordedRequest) -> Entry:
        with self._lock:
            self._recorded.append(request)
            if self._script:
                return self._script.popleft()
            responder = self._responder
        entry = responder(request.body) if responder is not None else None
        return entry or self.default

    def _next_id(self) -> int:
        return next(self._ids)

    def _history(self, body: dict[str, Any]) -> list[Any]:
        """What a Responses request continues: its previous response's chain, then its input."""
        prev = body.get("previous_response_id")
        with self._lock:
            head = list(self._chains.get(prev, [])) if isinstance(prev, str) else []
        given = body.get("input")
        if isinstance(given, str):
            given = [{"role": "user", "content": given}]
        return head + (given if isinstance(given, list) else [])

    def _remember(self, response_id: str, history: list[Any]) -> None:
        with self._lock:
            self._chains[response_id] = history

    def _compact(self, body: dict[str, Any]) -> dict[str, Any]:
        history = self._history(body)
        n = self._next_id()
        users = [i for i in history if isinstance(i, dict) and i.get("role") == "user"
                 and i.get("type", "message") == "message"]
        others = [i for i in history if not any(i is u for u in users)]
        output: list[dict[str, Any]] = [
            {"type": "message", "id": f"msg_cmp_{n}_{k}", "status": "completed", "role": "user",
             "content": [{"type": "input_text", "text": _text_of(u)}]}
            for k, u in enumerate(users)
        ]
        blob = base64.b64encode(json.dumps(others).encode()).decode()
        output.append({"type": "compaction", "id": f"cmp_fake_{n}", "encrypted_content": blob})
        used = wire.tokens(history)
        return {
            "id": f"resp_cmp_{n}", "object": "response.compaction", "created_at": int(time.time()),
            "output": output,
            "usage": {"input_tokens": used, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": used + 20},
        }


def compacted_items(item: dict[str, Any]) -> list[Any]:
    """The items a fake ``compaction`` item stands for (decodes its ``encrypted_content``)."""
    return json.loads(base64.b64decode(item["encrypted_content"]))


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


class _Server(ThreadingHTTPServer):
    """Tracks live connections so ``stop()`` can close idle keep-alive sockets."""

    daemon_threads = True
    fake: FakeOpenAI

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-reply (timeouts, cancellation tests) is expected.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/responses", COMPACT_PATH):
            self._send_error(error(404, f"unknown path {path}"))
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_error(error(400, "request body is not a JSON object"))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        if path == COMPACT_PATH:
            with fake._lock:
                fake._recorded.append(RecordedRequest(path, headers, body))
                how = fake._compact_script.popleft() if fake._compact_script else None
            if isinstance(how, Slow) and fake._stopping.wait(how.seconds):
                self.close_connection = True
                return
            if isinstance(how, Error):
                self._send_error(how)
                return
            self._send_json(200, fake._compact(body))
            return
        entry = fake._next_entry(RecordedRequest(path, headers, body))
        while isinstance(entry, Slow):
            if fake._stopping.wait(entry.seconds):
                self.close_connection = True
                return
            entry = entry.then or fake.default
        if isinstance(entry, Disconnect):
            self.close_connection = True
            return
        if isinstance(entry, Error):
            self._send_error(entry)
            return
        if isinstance(entry, Body):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(entry.data)))
            self.end_headers()
            self.wfile.write(entry.data)
            return
        n, model = fake._next_id(), str(body.get("model", "fake-model"))
        chat = path.endswith("/chat/completions")
        if not chat:
            fake._remember(f"resp_fake_{n}", fake._history(body) + wire.response_items(entry, n))
        if body.get("stream"):
            if chat:
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._send_sse((None, c) for c in wire.chat_chunks(entry, model, n, usage))
            else:
                self._send_sse(wire.response_events(entry, model, n, body))
        else:
            doc = wire.chat_completion(entry, model, n) if chat else wire.response(entry, model, n, body)
            self._send_json(200, doc)

    def _send_json(self, status: int, doc: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: Error) -> None:
        kind = _ERROR_TYPES.get(err.status, "server_error" if err.status >= 500 else "api_error")
        doc = {"error": {"message": err.message, "type": kind, "param": None, "code": err.code}}
        extra = {"Retry-After": f"{err.retry_after:g}"} if err.retry_after is not None else {}
        self._send_json(err.status, doc, extra)

    def _send_sse(self, events: Iterable[tuple[str | None, Any]]) -> None:
        # No Content-Length: the stream ends when we close the connection.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for name, data in events:
            payload = data if isinstance(data, str) else json.dumps(data)
            prefix = f"event: {name}\n" if name else ""
            self.wfile.write(f"{prefix}data: {payload}\n\n".encode())
            self.wfile.flush()
