"""The write side of the JetStream store: each append, checked by the server.

The group committer hands over whatever requests arrived, with at most one
batch in flight per session (see :class:`~..committer.GroupCommitter`).
Sessions go in parallel; a session's requests go one after another, each
decided on the session's head as this instance knows it and published with:

* ``Nats-Expected-Last-Subject-Sequence`` = the stream sequence of that head,
  and ``Nats-Expected-Last-Subject-Sequence-Subject`` = the session's
  wildcard ``<prefix>.log.<k>.<sid>.*`` (on the first message): if another
  instance moved the head on, the server refuses (10071);
* one subject per ``item_id`` in a stream that takes one message per subject:
  an id stored before is refused (10077).

A one-item append is one plain publish (no batch to stage; many in flight);
a multi-item append is one atomic batch (ADR-50), stored whole or not at all.
An atomic batch costs the server a fixed few ms on a file stream (it stages
the batch; a stream stores its batches one after another) against well
under 1 ms for a plain publish, but then stores its messages with one fsync
and at nearly no cost each.  So a group commit of at least two new items,
when they and the publishes still waiting for their acks number
``combine_at`` or more (the server is behind: a loaded service), goes in one
atomic batch per shard, every session's first item carrying its own
expectation; group commits made while a shard's combined batch is stored
ride the next one (:func:`_combiner`); a lightly loaded service keeps the
latency of plain publishes.
If the server refuses a combined batch (it does not say for which session),
each session is retried on its own.

On a refusal the session's head is read fresh (and, when an id was
taken, the request's ids are looked up: a direct get on each id's subject
returns its envelope), and the request is decided again — a retry becomes a
``duplicate`` with its original order and hash, a moved head a new order or a
``conflict``.  A ``conflict`` or a bad retract is only ever reported against a
head freshly read from the stream.  A ``duplicate`` ack or a lost answer is
settled against the stream first (:mod:`.settle`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from shared.errors import ConvlogError, TooLargeError, UnavailableError
from shared.merging import Merger
from shared.messages import AppendRequest

from ..base import Committed
from ..committer import Outcome, Pending
from ..ordering import Existing, Row, SessionState, decide, now_rfc3339, stored_entry
from .api import (
    EXPECTED_LAST_SUBJECT_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ_SUBJECT,
    MSG_ID,
    Acks,
    IdTaken,
    Message,
    OutcomeUnknown,
    Refused,
    WrongLastSequence,
)
from .index import Meta, SessionIndex
from .layout import Layout
from .reads import StreamReads
from .settle import OutcomeStillUnknown, Settler

__all__ = ["MAX_BATCH_MESSAGES", "MAX_ITEMS_PER_APPEND", "BatchWriter", "OutcomeStillUnknown", "position"]

log = logging.getLogger("convlog.store.jetstream")

#: The server's limit on one atomic batch (ADR-50).
MAX_BATCH_MESSAGES = 1000
#: Each item is one message.
MAX_ITEMS_PER_APPEND = MAX_BATCH_MESSAGES
_ATTEMPTS = 16

_meta = msgspec.json.Decoder(Meta)


def position(seq: int, shard: int, shards: int) -> int:
    """A commit's global position: its stream sequence, interleaved over the
    shards (``seq * shards + shard``).  With one shard it is the sequence:
    one total order.  With more it rises with ``item_order`` in every
    session (a session lives in one shard), and shards interleave by
    sequence, not by time."""
    return seq * shards + shard


@dataclass(slots=True)
class _Part:
    """One session's share of a combined batch."""

    sid: str
    index: SessionIndex
    idx: list[int]
    replies: list[Outcome]
    rows: list[Row]
    head_seq: int = 0  # the stream sequence of the head the rows were decided on
    traces: list[str | None] = field(default_factory=list)  # per row: its request's traceparent
    seqs: list[int] = field(default_factory=list)  # once stored


def _combiner(store: Callable[[list[_Part]], Awaitable[bool]]) -> Merger[list[_Part], bool]:
    """One shard's combined batches: one at a time, each taking every group
    commit's parts that arrived while the one before was stored.

    The server stores a shard's atomic batches one after another, each for a
    fixed few milliseconds whatever its size (and one fsync); so group commits
    that overlap (the committer has many in flight, over disjoint sessions)
    would queue as many small batches and cap the shard at a few hundred of
    them a second.  Merged, the batch grows with the load instead.  A batch
    cut off by a shutdown counts as refused: its sessions are decided again
    against the stream, which says whether it was stored.
    """

    async def run(group: list[list[_Part]]) -> list[bool]:
        ok = await store([p for parts in group for p in parts])
        return [ok] * len(group)

    return Merger(
        run,
        size=lambda parts: sum(len(p.rows) for p in parts),
        limit=MAX_BATCH_MESSAGES,
        stopped=lambda parts: False,
        name="convlog-combiner",
    )


