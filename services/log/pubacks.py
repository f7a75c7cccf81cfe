"""JetStream publishes whose acks are awaited together: one flush, one wait.

``JetStreamContext.publish`` makes each message a request of its own (a
future, a timer, a task to await it, the ack parsed into a dataclass).  The
notifier publishes a turn notice per committed user message, so at a few
thousand appends a second that bookkeeping was a fifth of the log service's
time.  :class:`AckedPublisher` sends the messages of one commit back to back,
each with a reply subject under one inbox subscription, and waits for all
their acks at once.  What the stream answers is what ``js.publish`` would
raise: ``NoRespondersError`` (no stream captures the subject), an
``APIError`` (refused), or ``TimeoutError`` (no ack in time, so unknown).

:meth:`AckedPublisher.publish_together` goes further for a loaded service:
with ``sync_interval: always`` every message stored is one fsync, and the
notices were one of the three fsynced writes per user message.  An atomic
batch (``allow_atomic``, nats-server >= 2.12) is stored with one, for a
fixed few milliseconds whatever its size, one batch at a time per stream.
So the messages of calls that overlap are merged: while one atomic batch is
being stored the next calls wait and go together in the next; a call that
finds nothing in flight and has fewer than ``atomic_at`` messages is
published plainly (a lightly loaded service keeps the latency of a plain
publish).  A batch the stream refuses whole -- it holds a ``Nats-Msg-Id``
already stored (atomic batches do not drop duplicates, they refuse),
``allow_atomic`` is off, too many batches in flight -- is published again
message by message, so each message gets the outcome a plain publish gives
it (a duplicate is dropped, not an error).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import Header

from shared.inbox import Message, RoutedInbox, atomic_batch
from shared.merging import Merger
from shared.nats_seam import seam_for
from shared.wire import frame, over_max_payload

__all__ = ["AckedPublisher"]

log = logging.getLogger("convlog.log.pubacks")

_STATUS = Header.STATUS.value
_NO_RESPONDERS = "503"
_ATOMIC_DISABLED = 10174  # the stream has no allow_atomic
#: Most messages in one merged atomic batch (the server allows 1000; notices carry envelopes).
MAX_ATOMIC = 256

def _ack_error(msg: Msg) -> Exception | None:
    """What ``js.publish`` would raise for this ack (``None``: stored or a duplicate)."""
    if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
        return nats.errors.NoRespondersError()
    if b'"error"' not in msg.data:
        return None
    try:
        reply = json.loads(msg.data)
    except ValueError as e:
        return nats.js.errors.Error(f"undecodable publish ack: {e}")
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        try:
            nats.js.errors.APIError.from_error(reply["error"])  # raises the typed error
        except nats.js.errors.Error as e:
            return e
        return nats.js.errors.APIError(description=str(reply["error"]))
    return None


class AckedPublisher(RoutedInbox):
    """Publishes to JetStream and collects the acks (see the module docstring).

    Args:
        nc: the connection.
        atomic_at: messages from which a call of :meth:`publish_together`
            that finds no batch in flight starts an atomic batch.
    """

    def __init__(self, nc: Client, *, atomic_at: int = 4) -> None:
        super().__init__(nc)
        self.atomic_at = atomic_at
        self.atomic = True  # until a stream says it has no allow_atomic
        self.batches = 0  # atomic batches stored (stats, tests)
        self.fallbacks = 0  # atomic batches refused whole and published message by message
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._together: Merger[tuple[list[Message], float], list[Exception | None]] = Merger(
            self._send_group,
            size=lambda call: len(call[0]),
            limit=MAX_ATOMIC,
            stopped=lambda call: [nats.errors.Error("publishing stopped")] * len(call[0]),
            name="convlog-notice-batches",
        )

    async def close(self) -> None:
        """Stop sending batches (what was queued gets an error: the
        reconciler republishes it), then unsubscribe."""
        await self._together.close()
        await super().close()

    def route(self, msg: Msg) -> None:
        fut = self._waiting.pop(self.token_of(msg), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def publish(
        self, messages: list[tuple[str, bytes, dict[str, str]]], *, wait: float = 5.0
    ) -> list[Exception | None]:
        """Publish ``(subject, payload, headers)`` in order; per message, ``None`` once
        the stream holds it (or dropped it as a duplicate), else the error."""
        await self.start()
        sent: list[tuple[str, asyncio.Future[Msg]]] = []
        refused: dict[int, Exception] = {}
        try:
            for i, (subject, payload, headers) in enumerate(messages):
                if headers is not None and over_max_payload(self._nc, payload, headers):
                    # publish would send it, and the server close the connection: refused alone
                    refused[i] = nats.errors.MaxPayloadError()
                    continue
                token = self.token()
                sent.append((token, self._future(token)))
                await self._nc.publish(subject, payload, reply=self.reply_to(token), headers=headers)
        except nats.errors.Error as e:  # not (all) sent: those not acked share the outcome
            outcomes = [_ack_error(f.result()) if f.done() else e for _, f in sent]
            self._forget(sent)
            outcomes += [e] * (len(messages) - len(sent) - len(refused))
        else:
            outcomes = await self._acked(sent, wait)
        for i in sorted(refused):
            outcomes.insert(i, refused[i])
        return outcomes

    def publish_now(self, messages: list[Message], *, wait: float = 5.0
                    ) -> Coroutine[Any, Any, list[Exception | None]] | None:
        """Like :meth:`publish`, but the messages reach the socket before this returns
        (no task or flusher turn: ahead of whatever the caller's event-loop turn queues
        next); await the result for the outcomes.  ``None``: nothing was sent (the inbox
        is not subscribed yet, something is queued on the connection, a message is
        refused, the public seam): use :meth:`publish`."""
        if self._sub is None or not messages:
            return None
        tokens = [self.token() for _ in messages]
        try:
            frames = b"".join(frame(s, self.reply_to(t), p, h, self._nc.max_payload)
                              for t, (s, p, h) in zip(tokens, messages, strict=True))
        except Exception:  # refused (a bad subject, too large): publish says which
            return None
        sent = [(t, self._future(t)) for t in tokens]
        if not seam_for(self._nc).write_now(self._nc, frames, len(tokens), sum(len(m[1]) for m in messages)):
            self._forget(sent)
            return None
        return self._acked(sent, wait)

    def _future(self, token: str) -> asyncio.Future[Msg]:
        """The future the ack replied to ``token`` resolves."""
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        return fut

    def _forget(self, sent: list[tuple[str, asyncio.Future[Msg]]]) -> None:
        for token, fut in sent:
            self._waiting.pop(token, None)
            fut.cancel()

    async def _acked(self, sent: list[tuple[str, asyncio.Future[Msg]]], wait: float) -> list[Exception | None]:
        """Wait up to ``wait`` for the acks of ``sent``: per message, ``None`` or the error."""
        if not sent:  # (every message refused before sending: asyncio.wait refuses an empty set)
            return []
        try:
            await asyncio.wait([f for _, f in sent], timeout=wait)
            return [_ack_error(f.result()) if f.done() else TimeoutError() for _, f in sent]
        finally:
            self._forget(sent)

    async def publish_together(self, messages: list[Message], *, wait: float = 5.0) -> list[Exception | None]:
        """Like :meth:`publish` (the same outcome per message), merging the
        messages of overlapping calls into atomic batches (module docstring).
        Only messages to one stream may be given."""
        if not messages:
            return []
        if not self.atomic or (not self._together.busy and len(messages) < self.atomic_at):
            return await self.publish(messages, wait=wait)
        return await self._together.submit((messages, wait))

    async def _send_group(self, group: list[tuple[list[Message], float]]) -> list[list[Exception | None]]:
        """One merged group of :meth:`publish_together` calls: each call's outcomes."""
        flat = [m for msgs, _ in group for m in msgs]
        try:
            outcomes = await self._atomic_or_each(flat, max(wait for _, wait in group))
        except Exception as e:  # a bug: every message of the group shares it
            outcomes = [e] * len(flat)
        split, at = [], 0
        for msgs, _ in group:
            split.append(outcomes[at : at + len(msgs)])
            at += len(msgs)
        return split

    async def _atomic_or_each(self, messages: list[Message], wait: float) -> list[Exception | None]:
        """One atomic batch (several messages, while the stream allows it), else
        (or when the stream refuses the batch whole) one publish each."""
        if len(messages) < 2 or not self.atomic or any(
            h is not None and over_max_payload(self._nc, p, h) for _, p, h in messages
        ):  # (one too large with its headers is refused alone, not the whole batch)
            return await self.publish(messages, wait=wait)
        err = await self._publish_atomic(messages, wait)
        if err is None:
            self.batches += 1
            return [None] * len(messages)
        if not isinstance(err, nats.js.errors.APIError):
            # No stream, no connection, or no answer (stored or not: a later
            # publish of the same ids is dropped or stores them): as a plain publish.
            return [err] * len(messages)
        if err.err_code == _ATOMIC_DISABLED:
            self.atomic = False
            log.warning("the work stream does not allow atomic batches: turn notices go one publish each")
        self.fallbacks += 1  # refused whole: nothing of it was stored
        return await self.publish(messages, wait=wait)

    async def _publish_atomic(self, messages: list[Message], wait: float) -> Exception | None:
        """``None`` once the stream stored every message; else why not."""
        await self.start()
        *leading, (subject, payload, final) = atomic_batch(messages)
        token = self.token()
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        try:
            for lead_subject, lead_payload, lead_headers in leading:
                await self._nc.publish(lead_subject, lead_payload, headers=lead_headers)
            await self._nc.publish(subject, payload, reply=self.reply_to(token), headers=final)
            done, _ = await asyncio.wait([fut], timeout=wait)
            return _ack_error(fut.result()) if done else TimeoutError()
        except nats.errors.Error as e:
            return e
        finally:
            self._waiting.pop(token, None)
            fut.cancel()
