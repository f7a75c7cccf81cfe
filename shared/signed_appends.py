"""Signed appends, batched: the appends one client starts in one event-loop turn
share one signature (``shared.signing.sign_batch``) and go out together,
framed as one write.

An append queues its items and waits for its reply; on the next loop turn one
callback signs every queued append together, registers each one's reply and
hands the requests to one task that publishes them in order, as one write
(:func:`shared.wire.publish_many`).  So a signed
append wakes once, for its reply, as an unsigned one does (waking for the
signature and then publishing from each append cost a task switch more per
append).  The request is the same as any append's (same subject, same body
shape, same trace headers); what the first attempt leaves unknown (no reply in
time, no responders, a publish that failed on a reconnect, ``unavailable``) is
retried with the same body by :meth:`Requester._request <shared.requester.Requester._request>`.
"""

from __future__ import annotations

import asyncio
import time

import nats.errors
from nats.aio.msg import Msg

from . import tracing
from .codec import encode, unencodable
from .errors import BadRequestError, UnavailableError
from .messages import AppendItem, AppendRequest
from .requester import RETRY_ON, RETRYABLE, Requester
from .signing import MAX_BATCH, Signer, sign_batch
from .wire import publish_many

__all__ = ["SignedAppends"]


class _Append:
    """One queued append: its request, and then its body and reply token."""

    __slots__ = ("body", "end", "expected_last", "fut", "headers", "items", "sent", "sid", "subject", "token")

    def __init__(self, subject: str, sid: str, items: list[AppendItem], expected_last: int | None,
                 end: float, fut: asyncio.Future[Msg | None]) -> None:
        self.subject, self.sid, self.items, self.expected_last = subject, sid, items, expected_last
        self.end, self.fut = end, fut
        self.headers = tracing.headers()  # in the append's own span
        self.body = b""
        self.token = ""
        self.sent = 0.0


def _sign(signer: Signer, batch: list[_Append], size: int) -> bool:
    """Sign the items of ``batch`` (``size`` of them) in place; False: an
    error, set on each waiting append of the batch (none hangs)."""
    try:
        if size <= MAX_BATCH:
            signed = sign_batch(signer, [(a.sid, it) for a in batch for it in a.items])
            k = 0
            for a in batch:
                n = len(a.items)
                a.items, k = signed[k : k + n], k + n
        else:  # one append of more than MAX_BATCH items: signed in batches of its own
            batch[0].items = signer.sign_items(batch[0].sid, batch[0].items)
    except Exception as e:
        if isinstance(e, TypeError | UnicodeEncodeError):  # no JSON form: named (only one append is told)
            err: Exception = unencodable(batch[0].items, "$.items", e)
        else:
            err = BadRequestError(str(e)) if isinstance(e, ValueError) else e
        for a in batch if len(batch) == 1 else ():
            if not a.fut.done():
                a.fut.set_exception(err)
        return False
    return True


class SignedAppends:
    """The signed-append queue of one client (``client.signer`` signs)."""

    def __init__(self, client: Requester) -> None:
        self._client = client
        self._queue: list[_Append] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def append(self, subject: str, sid: str, items: list[AppendItem], expected_last: int | None) -> bytes:
        """Sign ``items`` with the others of this loop turn, send them; the reply body.

        Raises:
            BadRequestError: an item has no ``item_id`` (nothing is sent).
            ConvlogError: as :meth:`Requester._request`.
        """
        if any(it.item_id is None for it in items):  # (never joins a batch it would spoil)
            raise BadRequestError("an item must have its item_id before it is signed")
        c = self._client
        started = time.perf_counter()
        end = time.monotonic() + c.deadline
        if c._reply_sub is None:
            try:
                await c._subscribe_replies()
            except RETRYABLE as e:  # a closed (or closing) connection: nothing was sent
                raise UnavailableError(f"no reply on {subject}: {type(e).__name__} (not sent)") from e
        loop = asyncio.get_running_loop()
        a = _Append(subject, sid, items, expected_last, end, loop.create_future())
        if not self._queue:
            loop.call_soon(self._sign_pending)
        self._queue.append(a)
        first: Msg | None | BaseException
        try:
            first = await a.fut
        except RETRY_ON as e:  # the publish failed: outcome unknown, retried below
            first = e
        finally:
            if a.token:
                c._pending.pop(a.token, None)
        if c.observer is not None and isinstance(first, Msg):
            c.observer(subject, started, a.sent, time.perf_counter())
        return await c._request(subject, a.body, deadline=end - time.monotonic(), first=first)

    def _sign_pending(self) -> None:
        pending, self._queue = self._queue, []
        signer: Signer | None = getattr(self._client, "signer", None)
        assert signer is not None
        sends: list[_Append] = []
        at = 0
        while at < len(pending):
            batch, size = [pending[at]], len(pending[at].items)
            at += 1
            while at < len(pending) and size + len(pending[at].items) <= MAX_BATCH:
                batch.append(pending[at])
                size += len(pending[at].items)
                at += 1
            if _sign(signer, batch, size):
                sends += batch
                continue
            # Some append's items cannot be signed: each alone, so that only
            # its own caller hears of it, not the others of its turn.
            for a in batch if len(batch) > 1 else ():
                if _sign(signer, [a], len(a.items)):
                    sends.append(a)
        c = self._client
        now = time.monotonic()
        for a in sends:
            a.body = encode(AppendRequest(items=a.items, expected_last=a.expected_last))
            if not a.fut.done():  # (its caller may have been cancelled meanwhile)
                a.token = c._expect(a.fut, max(0.05, min(c.timeout, a.end - now)))
        if sends:
            task = asyncio.get_running_loop().create_task(self._publish(sends))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish(self, sends: list[_Append]) -> None:
        """The turn's requests in order, framed together and queued as one write
        (:func:`shared.wire.publish_many`; one by one through ``publish`` where
        that cannot be done): a few microseconds of Python less per append."""
        c = self._client
        prefix = c._reply_prefix
        sending = [a for a in sends if not a.fut.done()]
        try:
            refused = await publish_many(c.nc, [(a.subject, prefix + a.token, a.body, a.headers) for a in sending])
        except Exception as e:  # nothing known of what went out: each append retries its body
            for a in sending:
                if not a.fut.done():
                    a.fut.set_exception(e)
            return
        for i, e in refused:
            a = sending[i]
            if not a.fut.done():  # never sent; too large is a known outcome
                a.fut.set_exception(c.too_large(a.body) if isinstance(e, nats.errors.MaxPayloadError) else e)
        if c.observer is not None:
            sent = time.perf_counter()
            for a in sending:
                a.sent = sent
