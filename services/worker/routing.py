"""The active agent of each session: the log is the truth, NATS KV a checkpoint.

Routing state is agent metadata, not conversation, so it lives outside the log
in the KV bucket ``<prefix>_routing``, keyed by session id.  A value
``{"active": "L1Billing", "order": 7, "entry": "Triage"}`` is a *checkpoint*
(:class:`shared.routing.RoutingCheckpoint`, encoded and decoded only by
``shared.routing``): "after item 7, L1Billing is the active agent; the session
started at Triage".  Only the log service writes the bucket: ``{"active":
<to>, "order": 0, "entry": <to>}`` (create-only) when a user message with
``to`` starts a session, and ``{"active": X, "order": n}`` after it commits a
handoff to X at ``item_order`` n (``services.log.routing_writer``).  Workers
only read it.

The active agent before item ``n`` is computed, never trusted: a checkpoint
is used only if the log agrees with it -- the item at its ``order`` is a
handoff to its ``active`` agent (or, at order 0, ``active`` is the entry);
otherwise the mismatch is logged and the worker replays the whole log (the
log wins).  From the checkpoint (or the entry agent at order 0), the log's
handoff outputs (``function_call_output`` whose output is ``{"assistant":
X}``) are replayed up to ``n``.  A checkpoint that cites an older genuine
handoff only makes the replay longer, never its answer different.  The log
prefix before ``n`` never changes, so every replica and every redelivery
computes the same agent for the same user message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.js.errors

from shared.client import LogClient
from shared.messages import Envelope
from shared.routing import (
    EntryProof,
    RoutingCheckpoint,
    decode_checkpoint,
    encode_checkpoint,
    handoff_target_of,
    open_routing_bucket,
)
from shared.signing import USER_AGENT, Keyring, route_signing_input, verify_signature

from .spec import SystemSpec

__all__ = ["Checkpoint", "Routing", "handoff_target", "open_routing_bucket"]

log = logging.getLogger("convlog.worker.routing")

_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)
_PAGE = 1000
#: How many of a session's first items are searched for the message an entry proof names
#: (the first message, unless first messages raced).
_ENTRY_WINDOW = 8


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One KV value: ``active`` is the active agent after item ``order``.

    Attributes:
        active: the active agent.
        order: the ``item_order`` the checkpoint is valid after (0: before any item).
        entry: the session's entry agent, if recorded.
        revision: the KV revision (for compare-and-set), ``None`` if not stored.
        entry_proof: the gateway's signature of ``entry``, if recorded.
    """

    active: str
    order: int
    entry: str | None = None
    revision: int | None = None
    entry_proof: EntryProof | None = None


def handoff_target(env: Envelope) -> str | None:
    """The agent a handoff output hands the conversation to, or ``None``."""
    return handoff_target_of(env.kind, env.data)


