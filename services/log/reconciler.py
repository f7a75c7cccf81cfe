"""Redoes the turn notices a crash may have lost (see :mod:`.notices`).

A crash between the commit and the notice's publish (or a publish the work
stream never acknowledged) would strand the message, so a durable consumer on
the items stream, shared by every log-service instance, looks at each
committed user message a moment later and republishes its notice with the
same ``Nats-Msg-Id`` unless this process already published it (or the store
does not hold that very envelope: one forged on the items subject is not
announced): the work stream drops the copy of a notice it holds (or held
within its duplicate window), and a late copy only costs a worker a read of
a finished turn.  It acks only after the
republish, so after a restart it starts where the crashed process stopped (first
redoing what that process had been handed and not acked, :meth:`Reconciler.catch_up`).
On either store the items stream exists, so one mechanism serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.codec import MAX_SAFE_INT
from shared.errors import ConvlogError
from shared.failures import is_transient
from shared.subjects import Subjects, validate_session_id
from shared.work import Notice, notice_msg_id, now, publish_notice, starts_no_turn

from .notices import USER_MARK, Head, Notifier, head_of, is_user_message
from .store.base import LogStore

__all__ = ["RECONCILER", "Reconciler"]

log = logging.getLogger("convlog.log.notices")

#: The reconciler's durable consumer on the items stream.
RECONCILER = "convlog-notices"
#: Its metadata key: the store's last commit position when it was made (see :meth:`Reconciler.bind`).
_COMMITTED_BEFORE = "convlog_committed_before"


def _holdable(head: Head) -> bool:
    """Whether a log can hold an item of ``head``'s session id and order."""
    if not 0 < head.item_order <= MAX_SAFE_INT:
        return False
    try:
        validate_session_id(head.session_id)
    except ConvlogError:
        return False
    return True


