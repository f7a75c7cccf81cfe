"""Requests to the log service: one reply subscription, one retry policy.

:class:`Requester` is the request half of :class:`~shared.client.LogClient`:
every request goes out with a reply subject under one wildcard inbox
subscription (made on the first request), one future per request in flight
keyed by a token, and one timer that times out whatever is overdue.  A
request whose outcome is unknown (a timeout, "no responders", a reconnect, an
``unavailable`` reply) is sent again with the same body until the deadline;
the log answers a retried append it already committed with the original
orders, so a retry never writes twice.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable

import nats
import nats.errors
import tenacity
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header

from . import tracing
from .errors import TooLargeError, UnavailableError, from_wire
from .nats_seam import seam_for
from .wire import over_max_payload

__all__ = ["RETRYABLE", "RETRY_ON", "UNSENT", "Requester", "raise_if_cancelled"]

#: What says nothing about whether a request was carried out (its outcome is unknown).
RETRYABLE = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)


# What a log request retries: an unknown outcome, or the service saying "later".
RETRY_ON = (*RETRYABLE, UnavailableError)
# Its waits: 0.05 s, doubling, at most 1 s (no jitter: the deadline check is exact).
_REQUEST_WAIT = tenacity.wait_exponential(multiplier=0.05, max=1.0)

# A "no responders" reply: an empty message whose inline status is 503
# (what nats-py's own ``Client.request`` checks).
_STATUS = Header.STATUS.value
_NO_RESPONDERS = "503"


class _Unsent:
    """The type of :data:`UNSENT`."""


#: ``Requester._request(first=UNSENT)``: the request was not sent yet.
UNSENT = _Unsent()


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that an awaited library call swallowed.

    On Python 3.11 ``asyncio.wait_for`` (under nats-py's ``request`` and
    ``next_msg``) returns the result instead of raising when the cancel and the
    result land in the same loop tick; the task stays marked ``cancelling()``.
    Loops that would otherwise run on (a follower, a retry) must check.
    (:meth:`Requester._request_once` awaits its future directly, so a cancel
    always raises there; the check stays for everything else.)
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Requester:
    """Request/reply over ``nc`` with the log's retry policy.

    Args:
        nc: a connected nats-py client.
        timeout: seconds one request waits for its reply.
        deadline: seconds an operation keeps retrying unknown outcomes.
    """

    def __init__(self, nc: Client, *, timeout: float = 5.0, deadline: float = 30.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self.deadline = deadline
        # Request multiplexer: one wildcard reply subscription (made on the
        # first request), one future per request in flight, keyed by token.
        self._reply_sub: Subscription | None = None
        self._reply_prefix = ""
        self._reply_lock = asyncio.Lock()
        self._pending: dict[str, tuple[asyncio.Future[Msg | None], float]] = {}
        self._tokens = itertools.count(1)
        self._sweeper: asyncio.TimerHandle | None = None  # times out requests in flight
        self._sweep_at = 0.0
        #: Called after each reply with ``(subject, started, sent, replied)``,
        #: ``time.perf_counter()`` stamps of one request: entering the send, the
        #: publish done, the reply back in the requesting task.  For benches.
        self.observer: Callable[[str, float, float, float], None] | None = None

    async def _subscribe_replies(self) -> str:
        """Subscribe ``<inbox>.*`` once; return the reply prefix (``<inbox>.``).

        nats-py replays the subscription after every reconnect.
        """
        async with self._reply_lock:
            if self._reply_sub is None:
                prefix = self.nc.new_inbox() + "."
                self._reply_prefix = prefix
                self._reply_sub = await self.nc.subscribe(prefix + "*", cb=self._on_reply)
                # Replies resolved as nats-py parses them; else _on_reply serves.
                seam_for(self.nc).deliver_inline(self._reply_sub, self._take_reply)
            return self._reply_prefix

    def _take_reply(self, msg: Msg) -> None:
        entry = self._pending.get(msg.subject[len(self._reply_prefix) :])
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    async def _on_reply(self, msg: Msg) -> None:
        self._take_reply(msg)

    def _sweep(self) -> None:
        """Time out every request past its due time; re-arm for the next one.

        One timer for all requests in flight instead of one per request: while
        replies keep arriving it fires about once per ``timeout``.
        """
        self._sweeper = None
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_due = math.inf
        for fut, due in self._pending.values():
            if due <= now:
                if not fut.done():
                    fut.set_result(None)  # "no reply in time"
            elif due < next_due:
                next_due = due
        if next_due < math.inf:
            self._sweeper = loop.call_at(next_due, self._sweep)
            self._sweep_at = next_due

    def _expect(self, fut: asyncio.Future[Msg | None], wait: float) -> str:
        """Register ``fut`` for the reply to the token returned (``None`` after ``wait`` s)."""
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        due = loop.time() + wait
        self._pending[token] = (fut, due)
        if self._sweeper is None or due < self._sweep_at:
            if self._sweeper is not None:
                self._sweeper.cancel()
            self._sweeper = loop.call_at(due, self._sweep)
            self._sweep_at = due
        return token

    async def _request_once(self, subject: str, body: bytes, wait: float) -> Msg:
        """One request and its reply, over the client's reply subscription.

        Raises:
            nats.errors.TimeoutError: no reply within ``wait`` seconds.
            nats.errors.NoRespondersError: nobody is subscribed to ``subject``.
            nats.errors.Error: what ``publish`` raised (nothing was sent).
        """
        observer = self.observer
        started = time.perf_counter() if observer is not None else 0.0
        prefix = self._reply_prefix if self._reply_sub is not None else await self._subscribe_replies()
        fut: asyncio.Future[Msg | None] = asyncio.get_running_loop().create_future()
        headers = tracing.headers()
        if headers is not None and over_max_payload(self.nc, body, headers):
            raise nats.errors.MaxPayloadError  # (publish would send it, and the server close the connection)
        token = self._expect(fut, wait)
        try:
            await self.nc.publish(subject, body, reply=prefix + token, headers=headers)
            sent = time.perf_counter() if observer is not None else 0.0
            msg = await fut
        finally:
            self._pending.pop(token, None)
        if msg is None:
            raise nats.errors.TimeoutError
        if observer is not None:
            observer(subject, started, sent, time.perf_counter())
        headers = msg.headers
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg

    async def _request(
        self, subject: str, body: bytes, *, deadline: float | None = None, first: Msg | BaseException | None | _Unsent = UNSENT
    ) -> bytes:
        """Request with retries of unknown outcomes until the deadline.

        The retry policy of every log request: a transport failure (timeout,
        no responders, a closed or reconnecting connection) or an
        ``unavailable`` reply is retried, with the same body, after 0.05 s,
        0.1 s, ... up to 1 s apart, while the next attempt can still start
        before the deadline.  The first attempt runs outside the retry
        machinery: it is the hot path.  A caller that already sent ``body``
        once passes that attempt's reply as ``first`` (``None``: none came in
        time; an exception: what sending it raised), and only the retries run here.

        Raises:
            ConvlogError: the typed error the service replied with
                (``UnavailableError`` if it still said so at the deadline).
            TooLargeError: the request is over the server's max payload (not sent).
            UnavailableError: no reply before the deadline.
        """
        end = time.monotonic() + (self.deadline if deadline is None else deadline)
        try:
            if isinstance(first, _Unsent):
                return await self._attempt(subject, body, end)
            if isinstance(first, BaseException):
                raise first
            return self._outcome(first)
        except RETRY_ON as e:
            first: BaseException | None = e

        def stop(state: tenacity.RetryCallState) -> bool:
            # A closed connection never reopens (only close/drain, or running out
            # of reconnects, closes it), nor does a draining one: nothing to wait for.
            return self.nc.is_closed or self.nc.is_draining or time.monotonic() + _REQUEST_WAIT(state) >= end

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(RETRY_ON),
            wait=_REQUEST_WAIT,
            stop=stop,
            before_sleep=lambda state: raise_if_cancelled(),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first is not None:  # the failed first attempt, as tenacity's attempt 1
                        failed, first = first, None
                        raise failed
                    return await self._attempt(subject, body, end)
        except RETRYABLE as e:
            raise_if_cancelled()
            attempts = retrying.statistics.get("attempt_number", 1)
            why = type(e).__name__
            if isinstance(e, nats.errors.NoRespondersError):  # nothing subscribes: say what that means
                why += " (nothing subscribes to it: is the log service running?)"
            raise UnavailableError(f"no reply on {subject} after {attempts} attempts: {why}") from e
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    async def _attempt(self, subject: str, body: bytes, end: float) -> bytes:
        """One request: the reply's body, or the error it carries, raised."""
        remaining = end - time.monotonic()
        try:
            msg = await self._request_once(subject, body, max(0.05, min(self.timeout, remaining)))
        except nats.errors.MaxPayloadError as e:
            # Never sent, so the outcome is known; retrying cannot help.
            raise self.too_large(body) from e
        err = from_wire(msg.headers, msg.data)
        if err is None:
            return msg.data
        raise err

    def too_large(self, body: bytes) -> TooLargeError:
        """What a request over the server's max payload (never sent) is refused with."""
        return TooLargeError(
            f"request of {len(body)} bytes is over the server's max payload of "
            f"{self.nc.max_payload} bytes; send fewer or smaller items per request",
            limit=self.nc.max_payload,
        )

    @staticmethod
    def _outcome(msg: Msg | None) -> bytes:
        """A reply that came in (or ``None``: none in time) as :meth:`_attempt` reads it."""
        if msg is None:
            raise nats.errors.TimeoutError
        headers = msg.headers
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        err = from_wire(headers, msg.data)
        if err is None:
            return msg.data
        raise err
