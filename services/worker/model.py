"""The model client: one Protocol, one Chat Completions implementation.

Workers reach models only through ``openai.AsyncOpenAI`` Chat Completions, so
any OpenAI-compatible server works.  :class:`OpenAIChatModel` owns retrying,
as one tenacity policy: the openai client's own retries are switched off so
that backoff, jitter and ``Retry-After`` handling live in one place, the
number of attempts is exactly ``1 + max_retries``, and a server asking for a
longer wait than the worker should hold a turn ends the retries at once (the
openai client would sleep it out, holding the delivery).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, runtime_checkable

import httpx2
import msgspec
import openai
import tenacity

from shared.codec import decode_as
from shared.failures import Backoff

__all__ = [
    "ModelClient",
    "ModelError",
    "ModelRejected",
    "ModelReply",
    "ModelUnavailable",
    "OpenAIChatModel",
    "ToolCall",
    "make_model_client",
    "parse_retry_after",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call requested by the model.

    Attributes:
        id: the model's call id; becomes the items' ``call_id``.
        name: the function name (a handoff tool or a function tool).
        arguments: the JSON-encoded arguments exactly as the model sent them.
    """

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ModelReply:
    """What the model answered.

    Attributes:
        text: the assistant text, or ``None`` when the model only called tools.
        tool_calls: requested tool calls, in the model's order (may be empty).
        model: the model name the server reported (the rules model reports
            ``convlog-rules-model (offline, deterministic, not an LLM)``).
    """

    text: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    model: str | None = None
    # Token counts as the server's ``usage`` reports them (for metrics; not
    # part of what the model said, so not compared).
    input_tokens: int | None = field(default=None, compare=False)
    output_tokens: int | None = field(default=None, compare=False)


class ModelError(Exception):
    """Base of model-call failures."""


class ModelUnavailable(ModelError):
    """The model endpoint could not answer after every retry (the worker then ends the
    turn with a ``system`` item saying so: see :mod:`.turn`).

    Attributes:
        attempts: how many requests were made.
        last_status: the last HTTP status, or ``None`` for connection errors/timeouts.
        retry_after: the server's last requested wait in seconds, if it sent one.
    """

    def __init__(
        self, message: str, *, attempts: int, last_status: int | None, retry_after: float | None
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_status = last_status
        self.retry_after = retry_after


class ModelRejected(ModelError):
    """The endpoint refused the request itself (a non-retryable 4xx); retrying cannot help.

    Attributes:
        status: the HTTP status (400, 401, 403, 404, 422, ...).
    """

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


@runtime_checkable
class ModelClient(Protocol):
    """Anything that can answer a Chat Completions request.

    ``complete`` returns one reply for the conversation so far.  It either
    returns, raises :class:`ModelUnavailable` (a transient failure that outlasted the
    client's own retries), or raises :class:`ModelRejected` (permanent); either ends
    the turn with a ``system`` item (:mod:`.turn`).
    """

    async def complete(
        self,
        *,
        model: str,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]],
    ) -> ModelReply:
        """Ask ``model`` for the next assistant message.

        Args:
            model: model name, as in the agent spec.
            messages: Chat Completions messages, system prompt first.
            tools: Chat Completions tool schemas; empty means no tools.
        """
        ...