class Reconciler:
    """Republishes the notices of user messages the :class:`Notifier` may have lost.

    Args:
        nc: the log service's connection.
        subjects: subject and stream names.
        notifier: addresses and publishes; knows what this process already sent.
        store: the log (what the items stream says is checked against it).
        interval: seconds between sweeps when idle.
        committed_end: the store's last commit position now, where its positions are
            one commit order (the SQLite store: :meth:`.outbox.Outbox.committed_end`).
    """

    def __init__(self, nc: Client, subjects: Subjects, notifier: Notifier, store: LogStore, *,
                 interval: float = 2.0, committed_end: Callable[[], Awaitable[int]] | None = None) -> None:
        self.nc = nc
        self.store = store
        self.subjects = subjects
        self.notifier = notifier
        self.interval = interval
        self.committed_end = committed_end
        self.republished = 0
        #: why the items stream refused to make the consumer, as it said ("" when it did not)
        self.refused = ""
        self._floor = 0  # items at positions up to it were committed before the consumer was made
        self._sub: Any = None
        # Delivered, not yet handled when a sweep failed: handled first by the next one,
        # before anything is acked past them (AckPolicy.ALL acks everything up to a message).
        self._backlog: deque[Any] = deque()
        self._caught_up = False  # what a dead process or a failed pull was handed is redone

    async def bind(self) -> None:
        """Bind to the consumer, made if missing.  From then on: items committed before
        it was made have had their turns.  The items the outbox publishes after a start
        with the items stream made again (every item of the log) reach the new consumer
        as new, though: where the store's positions are one commit order, the consumer
        keeps the store's last position as it was made, and the items up to it are not
        announced again (else every user message of the log would be, once more)."""
        js = self.nc.jetstream()
        stream = self.subjects.stream_name
        try:
            info = await js.consumer_info(stream, RECONCILER)
            floor = (info.config.metadata or {}).get(_COMMITTED_BEFORE, "")
            self._floor = int(floor) if floor.isdigit() else 0
        except nats.js.errors.NotFoundError:
            end = await self.committed_end() if self.committed_end is not None else 0
            self._floor = end
            try:
                await js.add_consumer(stream, ConsumerConfig(
                    name=RECONCILER, durable_name=RECONCILER,
                    description="convlog log service: republishes lost turn notices",
                    deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.ALL,
                    ack_wait=30.0, max_deliver=-1, filter_subject=self.subjects.items_all,
                    metadata={_COMMITTED_BEFORE: str(end)} if end else None,
                ))
                self.refused = ""
            except nats.js.errors.BadRequestError as e:  # created concurrently, or refused (said by run)
                self.refused = e.description or ""
        self._sub = await js.pull_subscribe_bind(durable=RECONCILER, stream=stream)

    async def run(self) -> None:
        """One sweep after another until cancelled (transient failures are waited out)."""
        failing = False
        try:
            while True:
                try:
                    if self._sub is None:
                        await self.bind()
                    if not self._caught_up:
                        await self.catch_up()
                        self._caught_up = True
                    await self.sweep()
                    if failing:
                        failing = False
                        log.warning("notice reconciler: working again")
                except Exception as e:
                    if not (is_transient(e) or isinstance(e, nats.errors.Error | nats.js.errors.Error)):
                        raise
                    # Once a streak, loudly: meanwhile no lost notice is redone (a consumer
                    # the items stream cannot make -- its max_consumers reached -- fails so
                    # at every sweep, for good, and was said at INFO every 2 s).
                    why = f" (the items stream refused its consumer: {self.refused})" if self.refused else ""
                    (log.info if failing else log.warning)(
                        "notice reconciler: %r%s; retrying (lost turn notices are not redone meanwhile)", e, why)
                    failing = True
                    await self.unbind()
                    # What a failed pull was handed never reached us, and the next sweep's
                    # ack (AckPolicy.ALL) would take it along: catch up again first.
                    self._caught_up = False
                await asyncio.sleep(self.interval)
        finally:
            await self.unbind()  # a pull subscription left behind holds up the connection's drain

    async def catch_up(self) -> int:
        """Redo the items the consumer handed out and nobody acked: a process that died
        holding them (its pull was handed them, it never handled them).  They would come
        again only after the consumer's ack wait, and the first ack of this process
        (AckPolicy.ALL: everything up to a message) came sooner and took them along, so
        their notices, maybe never published, were lost.  Returns notices republished."""
        js = self.nc.jetstream()
        stream = self.subjects.stream_name
        info = await js.consumer_info(stream, RECONCILER)
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        handed = info.delivered.stream_seq if info.delivered is not None else 0
        done = 0
        for seq in range((floor or 0) + 1, (handed or 0) + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue  # aged out or deleted: nothing to announce
            done += await self._redo(msg)
        return done

    async def unbind(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _held(self, head: Head, envelope: bytes) -> bool:
        # What the items stream holds is not trusted: a session id or an order no log holds
        # is not looked up (SQLite raises on an order beyond 64 bits, which stopped the
        # service, and the restart redid the message it had not acked).
        if _holdable(head):
            page = await self.store.read(head.session_id, after=head.item_order - 1, limit=1,
                                         max_bytes=len(envelope) + 1024)
            if page.items and page.items[0] == envelope:
                return True
        log.warning("items stream: %s #%d is not what the log holds; not announced",
                    head.session_id[:128], head.item_order)
        return False

    async def sweep(self) -> int:
        """Look at every item committed since the last sweep; returns notices republished."""
        assert self._sub is not None
        done = 0
        while self._backlog:
            done += await self._redo(self._backlog[0])
            self._backlog.popleft()
        while True:
            try:
                msgs = await self._sub.fetch(batch=256, timeout=0.5)
            except TimeoutError:
                # A cancel that lands as fetch's own timeout fires is lost in nats-py's
                # wait; the task still says it is being cancelled: honour that.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None
                return done
            for i, msg in enumerate(msgs):
                try:
                    done += await self._redo(msg)
                except BaseException:
                    # Kept, not handed back: a nak needs the connection that may just have
                    # failed, and a later sweep's ack would take these along unhandled.
                    self._backlog.extend(msgs[i:])
                    raise
            if msgs:
                await msgs[-1].ack()  # AckPolicy.ALL: everything up to it
            if len(msgs) < 256:
                return done

    async def _redo(self, msg: Any) -> int:
        """Republish the notice of the item ``msg`` carries if it needs it; 1 if it did."""
        if USER_MARK not in msg.data:
            return 0
        try:
            head = head_of.decode(msg.data)
        except msgspec.DecodeError:
            return 0
        if not is_user_message(head) or starts_no_turn(head.item_id):
            return 0
        msg_id = notice_msg_id(head.session_id, head.item_order)
        if await self.notifier.settled(msg_id) or not await self._held(head, msg.data):
            return 0
        if self._floor and (position := await self.store.position_of(head.session_id, head.item_order)) \
                is not None and position <= self._floor:
            return 0  # committed before the consumer was made (see bind)
        notice = Notice(session_id=head.session_id, item_order=head.item_order, ts=now())
        # The item's trace context (the outbox's or the store's header): the turn continues it.
        parent = (msg.headers or {}).get("traceparent")
        await publish_notice(self.nc, await self.notifier.address(head.session_id), notice, msg_id,
                             headers={"traceparent": parent} if parent else None)
        self.republished += 1
        return 1
