"""Routing checkpoints from committed handoff items: the log service writes them.

Workers used to checkpoint the active agent themselves, so every agent's NATS
user could write every session's routing value -- and a stolen agent
credential could move a session to another agent.  Now the only writer of
the routing bucket is the log service: the entry agent of a new session
(``to``, see :mod:`.handlers`) and, after each committed handoff item, "after
this item its target is active" (``{"active": X, "order": <the handoff's
item_order>, "entry": ...}``).  Such a checkpoint always names an item of the
log, so a worker checks it against that item before it relies on it (the log
wins; :mod:`services.worker.routing`).

The listener runs on the commit path and only notes handoffs; a task writes
them (compare-and-set on the KV revision, forward only), so a failed write
never holds back a commit: the log keeps the handoff, and workers replay it.
The task starts writing :data:`DELAY` after the first handoff it has to
write (and again after each round of writes): a handoff's commit is when
its turn is most in a hurry -- the append's reply to the handing-off worker,
the target's notice -- and the two KV requests made right then competed with both
(``convlog bench --turns``: the next agent's notice delivered 0-0.25 ms
later at p50 in four same-run comparisons).  Handoffs of one session committed meanwhile are written as
one (the newest).  A checkpoint read in between is older, which only makes a
worker's replay of the log longer, never its answer different
(:mod:`services.worker.routing`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgspec

from shared.messages import AgentName
from shared.routing import (
    RoutingCheckpoint,
    decode_checkpoint,
    encode_checkpoint,
    handoff_target_of,
)

from .kv_forward import put_forward
from .store.base import Committed

__all__ = ["DELAY", "RoutingWriter"]

log = logging.getLogger("convlog.log.routing")

_Item = msgspec.json.Decoder(dict)
#: Seconds between a handoff's commit and the start of the checkpoint writes (see the module).
DELAY = 0.02


def _agent_name(target: str) -> bool:
    """Whether ``target`` can be an agent's name (a checkpoint naming it decodes).

    A tool's output may read as a handoff to a name no agent can have (``""``,
    a sentence): a checkpoint naming it would not decode, and workers, ignoring
    it, would fall back to the spec's entry agent -- losing a ``to``'s entry.
    Workers ignore handoffs to agents they do not know; so does the writer here.
    """
    try:
        msgspec.convert(target, AgentName)
    except msgspec.ValidationError:
        return False
    return True


class RoutingWriter:
    """Writes a routing checkpoint for each committed handoff.

    Args:
        kv: the routing KV bucket.
        delay: seconds a round of writes waits before it starts (see the module).
    """

    def __init__(self, kv: Any, *, delay: float = DELAY) -> None:
        self._kv = kv
        self.delay = delay
        self.writes = 0  # checkpoints stored (stats, tests)
        self._pending: dict[str, tuple[int, str]] = {}  # sid -> (order, target), the newest
        self._task: asyncio.Task[None] | None = None

    def on_commit(self, batch: Sequence[Committed]) -> None:
        """Commit listener: note each handoff (only the cheap test runs for every item)."""
        for c in batch:
            if b'"function_call_output"' not in c.envelope:
                continue
            env = _Item.decode(c.envelope)
            target = handoff_target_of(str(env.get("kind")), env.get("data") or {})
            if target is not None:
                self.note(c.session_id, c.item_order, target)

    def note(self, sid: str, order: int, target: str) -> None:
        """Checkpoint the handoff of ``sid`` at ``order`` to ``target`` (unless a newer one
        of the session is pending): a committed one, or one the log holds whose
        checkpoint is missing (:meth:`.notices.Notifier.address`)."""
        if not _agent_name(target):
            return
        pending = self._pending.get(sid)
        if pending is None or pending[0] < order:
            self._pending[sid] = (order, target)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(self.delay)  # out of the way of the turn that just handed off
            pending, self._pending = self._pending, {}
            for sid, (order, target) in pending.items():
                try:
                    await self._write(sid, order, target)
                except Exception as e:  # the log holds the handoff; workers replay it
                    log.warning("could not checkpoint the handoff of %s at #%d to %s: %s: %s",
                                sid, order, target, type(e).__name__, e)

    async def _write(self, sid: str, order: int, target: str) -> None:
        def over(stored: bytes | None) -> bytes | None:
            current = None
            if stored is not None:
                try:
                    current = decode_checkpoint(stored or b"")
                except msgspec.DecodeError:
                    current = None  # unreadable: overwrite it
                if current is not None and current.order >= order:
                    return None
            return encode_checkpoint(RoutingCheckpoint(
                active=target, order=order, entry=current.entry if current is not None else None,
                entry_proof=current.entry_proof if current is not None else None))

        if await put_forward(self._kv, sid, over):
            self.writes += 1

    async def stop(self) -> None:
        """Finish the writes already noted (after their delay)."""
        if self._task is not None and not self._task.done():
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(self._task)
            except (TimeoutError, Exception):
                self._task.cancel()
