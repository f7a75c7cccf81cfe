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
"""

from __future__ import annotations

import asyncio
import json

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import Header

from shared.inbox import RoutedInbox

__all__ = ["AckedPublisher"]

_STATUS = Header.STATUS.value
_NO_RESPONDERS = "503"


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
    """Publishes to JetStream and collects the acks (see the module docstring)."""

    def __init__(self, nc: Client) -> None:
        super().__init__(nc)
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

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
        loop = asyncio.get_running_loop()
        sent: list[tuple[str, asyncio.Future[Msg]]] = []
        outcomes: list[Exception | None] = []
        try:
            for subject, payload, headers in messages:
                token = self.token()
                fut: asyncio.Future[Msg] = loop.create_future()
                self._waiting[token] = fut
                sent.append((token, fut))
                await self._nc.publish(subject, payload, reply=self.reply_to(token), headers=headers)
            await asyncio.wait([f for _, f in sent], timeout=wait)
            for _, fut in sent:
                outcomes.append(_ack_error(fut.result()) if fut.done() else TimeoutError())
        except nats.errors.Error as e:  # not (all) sent: those not acked share the outcome
            outcomes = [_ack_error(f.result()) if f.done() else e for _, f in sent]
            outcomes += [e] * (len(messages) - len(outcomes))
        finally:
            for token, fut in sent:
                self._waiting.pop(token, None)
                fut.cancel()
        return outcomes
