"""One wildcard inbox per object, its replies routed by the last token.

Used where many requests are in flight on one connection and each reply
needs only a lookup: the JetStream store's publish acks and batch gets
(``services/log/store/jetstream/api.py``) and the log service's turn-notice
acks (``services/log/pubacks.py``).  Each request gets the next token
(:meth:`RoutedInbox.token`); :meth:`RoutedInbox.route` gets every reply, as
nats-py parses it where the seam can (no queue, task switch or coroutine per
message: a batch get is thousands of them).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.nats_seam import seam_for

__all__ = ["Message", "RoutedInbox", "atomic_batch"]

#: (subject, body, headers)
Message = tuple[str, bytes, dict[str, str]]


def atomic_batch(messages: Sequence[Message]) -> list[Message]:
    """``messages`` framed as one JetStream atomic batch (ADR-50, ``allow_atomic``):
    a fresh ``Nats-Batch-Id``, ``Nats-Batch-Sequence`` from 1, and
    ``Nats-Batch-Commit`` on the last.  Publish all but the last with no reply;
    the last one's ack answers for the whole batch."""
    batch_id = uuid.uuid4().hex
    n = len(messages)
    framed: list[Message] = []
    for i, (subject, body, headers) in enumerate(messages, 1):
        batch = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
        if i == n:
            batch["Nats-Batch-Commit"] = "1"
        framed.append((subject, body, batch))
    return framed


class RoutedInbox:
    """Subclasses implement :meth:`route`; :meth:`start` before the first request."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._sub: Any | None = None
        self._next = 0
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        if self._sub is not None:
            return
        async with self._starting:  # two first requests at once: one subscription
            if self._sub is None:
                sub = await self._nc.subscribe(self._prefix + "*", cb=self._route_async)
                self._deliver(sub)
                self._sub = sub

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass

    def _deliver(self, sub: Any) -> None:
        seam_for(self._nc).deliver_inline(sub, self.route)

    def token(self) -> str:
        self._next += 1
        return str(self._next)

    def reply_to(self, token: str) -> str:
        return self._prefix + token

    def token_of(self, msg: Msg) -> str:
        return msg.subject[len(self._prefix) :]

    def route(self, msg: Msg) -> None:
        raise NotImplementedError

    async def _route_async(self, msg: Msg) -> None:
        self.route(msg)
