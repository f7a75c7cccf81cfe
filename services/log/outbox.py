"""Ordered publisher of committed envelopes to ``<prefix>.items.<sid>``.

Every committed envelope is published, in global commit order, with header
``Nats-Msg-Id: <sid>:<item_order>`` to the JetStream stream capturing the
items subjects.  Each publish also carries ``Nats-Expected-Last-Msg-Id`` (the
previous envelope's id), so if one message of a pipelined window is lost (a
server restart), the server refuses every later one instead of storing them
out of order.

What has been published is read back from the stream itself: on start and
after any failure the outbox asks the stream for its last message, maps its
``Nats-Msg-Id`` to a commit position in the store, and republishes everything
after it.  So an item committed just before a crash is published after the
restart, and none is published twice.  An item no message can carry any more
(committed while the server's ``max_payload`` was larger) is skipped, logged at
ERROR naming it: the items after it are published.

Failures follow :mod:`shared.failures`: a transient one (NATS away, an ack
timeout, a window the stream refused because a server restart lost its
predecessor) is retried with backoff after a resync; anything else (the stream
deleted, configured for other subjects, sealed, or holding another database's
items; a refusal a resync does not cure; a bug) ends the outbox with a
:class:`~shared.failures.FatalError`, which the log service turns into a
non-zero exit: it must not go on acknowledging appends nobody will publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, Header, RetentionPolicy, StorageType, StreamConfig

from shared.errors import ConvlogError
from shared.failures import (
    FatalError,
    StreamConfigError,
    check_items_stream,
    is_transient,
    supervise,
)
from shared.subjects import Subjects, validate_session_id
from shared.wire import Outgoing, over_max_payload, publish_many
from shared.work import work_stream_name

from .store.base import Committed, LogStore

__all__ = ["Outbox", "StreamConfigError", "StreamMismatchError", "StreamRefusedError", "ensure_stream"]

log = logging.getLogger("convlog.log.outbox")

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
# The header blocks of an outbox message (see wire.header_block), by format.
_FIRST_HEADERS = b"NATS/1.0\r\n" + MSG_ID.encode() + b": %s\r\n\r\n"
_HEADERS = b"NATS/1.0\r\n" + MSG_ID.encode() + b": %s\r\n" + EXPECTED_LAST_MSG_ID.encode() + b": %s\r\n\r\n"
_STATUS = Header.STATUS.value
#: Windows refused in a row, each after a fresh resync, before the outbox gives up.
MAX_REFUSALS = 5
#: Refusals that say the server is still at work, not that the window is wrong:
#: 10008 "JetStream system temporarily unavailable", 10158 "duplicate message id
#: is in process" (the first publish of the window is still being replicated, as
#: while a cluster has no quorum).  They are retried for as long as they last and
#: do not count toward :data:`MAX_REFUSALS`.
_BUSY_ERR_CODES = frozenset({10008, 10158})
#: Messages without an outbox id (published by something else) a resync steps over.
MAX_STRAYS = 1_000
#: Windows of commits kept in memory for the outbox; beyond, it reads them back from the store.
PENDING_WINDOWS = 16


class StreamMismatchError(FatalError):
    """The items stream holds envelopes this store never committed."""


class StreamRefusedError(FatalError):
    """The stream refused a publish, and resyncing does not cure it."""


async def ensure_stream(js: JetStreamContext, subjects: Subjects, *, replicas: int = 1) -> None:
    """Create the items stream if it does not exist (idempotent)."""
    config = StreamConfig(
        name=subjects.stream_name,
        subjects=[subjects.items_all],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        duplicate_window=120.0,
        allow_direct=True,
    )
    try:
        await js.stream_info(subjects.stream_name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)


class Outbox:
    """Publishes committed envelopes in order; resumes from the stream after failures.

    Args:
        nc: a connected client.
        store: the log store (source of committed envelopes).
        subjects: subject names.
        window: most messages in flight before waiting for acks.
        ack_timeout: seconds to wait for a window's acks.
    """

    def __init__(
        self,
        nc: Client,
        store: LogStore,
        subjects: Subjects,
        *,
        window: int = 512,
        ack_timeout: float = 5.0,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._store = store
        self._subjects = subjects
        self._window = window
        self._ack_timeout = ack_timeout
        self._pending: deque[Committed] = deque()
        self._wake = asyncio.Event()
        self._reconnected = asyncio.Event()
        self._published = 0  # global position of the last envelope the stream holds
        self._last_msg_id: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._inbox = ""
        self._resync_first = True  # the next attempt of the publish loop resyncs first
        self._refusals = 0  # windows refused in a row
        self._needs_backlog = True  # after a (re)sync the store may hold unpublished items
        self.published_count = 0
        self.skipped = 0  # items over the server's max_payload, not published (logged)
        self.traces: dict[tuple[str, int], bytes] = {}  # traceparent per item (services/log/traces.py)

    def on_disconnected(self) -> None:
        """Connection callback: acks in flight will never come; fail them now.

        Without this the outbox would sit out its ack timeout after every
        server restart before resyncing, delaying every item behind it.
        """
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(ConnectionError("disconnected from NATS"))

    def on_reconnected(self) -> None:
        """Connection callback: resync and publish without waiting for the backoff."""
        self._reconnected.set()
        self._wake.set()

    def on_commit(self, committed: Sequence[Committed]) -> None:
        """Commit listener: queue freshly committed envelopes (already in order).

        While the stream takes nothing (an outage), commits would pile up here
        without bound: beyond :data:`PENDING_WINDOWS` windows they are dropped
        and read back from the store once publishing resumes.
        """
        self._pending.extend(committed)
        if len(self._pending) > PENDING_WINDOWS * self._window:
            self._pending.clear()
            self._needs_backlog = True
        self._wake.set()

    async def start(self) -> None:
        """Resync from the stream, then publish in the background.

        Raises:
            StreamMismatchError: the stream does not belong to this store.
        """
        await self._resync()
        self._resync_first = False
        self._inbox = self._nc.new_inbox()
        await self._nc.subscribe(self._inbox + ".*", cb=self._on_ack)
        self._task = asyncio.create_task(self._run(), name="convlog-outbox")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The publishing task; it ends with :class:`FatalError` if the outbox gave up."""
        return self._task

    async def stop(self, *, drain_timeout: float = 5.0) -> None:
        """Publish what is already committed (up to ``drain_timeout``), then stop.

        Never raises the task's failure: whoever watches :attr:`task` reports it.
        """
        task = self._task
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait({task}, timeout=drain_timeout)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: it was logged where it happened

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._acks.pop(msg.subject.rpartition(".")[2], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _resync(self) -> None:
        """Set the publish cursor from the stream's last message."""
        name = self._subjects.stream_name
        self._needs_backlog = True
        try:
            info = await self._js.stream_info(name)
        except nats.js.errors.NotFoundError as e:
            raise StreamConfigError(
                f"the items stream {name} is gone (deleted while the service ran); "
                "a restart creates it again and republishes every item from the database"
            ) from e
        check_items_stream(info.config, self._subjects)
        if info.state.messages == 0:
            if info.state.last_seq:
                # The stream was purged or aged out: we cannot tell what it held,
                # so treat everything committed so far as published.
                self._published = await self.committed_end()
                log.warning("items stream %s is empty after seq %d; publishing new commits only",
                            name, info.state.last_seq)
            else:
                self._published = 0
            self._last_msg_id = None
            return
        # The stream's last message id is what the next window's first message names.
        # Messages some other publisher left on the items subjects (no convlog id: a
        # loose NATS configuration) are stepped over to the last one the outbox wrote.
        last_id: str | None = None
        strays = 0
        for seq in range(info.state.last_seq, info.state.first_seq - 1, -1):
            try:
                msg = await self._js.get_msg(name, seq=seq)
            except nats.js.errors.NotFoundError:
                continue  # deleted from the stream
            msg_id = (msg.headers or {}).get(MSG_ID, "")
            if last_id is None:
                last_id = msg_id
            sid, _, order = msg_id.rpartition(":")
            if not _outbox_id(sid, order):
                strays += 1
                if strays > MAX_STRAYS:
                    break
                continue
            position = await self._store.position_of(sid, int(order))
            if position is None:
                raise StreamMismatchError(
                    f"the items stream {name} ends with {msg_id!r}, which this database does not hold: "
                    "the stream belongs to another database (or the database was restored from an "
                    "older copy). Use another --prefix, point --db at the matching file, or delete "
                    f"the stream {name} if its history is no longer needed. A restored database: "
                    f"stop its workers too and delete the work stream {work_stream_name(self._subjects)} "
                    "as well (its duplicate window drops the turn notices of the item orders used "
                    "again, and the workers keep what they learnt of the lost items), then start "
                    "the log service and the workers again"
                )
            if strays:
                _warn_strays(name, strays, seq)
            self._published = position
            self._last_msg_id = last_id or None
            return
        if strays > MAX_STRAYS:
            raise StreamMismatchError(
                f"the items stream {name} ends with more than {MAX_STRAYS} messages convlog did not "
                f"publish: something else publishes on {self._subjects.prefix}.items.> (keep those "
                "subjects to the log service), or the stream is not convlog's"
            )
        if strays:
            _warn_strays(name, strays, info.state.first_seq)
        self._published = 0  # the stream holds nothing of this database: all of it is due
        self._last_msg_id = last_id or None

    async def committed_end(self) -> int:
        """The store's last commit position (paged: the whole log need not be in memory)."""
        end = self._published
        while tail := await self._store.committed_after(end, 10_000):
            end = tail[-1].position
        return end

    async def _run(self) -> None:
        # Back off after a failure, but resync at once when the connection is back.
        await supervise(
            self._serve, "outbox", logger=log, wake=self._reconnected,
            give_up=lambda: self._stopping and not self._nc.is_connected,
        )

    async def _serve(self) -> None:
        """One attempt: resync from the stream (after a failure), then publish until stopped."""
        if self._resync_first:
            await self._resync()
        self._resync_first = True  # however this attempt ends, the next one resyncs
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            if batch:
                # Let the commit's replies reach the socket first: an
                # appender waits for its reply, nobody waits for this.
                await asyncio.sleep(0)
                await self._publish(batch)

    async def _next_batch(self) -> list[Committed] | None:
        while True:
            # Clear before looking, not after: a commit that lands while we look
            # (the store query below yields) sets the event again, so the wait
            # cannot sleep through it and strand the last commit unpublished.
            self._wake.clear()
            while self._pending and self._pending[0].position <= self._published:
                self._pending.popleft()
            if self._pending:
                if self._pending[0].position == self._published + 1:
                    n = min(self._window, len(self._pending))
                    return [self._pending[i] for i in range(n)]
                # A gap (after a resync or restart): read it from the store.
                return await self._store.committed_after(self._published, self._window)
            if self._needs_backlog:
                # Once after each (re)sync: what the store committed before this
                # process saw it (or before the stream lost it).  From then on
                # every commit arrives through on_commit.
                backlog = await self._store.committed_after(self._published, self._window)
                if backlog:
                    return backlog
                self._needs_backlog = False
                continue
            if self._stopping:
                return None
            await self._wake.wait()

    async def _publish(self, batch: list[Committed]) -> None:
        """Publish a window in order; only its last message asks for an ack.

        Every message names its predecessor in ``Nats-Expected-Last-Msg-Id``,
        so the stream stores the last one only if all earlier ones were
        stored, in order: one positive ack confirms the whole window.
        """
        prev = self._last_msg_id.encode() if self._last_msg_id is not None else None
        messages: list[Outgoing] = []
        items = self._subjects.items
        last: Committed | None = None  # the window's last message sent
        for c in batch:
            # Session ids are validated at append, so the header values need no escaping.
            msg_id = b"%s:%d" % (c.session_id.encode(), c.item_order)
            headers = _FIRST_HEADERS % msg_id if prev is None else _HEADERS % (msg_id, prev)
            if self.traces and (parent := self.traces.pop((c.session_id, c.item_order), None)):
                headers = headers[:-2] + b"traceparent: " + parent + b"\r\n\r\n"
            if over_max_payload(self._nc, c.envelope, headers):
                # Committed while the server took larger messages: no server of this
                # max_payload takes it, and holding the fan-out for it would stall every
                # later item of every session for good.  The next one names the one before.
                _skip_too_large(self._subjects, c, len(headers) + len(c.envelope), self._nc.max_payload)
                self.skipped += 1
                continue
            messages.append((items(c.session_id), "", c.envelope, headers))
            prev, last = msg_id, c
        if last is not None:
            token = str(last.position)
            fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
            self._acks[token] = fut
            subject, _, payload, headers = messages[-1]
            messages[-1] = (subject, f"{self._inbox}.{token}", payload, headers)
            try:
                refused = await publish_many(self._nc, messages)
                if refused:
                    # What followed it names it as its predecessor: the stream refuses those too.
                    raise refused[0][1]
                async with asyncio.timeout(self._ack_timeout):
                    ack = await fut
            finally:
                self._acks.pop(token, None)
            self._check_ack(ack, f"{last.session_id}:{last.item_order}")
            self._refusals = 0
            self._last_msg_id = f"{last.session_id}:{last.item_order}"
        self._published = batch[-1].position
        self.published_count += len(messages)

    def _check_ack(self, ack: Msg, msg_id: str) -> None:
        """Raise unless ``ack`` is the stream's positive ack of ``msg_id``.

        Raises:
            nats.errors.NoRespondersError: no stream took the message (the
                resync that follows checks the stream's subjects).
            nats.js.errors.APIError: a refusal a resync may cure (see
                :func:`~shared.failures.is_transient`).
            StreamRefusedError: any other refusal, or a curable one
                :data:`MAX_REFUSALS` times in a row (a busy server's refusal,
                :data:`_BUSY_ERR_CODES`, is not counted).
        """
        if (ack.headers or {}).get(_STATUS) == "503":
            raise nats.errors.NoRespondersError
        if b'"error"' not in ack.data:
            return
        try:
            error = msgspec.json.decode(ack.data)["error"]
            refusal = nats.js.errors.APIError(
                code=error.get("code"), err_code=error.get("err_code"),
                description=error.get("description"),
            )
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
            refusal = nats.js.errors.APIError(description=ack.data[:200].decode(errors="replace"))
        if refusal.err_code in _BUSY_ERR_CODES:
            raise refusal
        self._refusals += 1
        if is_transient(refusal) and self._refusals < MAX_REFUSALS:
            raise refusal
        raise StreamRefusedError(
            f"the items stream {self._subjects.stream_name} refused {msg_id}"
            + (f" ({self._refusals} windows in a row, each after a resync)" if self._refusals > 1 else "")
            + f": {refusal.description} (JetStream error {refusal.err_code})"
        ) from refusal
    @property
    def published_position(self) -> int:
        """Global position of the last envelope the items stream is known to hold."""
        return self._published


def _outbox_id(sid: str, order: str) -> bool:
    """Whether ``<sid>:<order>`` is an id the outbox writes (a session id and an
    item order as it prints one), not another publisher's."""
    if not (order.isdigit() and order == str(int(order))):
        return False
    try:
        validate_session_id(sid)
    except ConvlogError:
        return False
    return True


def _skip_too_large(subjects: Subjects, c: Committed, size: int, max_payload: int) -> None:
    log.error("%s #%d is %d bytes as a message, over the NATS server's max_payload of %d (it was "
              "committed while the server took larger ones): not published on %s, the next items are "
              "(the log keeps it). To have it on the items stream, raise max_payload to at least %d "
              "and delete the stream %s: the log service republishes every item when it starts",
              c.session_id, c.item_order, size, max_payload, subjects.items(c.session_id), size,
              subjects.stream_name)


def _warn_strays(stream: str, count: int, seq: int) -> None:
    log.warning("items stream %s: %d message(s) after seq %d were not published by a convlog log "
                "service (no convlog Nats-Msg-Id); skipped. Something else publishes on the items "
                "subjects: keep them to the log service (deploy/nats/)", stream, count, seq)
