"""One function per endpoint: decode -> store -> encode.

Errors are mapped to the wire here and only here: a :class:`ConvlogError`
becomes its code; anything else is logged and answered ``unavailable`` with a
generic message (never ``repr(exc)`` on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from services.logfmt import context
from shared.client import new_item_id
from shared.codec import check_json, decode, json_ok
from shared.errors import BadRequestError, ConvlogError, TooLargeError, UnavailableError, to_wire
from shared.messages import (
    MAX_APPEND_ITEMS,
    AppendedItem,
    AppendItem,
    AppendReply,
    AppendRequest,
    ReadRequest,
    SessionsReply,
    SessionsRequest,
    UserMessage,
)
from shared.routing import EntryProof
from shared.signing import Signer
from shared.subjects import Subjects
from shared.work import NO_TURN_PREFIX, starts_no_turn

from .authorize import Authorizer, signed_head
from .readahead import ReadAhead
from .store.base import LogStore, StoreClosedError

__all__ = ["CLOSED", "Handlers", "Reply", "ack_size_bound", "encode_outcome", "error_reply"]

log = logging.getLogger("convlog.log.handlers")

DEFAULT_READ_LIMIT = 10_000
DEFAULT_SESSIONS_LIMIT = 1_000
# JSON framing of a read reply around its items: {"session_id":...,"items":[...],...}
_REPLY_OVERHEAD = 512
# A signed head in a read reply: ,"head":{session_id (128), item_order, hash, signed_at, key_id, sig}
_HEAD_RESERVE = 1024

Reply = tuple[bytes, dict[str, str] | None]
EntryHint = Callable[[str, str, EntryProof | None], Awaitable[None]]

_encode = msgspec.json.Encoder().encode

# The largest ack an append of n items can get: its framing with the longest
# session id and orders, plus per item the longest order, a hash, the comma
# and the item's own id.  The ack must fit the server's max payload, or the
# items would be committed and their writer never told.
_MAX_ORDER = 2**53 - 1
_ACK_FRAME = len(_encode(AppendReply(
    session_id="s" * 128, first_order=_MAX_ORDER, last_order=_MAX_ORDER, items=[]
)))
_ACK_PER_ITEM = len(_encode(AppendedItem(
    item_order=_MAX_ORDER, item_id="", hash="0" * 64, duplicate=False
))) + 1
_MAX_ITEM_ID = 200  # shared.messages.ItemId
# An envelope and its outbox headers beyond its data, at most: session id (128) three
# times, item id (200), agent (128 chars, up to 512 bytes), hash, created_at, order,
# sig and key_id, the JSON framing, and the Nats-Msg-Id / expected-last / traceparent headers.
_ENVELOPE_OVERHEAD = 4096


class _Order(msgspec.Struct):
    item_order: int


def _order_of(envelope: bytes) -> int | None:
    """The ``item_order`` of a stored envelope (None: it does not decode)."""
    try:
        return msgspec.json.decode(envelope, type=_Order).item_order
    except msgspec.DecodeError:
        return None


def ack_size_bound(item_ids: list[str]) -> int:
    """Bytes the ack of an append with these item ids can take at most."""
    return _ACK_FRAME + len(item_ids) * _ACK_PER_ITEM + sum(map(len, item_ids))


#: The refusal of a request the store can no longer take: the service is stopping, or
#: the store failed (its committer's CRITICAL line names the cause, a full disk say).
CLOSED = "the store is closed; the request was not applied"


def error_reply(e: BaseException, subject: str) -> Reply:
    """The wire reply for a failure: its code, or a generic ``unavailable``."""
    if isinstance(e, StoreClosedError):  # not a bug of the service: said as what it is
        e = UnavailableError(CLOSED)
    if isinstance(e, ConvlogError):
        headers, payload = to_wire(e)
        return payload, headers
    log.error("unexpected error handling %s", subject[:200], exc_info=e,
              extra=context(session_id=subject.rpartition(".")[2][:128] if subject.count(".") >= 2 else None))
    headers, payload = to_wire(UnavailableError("internal error; the request was not applied"))
    return payload, headers


def encode_outcome(out: AppendReply | ConvlogError) -> Reply:
    """An append's reply, or its error, as wire payload and headers."""
    if isinstance(out, AppendReply):
        return _encode(out), None
    headers, payload = to_wire(out)
    return payload, headers