class BatchWriter:
    """Decides and stores the appends of one store instance.

    Args:
        acks: returns the store's publisher.
        layout: the store's subjects.
        reads: the read side, whose session cache this writer keeps current.
        combine_at: new items in one group commit plus publishes awaiting
            their acks from which the group commit goes in one atomic batch
            per shard rather than a publish each.
    """

    def __init__(self, acks: Callable[[], Acks], layout: Layout, reads: StreamReads, *, combine_at: int = 32) -> None:
        self._acks = acks
        self.layout = layout
        self.reads = reads
        self.combine_at = combine_at
        self.settle = Settler(acks, layout, reads)  # duplicate and lost answers
        self.combined = 0  # combined batches stored (stats, tests)
        self.retries = 0  # publishes refused because a head moved or an id existed (stats, tests)
        self.batches = 0  # publishes (plain or atomic) that stored something
        self.unknown = 0  # publishes whose answer was lost, resolved from the stream
        self._combiners: dict[int, Merger[list[_Part], bool]] = {}

    async def _store_merged(self, shard: int, parts: list[_Part]) -> bool:
        """Store ``parts`` in the shard's next combined batch; False if it was refused."""
        if not parts:
            return True
        c = self._combiners.get(shard)
        if c is None:
            c = self._combiners[shard] = _combiner(self._store_combined)
        return await c.submit(parts)

    async def commit(self, batch: list[Pending]) -> tuple[list[Outcome], list[Committed]]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        by_sid: dict[str, list[int]] = {}
        for i, p in enumerate(batch):
            by_sid.setdefault(p.session_id, []).append(i)
        committed: list[Committed] = []
        items = sum(len(p.request.items) for p in batch)
        if (items >= 2 and items + self._acks().pending >= self.combine_at) or self._riding(batch):
            by_sid = await self._combined(batch, by_sid, outcomes, committed)
        await asyncio.gather(*(self._session(sid, idx, batch, outcomes, committed) for sid, idx in by_sid.items()))
        committed.sort(key=lambda c: c.position)
        return [o if o is not None else UnavailableError("the append was not decided") for o in outcomes], committed

    async def _combined(
        self, batch: list[Pending], by_sid: dict[str, list[int]], outcomes: list[Outcome | None],
        committed: list[Committed],
    ) -> dict[str, list[int]]:
        """Decide every session's requests on its cached head and store them in
        one atomic batch per shard.  Returns the sessions left to store one by
        one (a refusal, an error to check against a fresh head, a batch too big)."""
        sids = list(by_sid)
        indexes = await asyncio.gather(
            *(self.reads.session(s, fresh=s not in self.reads.cache) for s in sids), return_exceptions=True
        )
        created_at = now_rfc3339()
        left: dict[str, list[int]] = {}
        shards: dict[int, list[_Part]] = {}
        for sid, ix in zip(sids, indexes, strict=True):
            idx = by_sid[sid]
            if isinstance(ix, BaseException):
                if not isinstance(ix, ConvlogError):
                    raise ix
                # Its shard's stream does not answer: only its own appends fail (nothing written).
                for i in idx:
                    outcomes[i] = ix
                continue
            reqs = [batch[i].request for i in idx]
            if any(r.expected_last is not None or any(it.kind == "retract" for it in r.items) for r in reqs):
                left[sid] = idx  # needs lookups (ids, retract targets): the careful path
                continue
            st = SessionState(ix.last_order, ix.last_hash, ix.last_clear)
            part = _Part(sid, ix, idx, [], [], head_seq=ix.last_seq)
            try:
                for i in idx:
                    reply, rows = decide(sid, batch[i].request, st, {}, {}, created_at, 0)
                    part.replies.append(reply)
                    part.rows += rows
                    part.traces += [batch[i].trace] * len(rows)
            except ConvlogError:
                left[sid] = idx
                continue
            chunk = shards.setdefault(self.layout.shard_of(sid), [])
            if not part.rows or sum(len(p.rows) for p in chunk) + len(part.rows) > MAX_BATCH_MESSAGES:
                left[sid] = idx
                continue
            chunk.append(part)
        # Each shard's batch is its own: one whose outcome stays unknown (its stream does
        # not answer) must not fail the batches the other shards stored.
        stored = await asyncio.gather(
            *(self._store_merged(k, parts) for k, parts in shards.items()), return_exceptions=True
        )
        for parts, ok in zip(shards.values(), stored, strict=True):
            if isinstance(ok, BaseException) and not isinstance(ok, ConvlogError):
                raise ok
            for part in parts:
                if isinstance(ok, ConvlogError):  # OutcomeStillUnknown: the callers retry with the same ids
                    for i in part.idx:
                        outcomes[i] = ok
                    continue
                if not ok:
                    left[part.sid] = part.idx
                    continue
                for i, reply in zip(part.idx, part.replies, strict=True):
                    outcomes[i] = reply
                k = self.layout.shard_of(part.sid)
                committed += [
                    Committed(position(seq, k, self.layout.shards), part.sid, r[2], r[5])
                    for seq, r in zip(part.seqs, part.rows, strict=True)
                ]
        return left

    def _riding(self, batch: list[Pending]) -> bool:
        """Whether a combined batch is being stored on a shard this group commit
        writes to: then its appends ride the next one instead of adding
        publishes (one fsync each) to a server that is behind."""
        busy = {k for k, c in self._combiners.items() if c.busy}
        return bool(busy) and any(self.layout.shard_of(p.session_id) in busy for p in batch)

    async def _store_combined(self, parts: list[_Part]) -> bool:
        """One atomic batch of several sessions' rows; False if it was refused."""
        if not parts:
            return True
        msgs: list[Message] = []
        for part in parts:
            msgs += self._messages(part.sid, part.head_seq, part.rows, part.traces)
        acks = self._acks()
        try:
            ack = await acks.publish_atomic(msgs)
            first = ack.first_seq if not ack.duplicate else None
        except OutcomeUnknown:
            self.unknown += 1
            first = await self.settle.combined(msgs, parts[0].sid, parts[0].rows[:1])
        except (WrongLastSequence, IdTaken, UnavailableError, TooLargeError):
            self.retries += 1
            return False
        if first is None:
            self.retries += 1
            return False
        self.batches += 1
        self.combined += 1
        seq = first
        for part in parts:
            part.seqs = list(range(seq, seq + len(part.rows)))
            self._cache(part.index, part.seqs, part.rows)
            seq += len(part.rows)
        return True

    async def _session(
        self, sid: str, idx: list[int], batch: list[Pending], outcomes: list[Outcome | None], committed: list[Committed]
    ) -> None:
        fresh = sid not in self.reads.cache
        for i in idx:
            p = batch[i]
            try:
                outcomes[i], rows_at = await self._one(sid, p, fresh)
            except OutcomeStillUnknown as e:
                outcomes[i] = e  # maybe stored: the caller retries with the same ids
                continue
            except ConvlogError as e:
                outcomes[i] = e
                continue
            fresh = False
            k = self.layout.shard_of(sid)
            committed += [
                Committed(position(seq, k, self.layout.shards), sid, r[2], r[5]) for seq, r in rows_at
            ]

    async def _one(self, sid: str, p: Pending, fresh: bool) -> tuple[Outcome, list[tuple[int, Row]]]:
        """Decide and store one request; retry on refusals, on fresh heads."""
        req = p.request
        if len(req.items) > MAX_ITEMS_PER_APPEND:
            return TooLargeError(
                f"{len(req.items)} items in one append, over the JetStream store's limit of "
                f"{MAX_ITEMS_PER_APPEND} (one atomic batch)",
                limit=MAX_ITEMS_PER_APPEND,
            ), []
        careful = leader = False
        why = "the session is too contended"  # what the last refused store said
        for _ in range(_ATTEMPTS):
            ix = await self.reads.session(sid, fresh=fresh, leader=leader)
            existing = await self._existing_ids(sid, ix, req, careful)
            kinds = await self._stored_kinds(sid, ix, req)
            st = SessionState(ix.last_order, ix.last_hash, ix.last_clear)
            try:
                reply, rows = decide(sid, req, st, existing, kinds, now_rfc3339(), 0)
            except ConvlogError:
                if not fresh:  # refuse only against the head the stream has now
                    fresh = True
                    continue
                if not leader:  # as the leader has it, not a replica that trails it
                    leader = True
                    continue
                raise
            leader = False
            if not rows:
                return reply, []
            try:
                seqs = await self.store_rows(sid, ix, rows, trace=p.trace)
            except WrongLastSequence:
                self.retries += 1
                fresh, why = True, "the session is too contended"
                continue
            except IdTaken:
                self.retries += 1
                fresh = careful = True
                why = "the session is too contended"
                continue
            except OutcomeStillUnknown:
                raise
            except UnavailableError as e:
                if isinstance(e, Refused) and e.at_limit:
                    # A full stream (max_msgs, max_bytes, the server's storage): only an
                    # operator clears it, so retrying would only delay the answer (~4 s).
                    return UnavailableError(f"{e.message}; nothing was written"), []
                # Refused for another reason (a leader election, too many
                # batches in flight): nothing was stored; try again shortly.
                log.info("append refused, retrying: %s", e.message)
                await asyncio.sleep(0.25)
                fresh, why = True, e.message
                continue
            return reply, list(zip(seqs, rows, strict=True))
        return UnavailableError(f"{why}; nothing was written"), []

    async def store_rows(self, sid: str, ix: SessionIndex, rows: Sequence[Row], *, trace: str | None = None) -> list[int]:
        """Publish ``rows`` (decided on ``ix``'s head) and update the cache.

        Returns their stream sequences.

        Raises:
            WrongLastSequence: the head moved (nothing stored).
            IdTaken: an id is stored already (nothing stored).
            OutcomeStillUnknown: no answer, even to the copies sent to settle it.
            UnavailableError: refused for another reason (nothing stored).
        """
        msgs = self._messages(sid, ix.last_seq, rows, trace)
        acks = self._acks()
        try:
            ack = await (acks.publish(*msgs[0]) if len(msgs) == 1 else acks.publish_atomic(msgs))
            seqs = await self.settle.confirmed(sid, ack, rows)
        except OutcomeUnknown:
            self.unknown += 1
            seqs = await self.settle.unknown(sid, msgs, rows)
        self.batches += 1
        self._cache(ix, seqs, rows)
        return seqs

    @staticmethod
    def _cache(ix: SessionIndex, seqs: Sequence[int], rows: Sequence[Row]) -> None:
        complete = ix.indexed == ix.last_order
        for seq, r in zip(seqs, rows, strict=True):
            meta = _meta.decode(r[5])
            if complete:
                ix.add(meta, seq)
            else:
                ix.set_head(meta, seq)

    def _messages(
        self, sid: str, head_seq: int, rows: Sequence[Row], traces: str | Sequence[str | None] | None
    ) -> list[Message]:
        msgs: list[Message] = []
        for n, r in enumerate(rows):
            headers = {MSG_ID: f"{sid}:{r[2]}"}
            trace = traces if traces is None or isinstance(traces, str) else traces[n]
            if trace is not None:
                headers["traceparent"] = trace  # carried to <prefix>.items.<sid> for the worker's span
            if n == 0:
                headers[EXPECTED_LAST_SUBJECT_SEQ] = str(head_seq)
                headers[EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = self.layout.session_filter(sid)
            msgs.append((self.layout.item_subject(sid, r[3]), r[5], headers))
        return msgs

    async def _existing_ids(
        self, sid: str, s: SessionIndex, req: AppendRequest, careful: bool
    ) -> dict[tuple[str, str], Existing]:
        """Look ids up where the answer changes the decision (as SQLite does):
        with ``expected_last`` behind, or after the server refused an id."""
        if not s.last_order:
            return {}
        if not careful and (req.expected_last is None or req.expected_last == s.last_order):
            return {}
        wanted = list({it.item_id for it in req.items if it.item_id is not None})
        get = self.reads.get(sid)
        found_msgs = await asyncio.gather(*(get.last(self.layout.item_subject(sid, iid)) for iid in wanted))
        # A replica that trails the leader answers "not found" for an id the leader
        # holds (and a miss turns a retry into a conflict): the leader confirms misses.
        missed = [n for n, msg in enumerate(found_msgs) if msg is None]
        confirmed = await asyncio.gather(
            *(get.last_from_leader(self.layout.item_subject(sid, wanted[n])) for n in missed)
        )
        for n, msg in zip(missed, confirmed, strict=True):
            found_msgs[n] = msg
        found: dict[tuple[str, str], Existing] = {}
        for iid, msg in zip(wanted, found_msgs, strict=True):
            if msg is not None:
                found[(sid, iid)] = stored_entry(_meta.decode(msg.data).item_order, msg.data)
        return found

    async def _stored_kinds(self, sid: str, s: SessionIndex, req: AppendRequest) -> dict[tuple[str, int], str]:
        targets = {
            t
            for it in req.items
            if it.kind == "retract" and isinstance(t := it.data.get("target"), int) and not isinstance(t, bool)
            and 1 <= t <= s.last_order
        }
        if not targets:
            return {}
        await self.reads.extend(sid, s, max(targets))
        return {(sid, t): k for t in targets if (k := s.kind(t)) is not None}
