"""``LogClient``: the async client every convlog program uses.

Outcomes over a network are sometimes *unknown*: a timeout, a reconnect or a
"no responders" says nothing about whether an append was committed.  The
client therefore gives every item an ``item_id`` before the first send and
retries with the same ids until the deadline; the log answers a retry of
something already committed with the original orders (``duplicate: true``),
so a retry never writes twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import tenacity
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy, Header

from . import nats_connect, tracing
from .codec import decode, encode
from .config import Settings
from .errors import BadRequestError, TooLargeError, UnavailableError, from_wire
from .failures import LOOP_BACKOFF, is_transient
from .history import visible
from .messages import (
    MAX_APPEND_ITEMS,
    AppendItem,
    AppendReply,
    AppendRequest,
    Envelope,
    ReadReply,
    ReadRequest,
    SessionInfo,
    SessionsReply,
    SessionsRequest,
    SignedHead,
    UserMessage,
)
from .nats_seam import bind, seam_for
from .signing import Signer, sign_item
from .subjects import Subjects, validate_session_id

__all__ = ["LogClient", "connect_options", "new_item_id"]

log = logging.getLogger("convlog.client")

_RETRYABLE = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)


# What a log request retries: an unknown outcome, or the service saying "later".
_RETRY_ON = (*_RETRYABLE, UnavailableError)
# Its waits: 0.05 s, doubling, at most 1 s (no jitter: the deadline check is exact).
_REQUEST_WAIT = tenacity.wait_exponential(multiplier=0.05, max=1.0)

# A "no responders" reply: an empty message whose inline status is 503
# (what nats-py's own ``Client.request`` checks).
_STATUS = Header.STATUS.value
_NO_RESPONDERS = "503"


async def _nats_error(e: Exception) -> None:
    # One line per event: nats-py's default prints a traceback for every failed
    # (re)connect attempt, which buries what matters during a server restart.
    log.warning("nats: %s: %s", type(e).__name__, e)


async def _nats_disconnected() -> None:
    # DEBUG: a client's own close() also lands here; services log at INFO themselves.
    log.debug("nats: disconnected")


async def _nats_reconnected() -> None:
    log.info("nats: reconnected")


def connect_options(settings: Settings, *, name: str) -> dict[str, Any]:
    """``nats.connect`` options shared by every convlog process.

    Short pings notice a frozen server within seconds (nats-py #671), and
    reconnects are unlimited: services and clients outlive server restarts.
    """
    return {
        "error_cb": _nats_error,
        "disconnected_cb": _nats_disconnected,
        "reconnected_cb": _nats_reconnected,
        "servers": [u.strip() for u in settings.nats_url.split(",")],
        "name": name,
        "connect_timeout": 2,
        "reconnect_time_wait": 0.25,
        "max_reconnect_attempts": -1,
        "ping_interval": 3,
        "max_outstanding_pings": 2,
        **settings.nats_options(),
    }


def new_item_id() -> str:
    """A fresh idempotency key: a UUIDv7 (RFC 9562), as 32 hex digits.

    Time-ordered: its first 48 bits are the Unix time in milliseconds, the
    rest random.  Ids minted together sort together, so the store's unique
    index on ``(item_id, session_id)`` grows at one end instead of taking a
    random page per item, which keeps each group commit's WAL write small.
    Built from ``os.urandom`` directly (``uuid`` costs several times more).
    """
    b = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10))
    b[6] = (b[6] & 0x0F) | 0x70  # version 7
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 9562 variant
    return b.hex()


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that an awaited library call swallowed.

    On Python 3.11 ``asyncio.wait_for`` (under nats-py's ``request`` and
    ``next_msg``) returns the result instead of raising when the cancel and the
    result land in the same loop tick; the task stays marked ``cancelling()``.
    Loops that would otherwise run on (a follower, a retry) must check.
    (:meth:`LogClient._request_once` awaits its future directly, so a cancel
    always raises there; the check stays for everything else.)
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _as_items(items: Iterable[AppendItem | Mapping[str, Any]]) -> list[AppendItem]:
    """Validate items and give every item without an id a fresh one.

    A dict is converted as is (no copy); a minted id is set on the converted
    Struct afterwards, so only ids a caller supplied go through the ``ItemId``
    pattern (minted ones match it by construction).

    Raises:
        BadRequestError: an item has the wrong shape, an unknown field or a bad value.
    """
    out: list[AppendItem] = []
    for item in items:
        if not isinstance(item, AppendItem):
            try:
                item = _convert(item if type(item) is dict else dict(item), AppendItem)
            except msgspec.ValidationError as e:
                raise BadRequestError(f"invalid item: {e}") from e
        if item.item_id is None:
            item = _replace(item, item_id=new_item_id())
        out.append(item)
    return out


_convert = msgspec.convert
_replace = msgspec.structs.replace


class LogClient:
    """Talk to the log service over NATS.

    Args:
        nc: a connected nats-py client (not closed by :meth:`close` unless the
            client was made by :meth:`connect`).
        prefix: subject prefix.
        timeout: seconds one request waits for its reply.
        deadline: seconds an operation keeps retrying unknown outcomes.
        signer: this writer's private key; when set, every item it appends (and
            every user message it sends) is signed (:mod:`shared.signing`).
    """

    def __init__(
        self, nc: Client, *, prefix: str = "convlog", timeout: float = 5.0, deadline: float = 30.0,
        signer: Signer | None = None,
    ) -> None:
        self.nc = nc
        self.signer = signer
        self.subjects = Subjects(prefix)
        self.timeout = timeout
        self.deadline = deadline
        self._owns_nc = False
        # Request multiplexer: one wildcard reply subscription (made on the
        # first request), one future per request in flight, keyed by token.
        self._reply_sub: Subscription | None = None
        self._reply_prefix = ""
        self._reply_lock = asyncio.Lock()
        self._pending: dict[str, tuple[asyncio.Future[Msg | None], float]] = {}
        self._tokens = itertools.count(1)
        self._sweeper: asyncio.TimerHandle | None = None  # times out requests in flight
        self._sweep_at = 0.0

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        name: str = "convlog-client",
        **options: Any,
    ) -> LogClient:
        """Connect to NATS and return a client that owns the connection."""
        settings = settings or Settings()
        if url is not None:
            settings = dataclasses.replace(settings, nats_url=url)
        nc = await nats_connect.connect(settings, {**connect_options(settings, name=name), **options})
        bind(nc, settings.nats_seam)
        client = cls(nc, prefix=settings.prefix, timeout=settings.request_timeout,
                     signer=Signer.load(settings.signing_key) if settings.signing_key else None)
        client._owns_nc = True
        return client

    async def close(self) -> None:
        """Drain the connection if this client made it; else drop only its reply subscription."""
        sub, self._reply_sub = self._reply_sub, None
        if self._owns_nc:
            if not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self.nc.drain()
        elif sub is not None and not self.nc.is_closed:
            # The connection is someone else's: take back only our reply subscription.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def __aenter__(self) -> LogClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------
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

    async def _request_once(self, subject: str, body: bytes, wait: float) -> Msg:
        """One request and its reply, over the client's reply subscription.

        Raises:
            nats.errors.TimeoutError: no reply within ``wait`` seconds.
            nats.errors.NoRespondersError: nobody is subscribed to ``subject``.
            nats.errors.Error: what ``publish`` raised (nothing was sent).
        """
        prefix = self._reply_prefix if self._reply_sub is not None else await self._subscribe_replies()
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Msg | None] = loop.create_future()
        due = loop.time() + wait
        pending = self._pending
        pending[token] = (fut, due)
        if self._sweeper is None or due < self._sweep_at:
            if self._sweeper is not None:
                self._sweeper.cancel()
            self._sweeper = loop.call_at(due, self._sweep)
            self._sweep_at = due
        try:
            await self.nc.publish(subject, body, reply=prefix + token, headers=tracing.headers())
            msg = await fut
        finally:
            pending.pop(token, None)
        if msg is None:
            raise nats.errors.TimeoutError
        headers = msg.headers
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg

    async def _request(self, subject: str, body: bytes, *, deadline: float | None = None) -> bytes:
        """Request with retries of unknown outcomes until the deadline.

        The retry policy of every log request: a transport failure (timeout,
        no responders, a closed or reconnecting connection) or an
        ``unavailable`` reply is retried, with the same body, after 0.05 s,
        0.1 s, ... up to 1 s apart, while the next attempt can still start
        before the deadline.  The first attempt runs outside the retry
        machinery: it is the hot path.

        Raises:
            ConvlogError: the typed error the service replied with
                (``UnavailableError`` if it still said so at the deadline).
            TooLargeError: the request is over the server's max payload (not sent).
            UnavailableError: no reply before the deadline.
        """
        end = time.monotonic() + (self.deadline if deadline is None else deadline)
        try:
            return await self._attempt(subject, body, end)
        except _RETRY_ON as e:
            first: BaseException | None = e

        def stop(state: tenacity.RetryCallState) -> bool:
            return time.monotonic() + _REQUEST_WAIT(state) >= end

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(_RETRY_ON),
            wait=_REQUEST_WAIT,
            stop=stop,
            before_sleep=lambda state: _raise_if_cancelled(),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first is not None:  # the failed first attempt, as tenacity's attempt 1
                        failed, first = first, None
                        raise failed
                    return await self._attempt(subject, body, end)
        except _RETRYABLE as e:
            _raise_if_cancelled()
            attempts = retrying.statistics.get("attempt_number", 1)
            raise UnavailableError(
                f"no reply on {subject} after {attempts} attempts: {type(e).__name__}"
            ) from e
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    async def _attempt(self, subject: str, body: bytes, end: float) -> bytes:
        """One request: the reply's body, or the error it carries, raised."""
        remaining = end - time.monotonic()
        try:
            msg = await self._request_once(subject, body, max(0.05, min(self.timeout, remaining)))
        except nats.errors.MaxPayloadError as e:
            # Never sent, so the outcome is known; retrying cannot help.
            raise TooLargeError(
                f"request of {len(body)} bytes is over the server's max payload of "
                f"{self.nc.max_payload} bytes; send fewer or smaller items per request"
            ) from e
        err = from_wire(msg.headers, msg.data)
        if err is None:
            return msg.data
        raise err

    # -- writes ----------------------------------------------------------
    async def append(
        self,
        session_id: str,
        items: Iterable[AppendItem | Mapping[str, Any]],
        *,
        expected_last: int | None = None,
    ) -> AppendReply:
        """Append items atomically; safe to call again with the same ids.

        Args:
            session_id: the session.
            items: ``AppendItem`` or dicts with ``agent``, ``data`` and optional
                ``kind`` and ``item_id``; missing ids are minted once, here.
            expected_last: append only if the session's last order equals it.

        Raises:
            InvalidSessionIdError: before anything is sent.
            ConflictError: ``expected_last`` did not match (``.last_order``).
            BadRequestError, TooLargeError: the request was refused.
            UnavailableError: no answer before the deadline (outcome unknown;
                calling again with the same items is safe).
        """
        subject = self.subjects.append(session_id)
        req = AppendRequest(items=_as_items(items), expected_last=expected_last)
        if self.signer is not None:  # signed once: a retry resends the same bytes
            validate_session_id(session_id)
            req = AppendRequest(items=self.signer.sign_items(session_id, req.items), expected_last=expected_last)
        if not req.items:
            raise BadRequestError("append needs at least one item")
        if len(req.items) > MAX_APPEND_ITEMS:  # the service would refuse it: do not send it
            raise TooLargeError(
                f"{len(req.items)} items in one append, over the limit of {MAX_APPEND_ITEMS} "
                "items per request; send them in several appends",
                limit=MAX_APPEND_ITEMS,
            )
        return decode(await tracing.traced("convlog.append", None, self._request(subject, encode(req)),
                                           kind="CLIENT", session_id=session_id), AppendReply)

    async def send(
        self, session_id: str, content: str, *, to: str | None = None, item_id: str | None = None
    ) -> AppendReply:
        """Publish a user message (with a reply: the append ack)."""
        subject = self.subjects.inbound(session_id)
        msg = UserMessage(content=content, item_id=item_id or new_item_id(), to=to)
        if self.signer is not None:  # signed as the item it becomes (shared.signing)
            validate_session_id(session_id)
            item = sign_item(self.signer, session_id, AppendItem(
                agent="user", data={"role": "user", "content": content}, item_id=msg.item_id))
            msg = msgspec.structs.replace(msg, sig=item.sig, key_id=item.key_id)
        return decode(await tracing.traced("convlog.send", None, self._request(subject, encode(msg)),
                                           kind="PRODUCER", session_id=session_id), AppendReply)

    # -- reads -----------------------------------------------------------
    async def read(
        self,
        session_id: str,
        *,
        after: int | None = None,
        limit: int | None = None,
        tail: int | None = None,
        raw: bool = False,
        head: bool = False,
    ) -> ReadReply:
        """One page: forward from ``after`` or the last ``tail`` visible items
        (with ``head``, also the session's head signed by the log service)."""
        subject = self.subjects.read(session_id)
        req = ReadRequest(after=after, limit=limit, tail=tail, raw=raw, head=head)
        return decode(await self._request(subject, encode(req)), ReadReply)

    async def tail(self, session_id: str, n: int) -> list[Envelope]:
        """The last ``n`` visible items, oldest first (the SDK's ``get_items(limit=n)``)."""
        return (await self.read(session_id, tail=n)).items

    async def iter_items(
        self, session_id: str, *, after: int = 0, raw: bool = True, page: int | None = None
    ) -> AsyncIterator[Envelope]:
        """Every envelope (or visible item, when not ``raw``) after ``after``, paging forward."""
        while True:
            rep = await self.read(session_id, after=after, limit=page, raw=raw)
            for env in rep.items:
                yield env
            if not rep.items or not rep.more:
                return
            after = rep.items[-1].item_order

    async def items(self, session_id: str, *, raw: bool = True) -> list[Envelope]:
        """The whole session (every envelope by default)."""
        return [e async for e in self.iter_items(session_id, raw=raw)]

    async def visible(self, session_id: str) -> list[Envelope]:
        """The whole visible history."""
        return visible(await self.items(session_id, raw=True))

    async def signed_head(self, session_id: str) -> SignedHead | None:
        """The session's current head signed by the log service, or ``None``
        when the service has no signing key."""
        return (await self.read(session_id, tail=0, head=True)).head

    async def last_order(self, session_id: str) -> int:
        return (await self.read(session_id, tail=0)).last_order

    async def sessions(self, *, after: str | None = None, limit: int | None = None) -> SessionsReply:
        req = SessionsRequest(after=after, limit=limit)
        return decode(await self._request(self.subjects.sessions, encode(req)), SessionsReply)

    async def iter_sessions(self) -> AsyncIterator[SessionInfo]:
        after: str | None = None
        while True:
            rep = await self.sessions(after=after)
            for s in rep.sessions:
                yield s
            if not rep.sessions or not rep.more:
                return
            after = rep.sessions[-1].session_id

    # -- live ------------------------------------------------------------
    async def follow(
        self, session_id: str, *, after: int = 0, idle_check: float = 2.0
    ) -> AsyncIterator[Envelope]:
        """Yield every envelope with ``item_order > after``, in order, forever.

        Live items come from ``<prefix>.items.<sid>`` through a JetStream
        consumer (never a core subscription on a captured subject, nats-py
        #678); history and any gap come from the log service.  The follower
        tracks the last order it yielded and after any gap, reconnect, server
        restart or a consumer that went quiet while the log grew (nats-py
        #504/#510) it fills the gap from the log and resubscribes, so nothing
        is skipped or repeated.
        """
        validate_session_id(session_id)
        last = after
        js = self.nc.jetstream()
        subject = self.subjects.items(session_id)
        failures = 0
        while True:
            _raise_if_cancelled()
            sub = None
            try:
                async for env in self.iter_items(session_id, after=last):
                    last = env.item_order
                    failures = 0
                    yield env
                sub = await js.subscribe(
                    subject,
                    ordered_consumer=True,
                    idle_heartbeat=max(idle_check, 1.0),
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT),
                )
                while True:
                    _raise_if_cancelled()
                    try:
                        msg = await sub.next_msg(timeout=idle_check)
                    except (TimeoutError, nats.errors.TimeoutError):
                        if await self.last_order(session_id) > last:
                            break  # the consumer fell behind the log: refill, resubscribe
                        continue
                    env = decode(msg.data, Envelope)
                    if env.item_order <= last:
                        continue
                    if env.item_order > last + 1:
                        async for gap in self.iter_items(session_id, after=last):
                            if gap.item_order > env.item_order:
                                break
                            last = gap.item_order
                            yield gap
                        continue
                    last = env.item_order
                    failures = 0
                    yield env
            except Exception as e:
                # Transient failures, and JetStream refusals a fresh subscription
                # may not meet (a restart, a consumer gone), are waited out; any
                # other error (the log refusing the read, a bug) is the caller's.
                if not (is_transient(e) or isinstance(e, nats.js.errors.Error)):
                    raise
                delay = LOOP_BACKOFF.delay(failures)
                failures += 1
                log.info("follow %s: %s; resuming after %d in %.2gs",
                         session_id, type(e).__name__, last, delay)
                await asyncio.sleep(delay)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