@dataclass
class Handlers:
    """The log service's endpoint logic, independent of NATS plumbing.

    Args:
        store: the log store.
        subjects: subject names for the configured prefix.
        max_item_bytes: largest encoded ``data`` of one item.
        max_payload: the server's max payload; read and sessions pages stay
            under it, and an append whose ack could not is refused ``too_large``.
        current_max_payload: the connection's max payload now, used instead of
            ``max_payload`` (a reconnect may reach a server with a smaller one).
        entry_hint: called with (session_id, agent) when a user message with
            ``to`` starts a new session (records the entry agent as routing
            metadata, outside the log).
        read_ahead: serves forward reads, reading the next page ahead (see
            :mod:`.readahead`); None: straight from the store.
    """

    store: LogStore
    subjects: Subjects
    max_item_bytes: int = 256 * 1024
    max_payload: int = 1024 * 1024
    entry_hint: EntryHint | None = None
    authorize: Authorizer | None = None  # signature checks (None: unsigned, as before)
    head_signer: Signer | None = None  # the log service's key: signs session heads on request
    read_ahead: ReadAhead | None = None  # forward pages: the next one read while this one travels
    current_max_payload: Callable[[], int] | None = None
    # per session, the user message last come that may not have reached the store yet
    _arriving: dict[str, asyncio.Future[None]] = field(default_factory=dict, init=False, repr=False)

    def _max_payload(self) -> int:
        return self.current_max_payload() if self.current_max_payload is not None else self.max_payload

    async def guarded(self, fn: Callable[[str, bytes], Awaitable[bytes]], subject: str, body: bytes) -> Reply:
        """Run one endpoint, turning every failure into an error reply."""
        try:
            return await fn(subject, body), None
        except Exception as e:
            return error_reply(e, subject)

    # -- endpoints -------------------------------------------------------
    def parse_append(self, subject: str, body: bytes) -> tuple[str, AppendRequest]:
        """Decode and check an append request (raises the error to reply with)."""
        sid, req, signed = self.parse_append_deferred(subject, body)
        if signed and self.authorize is not None:
            self.authorize.verify_signatures(sid, req)
        return sid, req

    def parse_append_deferred(self, subject: str, body: bytes) -> tuple[str, AppendRequest, bool]:
        """:meth:`parse_append` without the signature cryptography; the flag
        says whether some signature still has to be verified before the store."""
        sid = self.subjects.session_of(subject)
        req = decode(body, AppendRequest, empty_ok=False)
        signed = self.authorize.precheck(sid, req) if self.authorize is not None else False
        return sid, self._prepare(req, len(body)), signed

    async def user_message(self, subject: str, body: bytes) -> bytes:
        sid = self.subjects.session_of(subject)
        msg = decode(body, UserMessage, empty_ok=False)
        if starts_no_turn(msg.item_id):
            raise BadRequestError(
                f"item_id {msg.item_id!r}: the {NO_TURN_PREFIX!r} prefix marks an item its writer "
                "answers itself, but a message on the inbound subject is for the agents; "
                f"drop the prefix, or append the item on the append subject",
            )
        item = AppendItem(
            agent="user",
            data={"role": "user", "content": msg.content},
            item_id=msg.item_id or new_item_id(),
            sig=msg.sig,
            key_id=msg.key_id,
        )
        if self.authorize is not None:
            self.authorize.check_user(sid, item)
            self.authorize.check_route(sid, item, msg.to, msg.to_sig)
        request = self._prepare(AppendRequest(items=[item]), len(body))
        async with self._in_arrival_order(sid):
            if msg.to and self.entry_hint and await self.store.last_order(sid) == 0:
                # Before the append: the outbox may deliver the item to a worker before
                # this handler resumes, and the worker must already find the entry agent.
                # The hint is create-only, so a retry or a racing first message is harmless.
                proof = (EntryProof(item_id=item.item_id, key_id=msg.key_id, to_sig=msg.to_sig)
                         if msg.key_id and msg.to_sig and item.item_id else None)  # checked above
                await self.entry_hint(sid, msg.to, proof)
        # The store takes the append before this first suspends, so still ahead of the
        # next message, which resumes one loop turn later at the earliest.
        reply: AppendReply = await self.store.append(sid, request)
        return _encode(reply)

    @contextlib.asynccontextmanager
    async def _in_arrival_order(self, sid: str) -> AsyncIterator[None]:
        """Let the user messages of one session reach the store in the order they came
        (their tasks start in that order): one that waits first (for its entry agent to
        be written) holds back those behind it, which would otherwise overtake it."""
        before = self._arriving.get(sid)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._arriving[sid] = mine
        try:
            if before is not None and not before.done():
                await asyncio.wait({before})  # not cancelled along with this request
            yield
        finally:
            mine.set_result(None)
            if self._arriving.get(sid) is mine:
                del self._arriving[sid]

    async def read(self, subject: str, body: bytes) -> bytes:
        sid = self.subjects.session_of(subject)
        req = decode(body, ReadRequest)
        if req.tail is not None and (req.after is not None or req.limit is not None):
            raise BadRequestError("tail cannot be combined with after or limit")
        max_payload = self._max_payload()
        budget = max_payload - _REPLY_OVERHEAD
        # No head from a key the keyring no longer takes (retired, its successor not in
        # the file yet): it would verify nowhere.
        signer = self.head_signer if req.head else None
        if signer is not None and signer.refused() is not None:
            signer = None
        if signer is not None:
            budget -= _HEAD_RESERVE  # the signed head is spliced in after the page
        if req.tail is not None:
            # The store stops reading once the items pass the budget: a tail's
            # cost is bounded by the reply limit, not by the session.
            page = await self.store.tail(sid, req.tail, visible=not req.raw, max_bytes=budget)
            if page.more:
                raise TooLargeError(
                    f"the last {req.tail} items are over the {budget}-byte reply "
                    "limit; page forward with after/limit instead",
                    limit=budget,
                )
        else:
            page = await (self.read_ahead or self.store).read(
                sid,
                after=req.after or 0,
                limit=req.limit or DEFAULT_READ_LIMIT,
                max_bytes=budget,
                visible=not req.raw,
            )
        head = b""
        if signer is not None:
            head = b',"head":' + _encode(await signed_head(self.store, signer, sid))
        # Envelopes are stored encoded; splice them in without re-encoding.
        reply = b"".join(
            (
                b'{"session_id":"',
                sid.encode(),
                b'","items":[',
                b",".join(page.items),
                b'],"last_order":',
                str(page.last_order).encode(),
                b',"more":',
                b"true" if page.more else b"false",
                head,
                b"}",
            )
        )
        if len(reply) > max_payload and len(page.items) == 1:
            # One item, stored while the server's max payload was larger, fits no reply:
            # say so (the replier would drop the reply and the reader time out).
            order = _order_of(page.items[0])
            item = f"item {order}" if order is not None else f"the item after {req.after or 0}"
            raise TooLargeError(
                f"{item} is {len(page.items[0])} bytes, too large for a read reply under the "
                f"server's max payload of {max_payload} bytes"
                + (f"; read on with after={order}" if order is not None else ""),
                limit=max_payload,
            )
        return reply

    async def sessions(self, subject: str, body: bytes) -> bytes:
        req = decode(body, SessionsRequest)
        infos, more = await self.store.sessions(after=req.after, limit=req.limit or DEFAULT_SESSIONS_LIMIT)
        reply = _encode(SessionsReply(sessions=infos, more=more))
        max_payload = self._max_payload()
        if len(reply) <= max_payload:
            return reply
        # Long session ids on a small max payload: a shorter page, as reads do.
        budget, size, keep = max_payload - _REPLY_OVERHEAD, 0, 0
        for info in infos:
            size += len(_encode(info)) + 1
            if size > budget and keep:
                break
            keep += 1
        return _encode(SessionsReply(sessions=infos[:keep], more=True))

    # -- validation ------------------------------------------------------
    def _prepare(self, req: AppendRequest, body_size: int) -> AppendRequest:
        """Check sizes, numbers and nesting; give every item an ``item_id``.

        Raises:
            TooLargeError: more than :data:`MAX_APPEND_ITEMS` items, an item's
                data over ``max_item_bytes``, or an ack that could not fit the
                server's max payload (nothing is written).
            BadRequestError: a number JSON canonicalization cannot represent, or
                data nested deeper than :data:`~shared.codec.MAX_DEPTH`.
        """
        n = len(req.items)
        if n > MAX_APPEND_ITEMS:
            raise TooLargeError(
                f"{n} items in one append, over the limit of {MAX_APPEND_ITEMS} items per "
                "request; send them in several appends",
                limit=MAX_APPEND_ITEMS,
            )
        # An item's envelope (data plus its session id, ids, agent, hash, signature) and
        # the outbox's headers must fit one message, or it is committed and never published.
        max_payload = self._max_payload()
        limit = min(self.max_item_bytes, max_payload - _ENVELOPE_OVERHEAD)
        # Stored data can outgrow its spelling in the body (``1e15`` is stored as
        # ``1000000000000000.0``: 4.5x at most): measure only when that could matter.
        measure = body_size * 5 > limit
        missing_ids = False
        for i, it in enumerate(req.items):
            if not json_ok(it.data, keys=False):  # decoded from JSON: string keys
                check_json(it.data, f"$.items[{i}].data")  # raises, naming the number or the nesting
            if measure and (size := len(_encode(it.data))) > limit:
                raise TooLargeError(
                    f"item {i} data is {size} bytes, over the {limit}-byte limit",
                    limit=limit,
                )
            missing_ids = missing_ids or it.item_id is None
        if missing_ids:
            items = [
                it if it.item_id is not None else msgspec.structs.replace(it, item_id=new_item_id())
                for it in req.items
            ]
            req = msgspec.structs.replace(req, items=items)
        if _ACK_FRAME + n * (_ACK_PER_ITEM + _MAX_ITEM_ID) > max_payload:
            # Only long batches get here: measure the ack they would get.
            ack = ack_size_bound([it.item_id or "" for it in req.items])
            if ack > max_payload:
                raise TooLargeError(
                    f"the ack of {n} items could be {ack} bytes, over the server's max payload "
                    f"of {max_payload} bytes; send fewer items per append",
                    limit=max_payload,
                )
        return req