class OpenAIChatModel:
    """:class:`ModelClient` over ``client.chat.completions.create``.

    Retries 408/409/429/5xx responses and connection errors/timeouts up to
    ``max_retries`` times.  The wait before retry *n* (0-based) is the server's
    ``retry-after-ms`` / ``Retry-After`` (seconds or HTTP date) when present,
    otherwise ``min(max_delay, base_delay * 2**n)`` with equal jitter.  A
    server asking for a wait longer than ``max_delay`` ends the retries at once
    with :class:`ModelUnavailable` (carrying ``retry_after``) rather than
    holding the turn.  Other 4xx raise :class:`ModelRejected` immediately.

    Args:
        client: the openai client; its own retries are disabled here.
        max_retries: retries after the first attempt.
        base_delay: first backoff, seconds.
        max_delay: backoff cap, and the longest ``Retry-After`` honoured, seconds.
        timeout: per-request timeout, seconds.
        sleep: injectable for tests; defaults to :func:`asyncio.sleep`.
        rng: injectable for tests; returns a float in ``[0, 1)``.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        max_retries: int = 4,
        base_delay: float = 0.5,
        max_delay: float = 20.0,
        *,
        timeout: float = 60.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if max_retries < 0 or base_delay < 0 or max_delay < 0 or timeout <= 0:
            raise ValueError("max_retries, base_delay, max_delay must be >= 0 and timeout > 0")
        self._client = client.with_options(max_retries=0, timeout=timeout)
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._backoff = Backoff(initial=base_delay, maximum=max_delay)
        self._sleep = sleep
        self._rng = rng

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The underlying openai client (with retries disabled)."""
        return self._client

    async def complete(
        self,
        *,
        model: str,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]],
    ) -> ModelReply:
        """See :meth:`ModelClient.complete`.

        Raises:
            ModelUnavailable: retries exhausted or the server asked for a wait
                longer than ``max_delay``.
            ModelRejected: a non-retryable 4xx.
        """
        # The messages and tools are already wire JSON (plain dicts built by
        # .convert), so the body goes out as is through the client's generic
        # ``post`` (its documented way to a route by hand): ``create``'s per-field
        # TypedDict transform of ``messages`` costs about 0.3 ms a message on a
        # small machine, and building pydantic models of the answer another
        # 0.1 ms; the answer is decoded here into what the worker uses.  The
        # request, its headers, auth, timeouts and status errors are the client's.  The body
        # is encoded once, here, with msgspec (the client's json.dumps took 0.06 ms of a
        # 0.85 ms call with a 50-item window), and sent as the request's content.
        body: dict[str, Any] = {"model": model, "messages": messages}
        if tools:  # an empty tools array is refused by the API
            body["tools"] = tools
        content = _json.encode(body)
        # The first attempt goes out without tenacity's machinery (a tenth of an
        # instant model's call); only a transient failure enters the retry loop,
        # whose first attempt re-raises that failure, so attempts, waits and the
        # stop rule are exactly the policy's.
        first: Exception | None = None
        try:
            return _to_reply(await self._post(content))
        except (openai.APIStatusError, openai.APIConnectionError) as e:
            if not _transient(e):
                raise self._refused_or_unavailable(e, 1) from e
            first = e
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_transient),
            stop=self._stop,
            wait=self._wait,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first is not None:
                        failed, first = first, None
                        raise failed
                    response = await self._post(content)
        except (openai.APIStatusError, openai.APIConnectionError) as e:
            raise self._refused_or_unavailable(e, retrying.statistics["attempt_number"]) from e
        return _to_reply(response)

    async def _post(self, content: bytes) -> httpx2.Response:
        return await self._client.post("/chat/completions", content=content, cast_to=httpx2.Response)

    def _refused_or_unavailable(self, e: openai.APIError, attempts: int) -> ModelError:
        """What a failed request ends the call with (``e`` is a status or connection error)."""
        if isinstance(e, openai.APIStatusError):
            if not _transient(e):
                return ModelRejected(
                    f"model endpoint refused the request: HTTP {e.status_code}: {_brief(e)}",
                    status=e.status_code,
                )
        return self._unavailable(e, attempts)  # a connection error (timeouts included), or retries spent

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        """Out of retries, or the server asked for a wait longer than ``max_delay``."""
        retry_after = _retry_after(state)
        too_long = retry_after is not None and retry_after > self.max_delay
        return too_long or state.attempt_number > self.max_retries

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """The server's ``Retry-After`` if it sent one, else the jittered backoff."""
        retry_after = _retry_after(state)
        if retry_after is not None:
            return max(0.0, retry_after)
        return self._backoff.delay(state.attempt_number - 1, self._rng)

    def _unavailable(self, e: openai.APIError, attempts: int) -> ModelUnavailable:
        status = e.status_code if isinstance(e, openai.APIStatusError) else None
        retry_after = parse_retry_after(e.response.headers) if status is not None else None
        last = (
            f"HTTP {status}" if status is not None
            else "timeout" if isinstance(e, openai.APITimeoutError) else "connection error"
        )
        if retry_after is not None and retry_after > self.max_delay:
            return ModelUnavailable(
                f"model endpoint unavailable: {last} with Retry-After {retry_after:g}s"
                f" (longer than the {self.max_delay:g}s cap) after {attempts} attempt(s)",
                attempts=attempts, last_status=status, retry_after=retry_after,
            )
        return ModelUnavailable(
            f"model endpoint unavailable after {attempts} attempt(s); last: {last}",
            attempts=attempts, last_status=status, retry_after=retry_after,
        )


