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
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client

from . import nats_connect, tracing
from .codec import check_json, decode, encode, json_ok, unencodable
from .config import Settings
from .errors import BadRequestError, ForbiddenError, TooLargeError
from .failures import CONFLICT_BACKOFF, refused_publish
from .follow import follow
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
from .nats_seam import bind
from .requester import Requester
from .signed_appends import SignedAppends
from .signing import KeyFile, Signer, route_signing_input, sign_item
from .subjects import Subjects, validate_session_id

__all__ = ["LogClient", "Unreadable", "connect_options", "new_item_id"]

log = logging.getLogger("convlog.client")

#: How long an audit reads on for items a signed head covers but the first read did not
#: return (:meth:`LogClient.audit_items_through`): a replica that trails the leader
#: catches up within milliseconds; a log that lost its tail, never.
TRAILING_WAIT_S = 1.0


#: The failures of a (re)connect attempt to a server that is down or unreachable.
_CANNOT_REACH = (OSError, TimeoutError, nats.errors.UnexpectedEOF, nats.errors.StaleConnectionError,
                 nats.errors.NoServersError)


class _NatsErrors:
    """nats-py's error callback for one connection: one line per event (nats-py's
    default prints a traceback for every failed (re)connect attempt, which buries
    what matters during a server restart).

    While NATS is down nats-py reports every reconnect attempt, one each
    ``reconnect_time_wait`` (0.25 s): said each time at WARNING, a ``convlog tail``
    printed four lines a second between the session's items, and a service's log
    grew by as many for as long as the outage lasted.  A failure to reach the
    server of the same kind as the last one is said at DEBUG, and at WARNING
    again once ``REPEAT_S`` have passed (with how many were not said), so a long
    outage is still seen.  Any other error (a refusal, a permissions violation)
    is said each time.
    """

    REPEAT_S = 30.0

    def __init__(self) -> None:
        self._kind: type[BaseException] | None = None
        self._said = 0.0  # when the last WARNING was
        self._unsaid = 0  # failures of that kind since, said at DEBUG

    async def report(self, e: Exception) -> None:
        """The callback (a bound coroutine function: nats-py refuses any other kind)."""
        if not isinstance(e, _CANNOT_REACH):  # a refusal, a permissions violation: each its own
            log.warning("nats: %s: %s", type(e).__name__, e)
            return
        now = time.monotonic()
        if type(e) is self._kind and now - self._said < self.REPEAT_S:
            self._unsaid += 1
            log.debug("nats: %s: %s", type(e).__name__, e)
            return
        again = f" (and {self._unsaid} more like it since the last said)" if self._unsaid else ""
        self._kind, self._said, self._unsaid = type(e), now, 0
        log.warning("nats: %s: %s%s", type(e).__name__, e, again)


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
        "error_cb": _NatsErrors().report,
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


def _as_items(items: Iterable[AppendItem | Mapping[str, Any]]) -> list[AppendItem]:
    """Validate items and give every item without an id a fresh one.

    A dict is converted as is (no copy); a minted id is set on the converted
    Struct afterwards, so only ids a caller supplied go through the ``ItemId``
    pattern (minted ones match it by construction).

    Raises:
        BadRequestError: an item has the wrong shape, an unknown field or a bad
            value, or a number the hash chain cannot hold (non-finite, or an
            integer beyond +/-(2**53-1)), or data nested deeper than
            :data:`~shared.codec.MAX_DEPTH`.
    """
    out: list[AppendItem] = []
    for item in items:
        if not isinstance(item, AppendItem):
            if type(item) is not dict and not isinstance(item, Mapping):  # dict() made no sense of it
                raise BadRequestError(f"invalid item: $.items[{len(out)}] is a {type(item).__name__}, "
                                      "not an object (a mapping or an AppendItem)")
            try:
                item = _convert(item if type(item) is dict else dict(item), AppendItem)
            except msgspec.ValidationError as e:
                raise BadRequestError(f"invalid item: {e}") from e
        if not json_ok(item.data):  # msgspec would send NaN and Infinity as null
            check_json(item.data, f"$.items[{len(out)}].data")
        if item.item_id is None:
            item = _replace(item, item_id=new_item_id())
        out.append(item)
    return out


def _encode(msg: Any) -> bytes:
    """``encode``; what has no JSON form is refused.

    Raises:
        BadRequestError: a string holds a lone surrogate (no UTF-8), or a value
            or object key JSON has no form for, named with its path.
    """
    try:
        return encode(msg)
    except (UnicodeEncodeError, TypeError) as e:
        raise unencodable(msg, "$", e) from e