class Routing:
    """Compute and checkpoint the active agent of sessions.

    Args:
        kv: the routing KV bucket (see :func:`open_routing_bucket`).
        client: reads the log.
        spec: the agent system (entry agent, known agents).
        keyring: with it, a session's entry agent other than the spec's counts only
            with the gateway's signature of it (``entry_proof``, the message's ``to_sig``).
        require: signatures are required: an entry without that signature is refused
            (otherwise only a present, bad one is).
    """

    def __init__(self, kv: Any, client: LogClient, spec: SystemSpec, *,
                 keyring: Keyring | None = None, require: bool = False) -> None:
        self.kv = kv
        self.client = client
        self.spec = spec
        self.keyring = keyring
        self.require = require

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
        return Checkpoint(active=value.active, order=value.order, entry=value.entry,
                          revision=entry.revision, entry_proof=value.entry_proof)

    def spec_entry(self, entry: str | None) -> str:
        """``entry`` if it is an agent of the spec, else the spec's entry agent."""
        if not entry:
            return self.spec.entry
        if entry not in self.spec.agents:
            log.warning("entry agent %r is not in the spec; using %r", entry, self.spec.entry)
            return self.spec.entry
        return entry

    async def _entry(self, session_id: str, cp: Checkpoint | None) -> str:
        entry = self.spec_entry(cp.entry if cp is not None else None)
        if cp is None or entry != cp.entry:  # none stored, or not an agent of the spec
            return entry
        at = await self._proof_at(session_id, cp.entry_proof)
        if (why := self._unsigned_entry(session_id, cp, at)) is not None:
            signed = self._signed_entry(session_id, cp, at)
            log.warning("routing entry of %s says %r, but %s: ignoring it and using %r", session_id,
                        entry, why, signed or self.spec.entry)
            return signed or self.spec.entry
        return entry

    async def _proof_at(self, session_id: str, proof: EntryProof | None) -> str | None:
        """When the gateway signed ``proof``, if its key has been retired since: the
        ``created_at`` of the message it names, found among the session's first items
        and signed by the same key (a rotated key's earlier signatures still count);
        ``None`` (checked as of now, when a retired key counts for nothing) otherwise."""
        key = self.keyring.get(proof.key_id) if self.keyring is not None and proof is not None else None
        if proof is None or key is None or key.retired_at is None:
            return None
        after, seen = 0, 0
        while seen < _ENTRY_WINDOW:  # a page of large items can stop short of the window
            page = await self.client.read(session_id, after=after, limit=_ENTRY_WINDOW - seen, raw=True)
            held = next((e for e in page.items if e.item_id == proof.item_id), None)
            if held is not None:
                return held.created_at if held.key_id == proof.key_id else None
            if not page.more or not page.items:
                break
            seen, after = seen + len(page.items), page.items[-1].item_order
        return None

    def _signed_entry(self, session_id: str, cp: Checkpoint, at: str | None) -> str | None:
        """The agent the gateway's ``to_sig`` of ``cp`` does sign, if one of the spec's."""
        proof = cp.entry_proof
        if proof is None or self.keyring is None:
            return None
        if self.keyring.refusal(proof.key_id, USER_AGENT, via_inbound=True, at=at) is not None:
            return None
        return next((a for a in self.spec.agents if verify_signature(
            proof.key_id, route_signing_input(session_id, proof.item_id, a), proof.to_sig)), None)

    def _unsigned_entry(self, session_id: str, cp: Checkpoint, at: str | None) -> str | None:
        """Why the gateway did not sign ``cp.entry`` for this session, or ``None``."""
        proof = cp.entry_proof
        if self.keyring is None or cp.entry == self.spec.entry:
            return None
        if proof is None:
            return "the gateway's signature of it is missing" if self.require else None
        if (reason := self.keyring.refusal(proof.key_id, USER_AGENT, via_inbound=True, at=at)) is not None:
            return reason
        if not verify_signature(proof.key_id, route_signing_input(session_id, proof.item_id, cp.entry),
                                proof.to_sig):
            return "the gateway's signature does not match it"
        return None

    def after_handoffs(self, agent: str, envs: Iterable[Envelope]) -> str:
        """The active agent once ``envs`` are applied to ``agent``: each handoff to
        an agent of the spec moves it on (handoffs to unknown agents are ignored)."""
        for env in envs:
            target = handoff_target(env)
            if target is not None and target in self.spec.agents:
                agent = target
        return agent

    async def active_agent(self, session_id: str, before_order: int, *,
                           known: tuple[int, str] | None = None) -> str:
        """The active agent once every item before ``before_order`` is applied.

        For a user message at order ``n``, ``active_agent(sid, n)`` is the agent
        that answers it.  Handoffs to agents the spec does not know are ignored.
        ``known``: ``(order, agent)``, what the caller learnt from the log before
        (``agent`` is active once the items up to ``order`` are applied); the log
        is read from the later of it and the checkpoint, so a session's long run
        without handoffs is not read again from its last handoff.
        """
        cp = await self.checkpoint(session_id)
        entry = await self._entry(session_id, cp)
        agent, after = entry, 0
        if cp is not None and cp.order < before_order and await self._log_agrees(session_id, cp, entry):
            agent, after = cp.active, cp.order
        if known is not None and after < known[0] < before_order and known[1] in self.spec.agents:
            after, agent = known
        return self.after_handoffs(agent, [env async for env in self._between(session_id, after, before_order)])

    async def _log_agrees(self, session_id: str, cp: Checkpoint, entry: str) -> bool:
        """Whether the log holds what ``cp`` claims (logged loudly when not)."""
        if cp.active not in self.spec.agents:
            found = f"{cp.active!r} is no agent of the spec"
        elif cp.order == 0:
            if cp.active == entry:
                return True
            found = f"at order 0 the active agent must be the entry agent {entry!r}"
        else:
            page = await self.client.read(session_id, after=cp.order - 1, limit=1, raw=True)
            held = page.items[0] if page.items else None
            if held is not None and held.item_order == cp.order and handoff_target(held) == cp.active:
                return True
            found = (f"the log's item #{cp.order} is no handoff to {cp.active!r}" if held is not None
                     else f"the log has no item #{cp.order}")
        log.warning("routing checkpoint of %s says %s is active after #%d, but %s: "
                    "ignoring it and following the log", session_id, cp.active, cp.order, found)
        return False

    async def rebuild(self, session_id: str) -> Checkpoint | None:
        """Recompute the checkpoint from the whole log and store it (overwriting;
        an operator's tool: it needs write access to the bucket, which workers do not have).

        The checkpoint names the last handoff (order 0 and the entry agent without one),
        so workers can check it against the log.  The entry agent is not in the log: it
        is taken from the stored value, and without one it is the spec's (a ``to`` lost
        from the bucket is not recovered).

        Returns:
            The stored checkpoint, or ``None`` for a session with no items.
        """
        cp = await self.checkpoint(session_id)
        entry = await self._entry(session_id, cp)
        agent, last, seen = entry, 0, 0
        async for env in self.client.iter_items(session_id, raw=True):
            seen = env.item_order
            target = handoff_target(env)
            if target is not None and target in self.spec.agents:
                agent, last = target, env.item_order
        if seen == 0:
            return None
        proof = cp.entry_proof if cp is not None and cp.entry == entry else None
        value = encode_checkpoint(RoutingCheckpoint(active=agent, order=last, entry=entry, entry_proof=proof))
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
