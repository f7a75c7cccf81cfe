"""A process-local copy of one session's visible history, kept current by following the log.

:class:`SessionCopy` is what lets ``ConvlogSession.get_items`` answer without
a round trip.  It holds the newest visible items of one session (as JSON
bytes, so callers always get fresh dicts) and the order ``last`` up to which
it has applied *every* envelope, and it stays current three ways:

* **its own writes**: the caller hands it each append's ack
  (:meth:`SessionCopy.on_ack`), so a process reads what it wrote as soon as
  the append returns;
* **everyone's writes**: an ephemeral JetStream consumer on the items stream,
  filtered to ``<prefix>.items.<sid>``, pushes each stored envelope to this
  process.  A JetStream consumer and not a core subscription: it delivers
  only what the stream *stored*, so an envelope a store published but the
  stream refused is never seen;
* **the log, when in doubt**: whenever the copy knows it may be behind — a
  gap in ``item_order`` (an ack or a delivery ahead of what it holds), a
  reconnect, a consumer that went silent (no message or heartbeat for three
  heartbeat intervals), or a last check against the log older than
  ``max_staleness`` — it reads the envelopes it misses from the log service
  before it answers.

Consistency this gives (``ConvlogSession`` documents it for users):

* every answer is the visible history of one prefix of the log, ``1..k``,
  for a ``k`` that never decreases: no gaps, nothing out of order, nothing
  hidden that was not hidden at ``k``;
* ``k`` includes every write of this process that was acknowledged before the
  call (read your writes);
* another process's acknowledged write is included once its envelope has
  been delivered (the follow delay: about a millisecond on a local server),
  and in any case within ``max_staleness`` seconds, because the copy confirms
  its ``last`` against the log at least that often while it is being read.

It checks what it is delivered (a loose NATS configuration lets anyone
publish on the items subject): it keeps the hash of the envelope at ``last``
(from the log's reads, its own acks and checked deliveries), and a delivered
envelope that does not continue that chain is not applied: it logs that at
WARNING (once) and reads the log.  A forgery that continues the chain cannot
be told at once; the real envelope of that order (or the next one) then
disagrees with it: the copy logs at ERROR that the item as delivered was not
the log's and seeds itself again from the log, so the forged item is gone.

The copy keeps at most ``max_items`` visible items and ``max_bytes`` of item
JSON; a read that needs older items than it holds says so (``None``) and the
caller reads the log instead.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .chain import GENESIS_HASH, item_hash
from .client import LogClient, new_item_id
from .errors import TooLargeError
from .messages import AppendedItem, ReadReply
from .nats_seam import seam_for

__all__ = ["SessionCopy"]

log = logging.getLogger("convlog.session_copy")

HEARTBEAT_S = 2.0  # the consumer's idle heartbeat; three missed ones mean it is gone
INACTIVE_S = 30.0  # the server drops a consumer nobody listens to after this long
SEED_WINDOW = 200  # raw envelopes read to seed a copy (more when a read asks for more)
MAX_ITEMS = 2_000
MAX_BYTES = 16 * 1024 * 1024
IDLE_S = 60.0  # not read for this long: stop following (heartbeats alone keep a consumer busy)
FOLLOW_RETRY_S = 10.0  # after a failed consumer create, read from the log this long ...
FOLLOW_RETRY_MAX_S = 300.0  # ... doubling after each further failure, up to this
CREATE_TIMEOUT_S = 1.0  # a consumer create unanswered this long counts as failed
_RESEED_GAP = 1_000  # behind by more than this: seed from the tail instead of paging

_decode_list = msgspec.json.Decoder(list[Any]).decode
_encode = msgspec.json.encode
_warned = False


class _Delivered(msgspec.Struct):
    """A delivered envelope; ``data`` stays undecoded (the fold keeps its bytes)."""

    session_id: str
    item_order: int
    item_id: str
    agent: str
    kind: str
    data: msgspec.Raw
    created_at: str
    hash: str
    sig: str | None = None
    key_id: str | None = None


_decode_delivered = msgspec.json.Decoder(_Delivered).decode
_decode_data = msgspec.json.Decoder(dict[str, Any]).decode
_TAKEN_KEPT = 256  # checked deliveries remembered until the log confirms them


class SessionCopy:
    """The newest visible items of one session, followed live; see the module docstring.

    Args:
        client: the connected client whose connection carries the consumer.
        session_id: a valid session id.
        max_staleness: longest time (s) an answer may rely on deliveries alone
            before the copy confirms its position with the log.
        max_items, max_bytes: how much visible history to keep.
        read: reads the session from the log (``LogClient.read`` of it by
            default; the shared session's read, which never answers behind
            what the connection acknowledged; ``deliveries=False`` where it may
            answer behind what only deliveries showed).
    """

    def __init__(
        self,
        client: LogClient,
        session_id: str,
        *,
        max_staleness: float = 1.0,
        max_items: int | None = None,
        max_bytes: int | None = None,
        read: Callable[..., Awaitable[ReadReply]] | None = None,
    ) -> None:
        self.client = client
        self._read: Callable[..., Awaitable[ReadReply]] = read or (
            lambda deliveries=True, **kw: client.read(session_id, **kw)
        )
        self.loop = asyncio.get_running_loop()  # the loop whose connection carries it
        self.session_id = session_id
        self.max_staleness = max_staleness
        self.max_items = MAX_ITEMS if max_items is None else max_items
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.last = 0  # every envelope up to here is folded in
        self._hash: str | None = GENESIS_HASH  # the hash of envelope ``last``, when known
        self._taken: dict[int, str] = {}  # orders applied from deliveries (not yet confirmed): hashes
        self._doubt = False  # a delivery disagreed with the chain: read the log before answering
        self._warned = False
        self.complete = False  # the window holds every visible item (nothing older is visible)
        self._orders: list[int] = []
        self._data: list[bytes] = []
        self._nbytes = 0
        # envelopes past last+1, waiting for the gap: kind, data, hash, and the delivery to check
        self._ahead: dict[int, tuple[str, bytes, str | None, _Delivered | None]] = {}
        self._parking = False  # while seeding, everything waits in _ahead
        self._window = 0  # raw envelopes the last seed asked for
        self._seeded = False
        self._verified_at = -1e18  # monotonic time the log last confirmed ``last``
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._seen_at = 0.0  # monotonic time of the last delivery or heartbeat
        self._reconnects = -1
        self._follow_failed_at: float | None = None
        self._follow_retry_s = FOLLOW_RETRY_S
        self._lock = asyncio.Lock()
        self.closed = False
        self.log_reads = 0  # round trips made to bring the copy up to date (for tests and benches)
        self.pauses = 0  # times it stopped following for want of readers
        self._unread = 0  # envelopes delivered since the last read
        self._read_at = time.monotonic()
        self._pausing: asyncio.Task[None] | None = None

    # -- reading ---------------------------------------------------------
    def holds(self, n: int | None) -> bool:
        """True when :meth:`items` can answer for ``n`` (``None``: all)."""
        return self.complete or (n is not None and n <= len(self._data))

    def items(self, n: int | None) -> list[dict[str, Any]] | None:
        """The last ``n`` visible items (all when ``None``) as fresh dicts, or ``None``
        when the copy does not hold that many and older ones may exist."""
        if not self.holds(n):
            return None
        have = len(self._data)
        n = have if n is None else min(n, have)
        if n == 0:
            return []
        return _decode_list(b"[" + b",".join(self._data[have - n :]) + b"]")

    def newest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest visible item's order and data; ``None`` when none is held."""
        if not self._data:
            return None
        return self._orders[-1], msgspec.json.decode(self._data[-1])

    @property
    def empty(self) -> bool:
        """True when the session has no visible item at all (as of ``last``)."""
        return self.complete and not self._data

    def info(self) -> dict[str, Any]:
        """Where the copy stands (for monitoring and tests)."""
        return {
            "following": self._following(), "last": self.last, "items": len(self._data),
            "complete": self.complete, "log_reads": self.log_reads, "pauses": self.pauses,
            "consumer": self._consumer,
        }

    # -- applying envelopes --------------------------------------------------
    def apply(
        self, order: int, kind: str, data: bytes, digest: str | None = None,
        delivered: _Delivered | None = None,
    ) -> None:
        """Fold one envelope in; one ahead of ``last + 1`` waits until the gap is filled.

        ``digest`` is its hash (``None``: unknown); ``delivered``, the envelope
        as delivered, which is folded only if it continues the chain the copy holds.
        """
        if order <= self.last:
            held = self._taken.get(order)
            if held is not None and digest != held:  # a delivery taken here disagrees: the log decides
                self._refuse(order)
            return
        if self._parking or order > self.last + 1:
            if len(self._ahead) < 10_000:  # past that the log fills it anyway
                self._ahead[order] = (kind, data, digest, delivered)
            return
        if delivered is not None and not self._continues(delivered):
            self._refuse(order)
            return
        self._take(order, kind, data, digest, delivered)
        ahead = self._ahead
        while ahead:
            nxt = ahead.pop(self.last + 1, None)
            if nxt is None:
                break
            if nxt[3] is not None and not self._continues(nxt[3]):
                self._refuse(self.last + 1)
                break
            self._take(self.last + 1, *nxt)
        if ahead and min(ahead) <= self.last:
            for o in [o for o in ahead if o <= self.last]:
                del ahead[o]

    def _take(self, order: int, kind: str, data: bytes, digest: str | None, delivered: _Delivered | None) -> None:
        self._fold(order, kind, data)
        self._hash = digest
        if delivered is not None:
            taken = self._taken
            taken[order] = digest  # type: ignore[assignment]  # a checked delivery has its hash
            if len(taken) > _TAKEN_KEPT:
                del taken[next(iter(taken))]

    def _continues(self, env: _Delivered) -> bool:
        """True when ``env`` continues the hash chain through ``last`` of this session."""
        prev = self._hash
        if prev is None or env.session_id != self.session_id:
            return False
        try:
            data = _decode_data(env.data)
        except msgspec.DecodeError:
            return False
        return item_hash(
            session_id=env.session_id, item_order=env.item_order, item_id=env.item_id, agent=env.agent,
            kind=env.kind, data=data, created_at=env.created_at, prev_hash=prev, sig=env.sig,
            key_id=env.key_id,
        ) == env.hash

    def _refuse(self, order: int) -> None:
        """A delivery that does not continue the chain: not applied; the log is read."""
        self._doubt = True
        log.log(logging.DEBUG if self._warned else logging.WARNING,
                "session copy %s: item %d as delivered does not continue the hash chain it holds; "
                "not applied, reading the log instead", self.session_id, order)
        self._warned = True

    def on_ack(self, acks: list[AppendedItem], items: list[tuple[str, str, Any]]) -> None:
        """Apply this process's own acknowledged append: ``(item_id, kind, data)`` per item."""
        if not (self._seeded or self._parking):
            return  # not following: the next read seeds from the log, which holds it
        acked = {a.item_id: a for a in acks}
        for item_id, kind, data in items:
            ack = acked.get(item_id)
            if ack is not None:
                self.apply(ack.item_order, kind, _encode(data), ack.hash)

    def _fold(self, order: int, kind: str, data: bytes) -> None:
        self.last = order
        if kind == "item":
            self._orders.append(order)
            self._data.append(data)
            self._nbytes += len(data)
            if len(self._data) > self.max_items or self._nbytes > self.max_bytes:
                self._trim()
        elif kind == "clear":
            self._orders.clear()
            self._data.clear()
            self._nbytes = 0
            self.complete = True
        elif kind == "retract":
            try:
                target = msgspec.json.decode(data).get("target")
            except (msgspec.DecodeError, AttributeError):
                return
            i = bisect.bisect_left(self._orders, target) if isinstance(target, int) else -1
            if 0 <= i < len(self._orders) and self._orders[i] == target:
                self._nbytes -= len(self._data[i])
                del self._orders[i], self._data[i]

    def _trim(self) -> None:
        """Drop the oldest items down to 3/4 of both limits (in steps, not one per append)."""
        data = self._data
        cut = max(0, len(data) - max(1, self.max_items * 3 // 4))
        dropped = sum(map(len, data[:cut]))
        while cut < len(data) - 1 and self._nbytes - dropped > self.max_bytes * 3 // 4:
            dropped += len(data[cut])
            cut += 1
        if cut:
            self._nbytes -= dropped
            del self._orders[:cut], data[:cut]
            self.complete = False

    # -- staying current -----------------------------------------------------
    def _following(self) -> bool:
        """True while the consumer is known to deliver everything."""
        return (
            self._seeded and self._consumer is not None
            and self._reconnects == self.client.nc.stats["reconnects"]
            and time.monotonic() - self._seen_at <= 3 * HEARTBEAT_S
        )

    async def current(self, want: int | None = None, max_staleness: float | None = None) -> bool:
        """Bring the copy up to date as far as it knows it may be behind.

        Args:
            want: how many visible items the caller is about to read (``None``: all).
            max_staleness: this caller's bound (default: the copy's).

        Returns:
            False when the copy cannot follow the session (the caller reads the log).
        """
        if self.closed:
            return False
        self._unread = 0
        self._read_at = time.monotonic()
        if not self._following():
            async with self._lock:
                if not self._following() and not await self._restart(want):
                    return False
        window = self._window_for(want)
        if not self.holds(want) and self._window < window:
            async with self._lock:  # the reader wants more than the window held
                await self._seed(window)
        stale = self.max_staleness if max_staleness is None else max_staleness
        if self._ahead or self._doubt:
            await self.fill()
        elif time.monotonic() - self._verified_at > stale:
            async with self._lock:
                if time.monotonic() - self._verified_at > stale:
                    await self._verify()
        return True

    async def fill(self) -> None:
        """Read what the copy misses from the log (raw envelopes after ``last``)."""
        async with self._lock:
            await self._fill()

    async def _verify(self) -> None:
        started = time.monotonic()
        self.log_reads += 1
        if (await self._read(tail=0, deliveries=False)).last_order > self.last:
            await self._fill()
        else:
            self._verified_at = started

    async def _fill(self) -> None:
        started = time.monotonic()
        if self._doubt:
            self._doubt = False
            parted = await self._parted()
            if parted is not None:
                log.error("session copy %s: item %d as delivered was not the log's; reading the "
                          "log's items from there", self.session_id, parted)
                await self._seed(self._window, again=True)
                return
        while True:
            self.log_reads += 1
            rep = await self._read(after=self.last, raw=True)
            if rep.last_order - self.last > _RESEED_GAP:
                await self._seed(self._window)  # far behind: the tail, not every page
                return
            for env in rep.items:
                self.apply(env.item_order, env.kind, _encode(env.data), env.hash)
            if not rep.more or not rep.items:
                break
        if self._ahead and not rep.more:
            # Past a gap the log does not fill: not the log's (a forged order ahead of the
            # session), or one whose delivery before it was lost (the log is read again at
            # the next delivery past it, or within max_staleness).  Waiting for it would
            # send every read to the log for good.
            self._ahead.clear()
        if not self._ahead:
            self._verified_at = started

    async def _parted(self) -> int | None:
        """The first order applied from a delivery whose envelope the log holds
        otherwise, or ``None``."""
        taken = self._taken
        while taken:  # page by page: the deliveries taken may be over one reply
            self.log_reads += 1
            rep = await self._read(after=min(taken) - 1, raw=True)
            for env in rep.items:
                held = taken.pop(env.item_order, None)
                if held is not None and held != env.hash:
                    return env.item_order
            if not rep.more or not rep.items:
                break
        return None

    async def _seed(self, window: int, *, again: bool = False) -> None:
        """Reset the window from the last ``window`` raw envelopes of the log.

        Raw, not the visible tail: envelopes never change, so the window is
        exactly the visible history as of the reply's ``last_order``.  What
        arrives meanwhile waits in ``_ahead`` and is applied after.  ``again``:
        also when the log is behind ``last`` (what the copy took was not the log's).
        """
        window = max(1, min(window, self.max_items))
        started = time.monotonic()
        self._parking = True
        try:
            while True:
                self.log_reads += 1
                try:
                    rep = await self._read(tail=window, raw=True)
                    break
                except TooLargeError:
                    if window <= 1:
                        raise
                    window //= 2  # big items: ask for fewer
            if rep.last_order >= self.last or again:  # never step back (a lagging replica answered)
                envs = rep.items
                self._orders, self._data, self._nbytes = [], [], 0
                self.complete = not envs or envs[0].item_order == 1
                for env in envs:
                    self._fold(env.item_order, env.kind, _encode(env.data))
                self.last = rep.last_order
                self._hash = (envs[-1].hash if envs and envs[-1].item_order == rep.last_order
                              else GENESIS_HASH if not rep.last_order else None)
                self._taken.clear()
                self._window = window
                self._seeded = True
        finally:
            self._parking = False
        ahead, self._ahead = self._ahead, {}
        for order in sorted(ahead):
            self.apply(order, *ahead[order])
        if not self._ahead:
            self._verified_at = started

    async def _restart(self, want: int | None) -> bool:
        """(Re)create the consumer, then seed; False when following is not possible now."""
        failed = self._follow_failed_at
        if failed is not None and time.monotonic() - failed < self._follow_retry_s:
            return False
        await self._stop_consumer()
        self._reconnects = self.client.nc.stats["reconnects"]
        try:
            await self._start_consumer()
        except Exception as e:  # no JetStream, no permission, no stream yet: read the log
            if self._follow_failed_at is not None:  # failed before too: try less often
                self._follow_retry_s = min(self._follow_retry_s * 2, FOLLOW_RETRY_MAX_S)
            self._follow_failed_at = time.monotonic()
            _warn_once(self.session_id, e)
            await self._stop_consumer()
            return False
        if self.closed:  # closed while the consumer was being made: nothing may follow now
            await self._stop_consumer()
            return False
        self._follow_failed_at = None
        self._follow_retry_s = FOLLOW_RETRY_S
        await self._seed(self._window_for(want))
        return True

    def _window_for(self, want: int | None) -> int:
        """Raw envelopes to seed with so that ``want`` visible items are likely held."""
        return self.max_items if want is None else min(max(SEED_WINDOW, 4 * want), self.max_items)

    async def _start_consumer(self) -> None:
        nc = self.client.nc
        subjects = self.client.subjects
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=self._on_msg_cb)
        self._sub = sub
        seam_for(nc).deliver_inline(sub, self._on_msg)  # else _on_msg_cb serves
        name = f"convlog-copy-{new_item_id()}"
        config = ConsumerConfig(
            name=name,
            deliver_subject=inbox,
            filter_subject=subjects.items(self.session_id),
            deliver_policy=DeliverPolicy.NEW,  # history comes from the seed read, after this
            ack_policy=AckPolicy.NONE,
            idle_heartbeat=HEARTBEAT_S,
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        self._seen_at = time.monotonic()
        await nc.jetstream().add_consumer(
            subjects.stream_name, config, timeout=min(CREATE_TIMEOUT_S, self.client.timeout)
        )
        self._consumer = name

    async def _stop_consumer(self) -> None:
        sub, self._sub = self._sub, None
        name, self._consumer = self._consumer, None
        self._seeded = False
        nc = self.client.nc
        if sub is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if name is not None and nc.is_connected:
            # Best effort: a consumer nobody listens to is dropped after INACTIVE_S anyway.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.5):
                    await nc.jetstream().delete_consumer(self.client.subjects.stream_name, name)

    def _on_msg(self, msg: Msg) -> None:
        if not msg.data:  # a status message
            status = msg.headers.get("Status") if msg.headers else None
            if status == "100":
                self._seen_at = now = time.monotonic()  # an idle heartbeat: the consumer lives
                if now - self._read_at > IDLE_S and self._pausing is None:
                    self._pausing = asyncio.get_running_loop().create_task(self._pause())
            elif status is not None:
                self._seen_at = -1e18  # e.g. 409 consumer deleted: follow anew at the next read
            return
        self._seen_at = time.monotonic()
        self._unread += 1
        if self._unread > SEED_WINDOW and self._pausing is None:
            self._pausing = asyncio.get_running_loop().create_task(self._pause())
        try:
            env = _decode_delivered(msg.data)
        except msgspec.DecodeError:
            log.warning("session copy %s: undecodable envelope on %s", self.session_id, msg.subject)
            return
        self.apply(env.item_order, env.kind, bytes(env.data), env.hash, env)

    async def _pause(self) -> None:
        """Stop following a copy nobody reads: after a window's worth of unread
        envelopes (seeding again at the next read costs no more than following),
        or after ``IDLE_S`` without a read."""
        try:
            async with self._lock:
                idle = time.monotonic() - self._read_at > IDLE_S
                if (self._unread > SEED_WINDOW or idle) and not self.closed and self._consumer:
                    self.pauses += 1
                    await self._stop_consumer()
        finally:
            self._pausing = None

    async def _on_msg_cb(self, msg: Msg) -> None:
        self._on_msg(msg)

    async def close(self) -> None:
        """Stop following (idempotent); the copy then answers nothing."""
        self.closed = True
        await self._stop_consumer()


def _warn_once(session_id: str, e: BaseException) -> None:
    global _warned
    level = logging.DEBUG if _warned else logging.WARNING
    _warned = True
    log.log(level, "session %s: cannot follow the items stream (%s: %s); reading from the log "
            "service instead, trying again after %g s and then less often", session_id,
            type(e).__name__, e, FOLLOW_RETRY_S)
