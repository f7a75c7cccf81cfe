"""The active agent of each session: the log is the truth, NATS KV a checkpoint.

Routing state is agent metadata, not conversation, so it lives outside the log
in the KV bucket ``<prefix>_routing``, keyed by session id.  A value
``{"active": "L1Billing", "order": 7, "entry": "Triage"}`` is a *checkpoint*
(:class:`shared.routing.RoutingCheckpoint`, encoded and decoded only by
``shared.routing``): "after item 7, L1Billing is the active agent; the session
started at Triage".  The log service writes ``{"active": <to>, "order": 0,
"entry": <to>}`` (create-only) when a user message with ``to`` starts a
session, before the message is appended.

The active agent before item ``n`` is computed, never trusted: start from the
checkpoint (or the entry agent at order 0 when the checkpoint is missing or not
older than ``n``) and replay the log's handoff outputs
(``function_call_output`` whose output is ``{"assistant": X}``) up to ``n``.
The log prefix before ``n`` never changes, so every replica and every
redelivery computes the same agent for the same user message.  Checkpoints
only move forward (compare-and-set on the KV revision), so a stale writer
cannot move one back, and :meth:`Routing.rebuild` recomputes one from the
whole log.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.js.errors

from shared.client import LogClient
from shared.failures import is_transient
from shared.messages import Envelope
from shared.routing import (
    RoutingCheckpoint,
    decode_checkpoint,
    encode_checkpoint,
    open_routing_bucket,
)

from .convert import parse_handoff_output
from .spec import SystemSpec

__all__ = ["Checkpoint", "Routing", "handoff_target", "open_routing_bucket"]

log = logging.getLogger("convlog.worker.routing")

_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)
_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One KV value: ``active`` is the active agent after item ``order``.

    Attributes:
        active: the active agent.
        order: the ``item_order`` the checkpoint is valid after (0: before any item).
        entry: the session's entry agent, if recorded.
        revision: the KV revision (for compare-and-set), ``None`` if not stored.
    """

    active: str
    order: int
    entry: str | None = None
    revision: int | None = None


def handoff_target(env: Envelope) -> str | None:
    """The agent a handoff output hands the conversation to, or ``None``."""
    if env.kind != "item" or env.data.get("type") != "function_call_output":
        return None
    return parse_handoff_output(env.data.get("output"))


class Routing:
    """Compute and checkpoint the active agent of sessions.

    Args:
        kv: the routing KV bucket (see :func:`open_routing_bucket`).
        client: reads the log.
        spec: the agent system (entry agent, known agents).
        checkpoint_every: after replaying at least this many items to answer
            :meth:`active_agent`, store a new checkpoint so the next answer is cheap.
    """

    def __init__(
        self, kv: Any, client: LogClient, spec: SystemSpec, *, checkpoint_every: int = 32
    ) -> None:
        self.kv = kv
        self.client = client
        self.spec = spec
        self.checkpoint_every = checkpoint_every

    async def checkpoint(self, session_id: str) -> Checkpoint | None:
        """The stored checkpoint, or ``None`` (missing, deleted or unreadable)."""
        try:
            entry = await self.kv.get(session_id)
        except _MISSING:
            return None
        try:
            value = decode_checkpoint(entry.value or b"")
        except msgspec.DecodeError as e:  # ValidationError included
            log.warning("routing checkpoint of %s is unreadable (%s); ignoring it", session_id, e)
            return None
        return Checkpoint(
            active=value.active, order=value.order, entry=value.entry, revision=entry.revision
        )

    def _entry(self, cp: Checkpoint | None) -> str:
        entry = cp.entry if cp is not None and cp.entry else self.spec.entry
        if entry not in self.spec.agents:
            log.warning("entry agent %r is not in the spec; using %r", entry, self.spec.entry)
            return self.spec.entry
        return entry

    async def active_agent(self, session_id: str, before_order: int) -> str:
        """The active agent once every item before ``before_order`` is applied.

        For a user message at order ``n``, ``active_agent(sid, n)`` is the agent
        that answers it.  Handoffs to agents the spec does not know are ignored.
        """
        cp = await self.checkpoint(session_id)
        entry = self._entry(cp)
        if cp is not None and cp.order < before_order and cp.active in self.spec.agents:
            agent, after = cp.active, cp.order
        else:
            agent, after = entry, 0
        scanned = 0
        async for env in self._between(session_id, after, before_order):
            scanned += 1
            target = handoff_target(env)
            if target is not None and target in self.spec.agents:
                agent = target
        if scanned >= self.checkpoint_every:
            try:
                await self.advance(session_id, agent, before_order - 1, entry=entry)
            except Exception as e:
                # A checkpoint is an optimisation: NATS or the KV refusing it
                # never fails a turn.  A bug here would, loudly.
                if not (is_transient(e) or isinstance(e, nats.js.errors.Error)):
                    raise
                log.log(logging.INFO if is_transient(e) else logging.WARNING,
                        "could not checkpoint routing of %s: %s", session_id, e)
        return agent

    async def advance(
        self, session_id: str, active: str, order: int, *, entry: str | None = None
    ) -> bool:
        """Store "``active`` after item ``order``" unless a checkpoint at or after it exists.

        Returns:
            True if this call stored the checkpoint.
        """
        for _ in range(10):
            cp = await self.checkpoint(session_id)
            if cp is not None and cp.order >= order:
                return False
            value = encode_checkpoint(
                RoutingCheckpoint(active=active, order=order, entry=entry or self._entry(cp))
            )
            try:
                if cp is None or cp.revision is None:
                    await self.kv.create(session_id, value)
                else:
                    await self.kv.update(session_id, value, last=cp.revision)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # someone else wrote: look again
        return False

    async def rebuild(self, session_id: str) -> Checkpoint | None:
        """Recompute the checkpoint from the whole log and store it (overwriting).

        Returns:
            The stored checkpoint, or ``None`` for a session with no items.
        """
        cp = await self.checkpoint(session_id)
        entry = self._entry(cp)
        agent, last = entry, 0
        async for env in self.client.iter_items(session_id, raw=True):
            last = env.item_order
            target = handoff_target(env)
            if target is not None and target in self.spec.agents:
                agent = target
        if last == 0:
            return None
        value = encode_checkpoint(RoutingCheckpoint(active=agent, order=last, entry=entry))
        revision = await self.kv.put(session_id, value)
        return Checkpoint(active=agent, order=last, entry=entry, revision=revision)

    async def _between(self, session_id: str, after: int, before: int) -> AsyncIterator[Envelope]:
        """Every envelope with ``after < item_order < before``."""
        while after < before - 1:
            rep = await self.client.read(
                session_id, after=after, limit=min(before - 1 - after, _PAGE), raw=True
            )
            if not rep.items:
                return
            for env in rep.items:
                if env.item_order >= before:
                    return
                yield env
            after = rep.items[-1].item_order