_convert = msgspec.convert
_replace = msgspec.structs.replace



@dataclasses.dataclass(frozen=True)
class Unreadable:
    """A stored envelope the log served that does not decode (a log file edited by
    hand), met by :meth:`LogClient.audit_items` where ``item_order`` is stored."""

    item_order: int
    error: str


def _unwanted(task: asyncio.Task[Any]) -> None:
    """Retrieve a dropped read-ahead's outcome (so asyncio does not log it)."""
    if not task.cancelled():
        task.exception()

class LogClient(Requester):
    """Talk to the log service over NATS (requests and retries: :class:`~shared.requester.Requester`).

    Args:
        nc: a connected nats-py client (not closed by :meth:`close` unless the
            client was made by :meth:`connect`).
        prefix: subject prefix.
        timeout: seconds one request waits for its reply.
        deadline: seconds an operation keeps retrying unknown outcomes.
        signer: this writer's private key; when set, every item it appends (and
            every user message it sends) is signed (:mod:`shared.signing`).  The
            appends started in the same event-loop turn share one batch signature
            (:mod:`shared.signed_appends`).
    """

    def __init__(
        self, nc: Client, *, prefix: str = "convlog", timeout: float = 5.0, deadline: float = 30.0,
        signer: Signer | None = None,
    ) -> None:
        super().__init__(nc, timeout=timeout, deadline=deadline)
        self.signer = signer
        self._signed_appends = SignedAppends(self)
        self.subjects = Subjects(prefix)
        self._owns_nc = False
        #: Set once the server refused this connection a JetStream API request
        #: (a NATS user that may only send and read, e.g. the gateway of
        #: ``nats-users.conf``): :meth:`follow` then polls the log instead of
        #: waiting out a consumer it cannot create.  Only a connection this
        #: client made (:meth:`connect`) reports it.
        self.consumers_denied = asyncio.Event()

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
        denied = asyncio.Event()
        opts = {**connect_options(settings, name=name), **options}
        error_cb = opts["error_cb"]

        async def on_error(e: Exception) -> None:
            if (refused := refused_publish(e)) is not None and refused.startswith("$js.api."):
                denied.set()
                if isinstance(getattr(error_cb, "__self__", None), _NatsErrors):
                    # Expected of a user that may only send and read (the `client` role, the
                    # gateway): the caller goes on without (follow reads the log, and says so).
                    log.debug("nats: %s: %s", type(e).__name__, e)
                    return
            await error_cb(e)

        nc = await nats_connect.connect(settings, {**opts, "error_cb": on_error})
        bind(nc, settings.nats_seam)
        client = cls(nc, prefix=settings.prefix, timeout=settings.request_timeout,
                     signer=KeyFile(settings.signing_key) if settings.signing_key else None)
        client._owns_nc = True
        client.consumers_denied = denied
        return client

    async def close(self) -> None:
        """Drain the connection if this client made it; else drop only its reply subscription."""
        sub, self._reply_sub = self._reply_sub, None
        if self._owns_nc:
            if not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self.nc.drain()
            if not self.nc.is_closed:  # drain refused (NATS away, reconnecting): close without it
                with contextlib.suppress(Exception):
                    await self.nc.close()
            for fut, _ in list(self._pending.values()):  # requests in flight: no reply can come now
                if not fut.done():
                    fut.set_result(None)
        elif sub is not None and not self.nc.is_closed:
            # The connection is someone else's: take back only our reply subscription.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def __aenter__(self) -> LogClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
                calling again is safe for items that carry their ``item_id``:
                an id minted here for an item without one is new at every
                call, so give items ids when a retry must not write them twice).
        """
        subject = self.subjects.append(session_id)
        req = AppendRequest(items=_as_items(items), expected_last=expected_last)
        if not req.items:
            raise BadRequestError("append needs at least one item")
        if len(req.items) > MAX_APPEND_ITEMS:  # the service would refuse it: do not send it
            raise TooLargeError(
                f"{len(req.items)} items in one append, over the limit of {MAX_APPEND_ITEMS} "
                "items per request; send them in several appends",
                limit=MAX_APPEND_ITEMS,
            )
        if self.signer is not None:  # signed once: a retry resends the same bytes
            validate_session_id(session_id)
            sending = self._signed_append(subject, session_id, req.items, expected_last)
        else:
            sending = self._request(subject, _encode(req))
        return decode(await tracing.traced("convlog.append", None, sending, kind="CLIENT", session_id=session_id),
                      AppendReply)

    async def _signed_append(self, subject: str, sid: str, items: list[AppendItem],
                             expected_last: int | None) -> bytes:
        key_id = self.signer.key_id if self.signer is not None else None
        return await self._again_if_renewed(
            key_id, lambda: self._signed_appends.append(subject, sid, items, expected_last))

    async def _again_if_renewed(self, key_id: str | None, send: Callable[[], Awaitable[bytes]]) -> bytes:
        """``send()``, which signs with this client's key.  Refused (nothing written) for
        a key its file has replaced since (`convlog keys rotate`, which the log service
        may see before this client's next look): ``send()`` once more, signed with it."""
        try:
            return await send()
        except ForbiddenError:
            if self.signer is None or not self.signer.renewed(key_id):
                raise
            return await send()

    async def send(
        self, session_id: str, content: str, *, to: str | None = None, item_id: str | None = None
    ) -> AppendReply:
        """Publish a user message (with a reply: the append ack).

        Raises:
            BadRequestError: ``content`` or ``to`` is not text, or holds a lone
                surrogate (nothing is sent); or the log service refused it.
        """
        subject = self.subjects.inbound(session_id)
        for name, value in (("content", content), ("to", to)):
            if value is not None and not isinstance(value, str):  # JSON would send bytes as base64 text
                raise BadRequestError(f"invalid message: {name} must be a str, not {type(value).__name__}")
        msg = UserMessage(content=content, item_id=item_id or new_item_id(), to=to)

        def signed(signer: Signer) -> bytes:  # signed as the item it becomes
            signer = signer.current()  # one key for both signatures (shared.signing)
            try:
                item = sign_item(signer, session_id, AppendItem(
                    agent="user", data={"role": "user", "content": content}, item_id=msg.item_id))
                to_sig = signer.sign(route_signing_input(session_id, msg.item_id, to)) if to else None
            except (UnicodeEncodeError, TypeError) as e:  # no JSON form: refused as unsigned
                raise unencodable(msg, "$", e) from e
            return encode(msgspec.structs.replace(msg, sig=item.sig, key_id=item.key_id, to_sig=to_sig))

        async def sending() -> bytes:
            if self.signer is None:
                return await self._request(subject, _encode(msg))
            validate_session_id(session_id)
            signer = self.signer
            return await self._again_if_renewed(signer.current().key_id,
                                                lambda: self._request(subject, signed(signer)))

        return decode(await tracing.traced("convlog.send", None, sending(),
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
        return decode(await self._read_reply(session_id, after=after, limit=limit, tail=tail, raw=raw, head=head),
                      ReadReply)

    async def _read_reply(self, session_id: str, **request: Any) -> bytes:
        return await self._request(self.subjects.read(session_id), encode(ReadRequest(**request)))

    async def tail(self, session_id: str, n: int) -> list[Envelope]:
        """The last ``n`` visible items, oldest first (the SDK's ``get_items(limit=n)``)."""
        return (await self.read(session_id, tail=n)).items

    async def iter_items(
        self, session_id: str, *, after: int = 0, raw: bool = True, page: int | None = None
    ) -> AsyncIterator[Envelope]:
        """Every envelope (or visible item, when not ``raw``) after ``after``, paging forward.

        Not ``raw``, each page is visible as of the moment it is read (a ``retract``
        or ``clear`` between two pages is not applied to the first); :meth:`items`
        folds one history from the raw pages.

        The next page is requested as soon as a page with ``more`` arrives, so
        the log service reads it while this one is consumed (at most one page
        ahead; dropped if the caller stops early).  A page read ahead that
        says there is no more was asked for before the caller was done with
        the page before it, so one more read, sent after, decides the end: an
        item the caller appended meanwhile is still yielded, as without
        reading ahead.
        """
        ahead: asyncio.Task[ReadReply] | None = None
        early = False  # rep was read ahead
        try:
            rep = await self.read(session_id, after=after, limit=page, raw=raw)
            while True:
                if rep.items:
                    after = rep.items[-1].item_order
                if rep.items and rep.more:
                    ahead = asyncio.ensure_future(self.read(session_id, after=after, limit=page, raw=raw))
                for env in rep.items:
                    yield env
                if ahead is not None:
                    rep, ahead, early = await ahead, None, True
                elif early:
                    rep, early = await self.read(session_id, after=after, limit=page, raw=raw), False
                else:
                    return
        finally:
            if ahead is not None:  # the caller stopped early: nobody wants that page
                ahead.cancel()
                ahead.add_done_callback(_unwanted)

    async def audit_items(
        self, session_id: str, *, after: int = 0, page: int | None = None
    ) -> AsyncIterator[Envelope | Unreadable]:
        """Every envelope after ``after``, as :meth:`iter_items` (``raw``) pages them, for
        an audit: a stored envelope that does not decode comes out as :class:`Unreadable`
        and the envelopes after it follow.  The log splices stored envelopes into its
        reply unchecked, so such an envelope spoils its whole page; that page (only)
        is read again one item at a time, up to the item that does not decode.  An
        envelope that states an order not past the one before it (one copied to a
        later row) is yielded where it is stored, and the reading goes on after its
        row: paging on from the order it states read the same rows again, for ever
        when it ended a page."""
        while True:
            try:
                async with contextlib.aclosing(self.iter_items(session_id, after=after, raw=True, page=page)) as envs:
                    async for env in envs:
                        if env.item_order <= after:  # copied to a later row: read it where it is
                            break
                        yield env
                        after = env.item_order
                    else:
                        return
            except BadRequestError:
                # The log refused the read (raised again below), or its reply does not decode.
                pass
            while True:
                reply = await self._read_reply(session_id, after=after, limit=1, raw=True)
                try:
                    one = decode(reply, ReadReply)
                except BadRequestError as e:
                    after = await self._past(session_id, after, reply)
                    yield Unreadable(after, e.message)
                    break
                if not one.items:
                    return
                yield one.items[0]
                if one.items[0].item_order <= after:  # not its row's order: page on after its row
                    after = await self._past(session_id, after, reply)
                    break
                after = one.items[0].item_order

    async def audit_items_through(
        self, session_id: str, through: int, *, after: int = 0, page: int | None = None,
        done: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[Envelope | Unreadable]:
        """:meth:`audit_items`, read on until item ``through`` (a signed head's order,
        read before the items) has come, for up to :data:`TRAILING_WAIT_S`.

        On an R3 JetStream log a follower that trails the leader (by milliseconds) may
        answer the item reads after the head was read from the leader: the items then
        end before the head, which is no truncation.  They are read on from the last one
        a moment; still short, the caller's check of the head calls the log truncated.
        ``done()`` true (the audit has already failed) stops the waiting."""
        attempt = 0
        give_up: float | None = None
        while True:
            async for env in self.audit_items(session_id, after=after, page=page):
                after = max(after, env.item_order)
                yield env
            if after >= through or done():
                return
            wait = CONFLICT_BACKOFF.delay(attempt)
            give_up = give_up or time.monotonic() + TRAILING_WAIT_S
            if time.monotonic() + wait > give_up:
                return
            await asyncio.sleep(wait)
            attempt += 1

    async def _past(self, session_id: str, after: int, reply: bytes) -> int:
        """The ``item_order`` of the stored item that the one-item ``reply`` to a read
        after ``after`` holds: the least read after which the log answers otherwise
        (``after + 1`` unless its order column was edited too; galloping, then halving)."""
        lo, step = after, 1
        while await self._read_reply(session_id, after=lo + step, limit=1, raw=True) == reply:
            lo, step = lo + step, step * 2
        hi = lo + step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if await self._read_reply(session_id, after=mid, limit=1, raw=True) == reply:
                lo = mid
            else:
                hi = mid
        return hi

    async def items(self, session_id: str, *, raw: bool = True) -> list[Envelope]:
        """The whole session (every envelope by default; the visible history when not ``raw``).

        The visible history is folded here from the raw pages, which never change:
        visible pages read at different moments would mix two histories when a
        ``retract`` or ``clear`` lands between them.
        """
        envs = [e async for e in self.iter_items(session_id, raw=True)]
        return envs if raw else visible(envs)

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
    def follow(
        self, session_id: str, *, after: int = 0, idle_check: float = 2.0, wait_out: bool = True
    ) -> AsyncIterator[Envelope]:
        """Yield every envelope with ``item_order > after``, in order, forever.

        Live items come through a JetStream consumer, history and gaps from
        the log; nothing is skipped or repeated (see :mod:`shared.follow`).
        ``wait_out=False``: a log service that does not answer until the
        deadline raises ``UnavailableError`` (else it is waited for).
        """
        return follow(self, session_id, after=after, idle_check=idle_check, wait_out=wait_out)