def parse_retry_after(headers: Any, *, now: float | None = None) -> float | None:
    """Seconds the server asked to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be delta-seconds or an HTTP date.  Returns ``None`` when
    no usable header is present; dates in the past give ``0.0``.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000.0
            if value >= 0 and value == value:  # not NaN
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if value >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def make_model_client(
    api_key: str | None,
    base_url: str | None = None,
    *,
    max_retries: int = 4,
    base_delay: float = 0.5,
    max_delay: float = 20.0,
    timeout: float = 60.0,
) -> OpenAIChatModel:
    """The model client the worker uses.

    With an API key: ``openai.AsyncOpenAI`` against ``base_url`` (default
    ``https://api.openai.com/v1``).  Without one: the offline rules model
    (:mod:`services.worker.rules_model`), reached through the same client code
    path.  The entrypoint passes ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``;
    nothing here reads the environment.
    """
    if api_key:
        client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url or DEFAULT_BASE_URL)
    else:
        from .rules_model import rules_openai_client

        client = rules_openai_client()
    return OpenAIChatModel(
        client,
        max_retries=max_retries,
        base_delay=base_delay,
        max_delay=max_delay,
        timeout=timeout,
    )


def _transient(e: BaseException) -> bool:
    """Worth retrying: a dropped connection, a timeout, 408/409/429/5xx (or
    whatever the server's ``x-should-retry`` says)."""
    if isinstance(e, openai.APIConnectionError):
        return True
    if not isinstance(e, openai.APIStatusError):
        return False
    should = e.response.headers.get("x-should-retry")
    if should == "true":
        return True
    if should == "false":
        return False
    return e.status_code in _RETRYABLE_STATUS or e.status_code >= 500


def _retry_after(state: tenacity.RetryCallState) -> float | None:
    """The wait the failed attempt's server response asked for, if any."""
    error = state.outcome.exception() if state.outcome is not None else None
    if isinstance(error, openai.APIStatusError):
        return parse_retry_after(error.response.headers)
    return None


def _brief(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if isinstance(message, str):
            return message[:300]
    return str(e.message)[:300]


class _Function(msgspec.Struct):
    name: str
    arguments: str | None = None


class _Call(msgspec.Struct):
    id: str | None = None  # null or absent from some compatible servers: the worker names the call
    function: _Function | None = None  # absent on custom (non-function) tool calls


class _Message(msgspec.Struct):
    content: str | list[Any] | None = None  # a list of parts from some compatible servers
    refusal: str | None = None
    tool_calls: list[_Call] | None = None


class _Choice(msgspec.Struct):
    message: _Message


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Completion(msgspec.Struct):
    """The parts of a Chat Completions answer the worker uses (other fields are skipped)."""

    choices: list[_Choice] = []
    model: str | None = None
    usage: _Usage | None = None


_completion = msgspec.json.Decoder(_Completion)
_json = msgspec.json.Encoder()


def _to_reply(response: httpx2.Response) -> ModelReply:
    """Raises: ModelRejected: a 2xx body that is not a Chat Completions answer."""
    try:
        completion = decode_as(_completion, response.content, "a chat completion")
    except msgspec.DecodeError as e:
        raise ModelRejected(f"model endpoint answered with no chat completion: {e}",
                            status=response.status_code) from e
    if not completion.choices:
        return ModelReply(text=None, tool_calls=[], model=completion.model)
    message = completion.choices[0].message
    calls = [ToolCall(id=c.id or "", name=c.function.name, arguments=c.function.arguments or "{}")
             for c in message.tool_calls or [] if c.function is not None]
    usage = completion.usage
    content = _content_text(message.content)
    text = content if content is not None or calls else message.refusal
    return ModelReply(text=text, tool_calls=calls, model=completion.model,
                      input_tokens=usage.prompt_tokens if usage else None,
                      output_tokens=usage.completion_tokens if usage else None)


def _content_text(content: str | list[Any] | None) -> str | None:
    """The text of a message's ``content``: a string, or a list of parts (as Mistral's
    and other compatible servers answer), whose ``text`` and ``refusal`` parts are joined
    (``thinking`` / reasoning parts are not what the model said)."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("text", "output_text", "refusal"):
            value = part.get("refusal" if part.get("type") == "refusal" else "text")
            if isinstance(value, str):
                texts.append(value)
    return "".join(texts) if texts else None
