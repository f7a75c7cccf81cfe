"""The write side of the JetStream store: one group commit, as few atomic batches as fit.

An atomic batch costs the server about the same whether it holds 2 messages
or 200 (it stages the batch, then stores it at once), so a group commit
puts every session's requests in ONE batch (up to the server's 1000
messages; more go in further batches, one after another).  Per session, the
first envelope carries ``Nats-Expected-Last-Subject-Sequence`` of the head
the rows were decided on, and every id record an expected last subject
sequence of 0.  A refused batch says neither which session nor which check
failed, so the sessions of that batch reload their heads: those that moved
are decided again on the new head, and if none moved an id was taken, so
their ids are looked up ("careful") before deciding again.  After two
refusals a group commit isolates its sessions (one batch per session, in
parallel), so one contended session cannot hold the others back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client

from shared.errors import ConvlogError, TooLargeError, UnavailableError
from shared.messages import AppendRequest

from ..base import Committed
from ..committer import Outcome, Pending
from ..ordering import Existing, Row, SessionState, decide, now_rfc3339, stored_entry
from .api import (
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID,
    Message,
    OutcomeUnknown,
    WrongLastSequence,
    publish_atomic,
)
from .index import Meta, SessionIndex
from .layout import Layout
from .reads import StreamReads

__all__ = ["MAX_BATCH_MESSAGES", "MAX_ITEMS_PER_APPEND", "BatchWriter"]

log = logging.getLogger("convlog.store.jetstream")

#: The server's limit on one atomic batch (ADR-50).
MAX_BATCH_MESSAGES = 1000
#: Each item is two messages (its envelope and its id record).
MAX_ITEMS_PER_APPEND = MAX_BATCH_MESSAGES // 2
_ATTEMPTS = 12
_ISOLATE_AFTER = 2


class OutcomeStillUnknown(UnavailableError):
    """No answer came to a commit, nor to the copies sent to settle it."""


class IdRecord(msgspec.Struct, frozen=True):
    """The body of ``<prefix>.ids.<sid>.<token>``."""

    item_order: int
    hash: str
    digest: str  # content_digest of the item: an id reused with other content is a conflict


_encode = msgspec.json.Encoder().encode
_id_record = msgspec.json.Decoder(IdRecord)
_meta = msgspec.json.Decoder(Meta)


@dataclass(slots=True)
class _Part:
    """One session's share of a batch: its decided requests and their rows."""

    sid: str
    index: SessionIndex
    head_seq: int  # the head the rows were decided on: what the server must still see
    decided: list[tuple[int, Outcome, list[Row]]] = field(default_factory=list)
    prev: _Part | None = None  # the piece of the same session this one chains onto
    last_pos: int = 0  # once stored: the stream sequence of its last envelope

    @property
    def rows(self) -> list[Row]:
        return [r for _, _, rs in self.decided for r in rs]


class BatchWriter:
    """Decides and stores the group commits of one store instance.

    Args:
        nc: returns the store's connection.
        layout: the store's subjects.
        reads: the read side, whose session cache this writer keeps current.
        timeout: seconds to wait for a commit's answer.
    """

    def __init__(self, nc: Callable[[], Client], layout: Layout, reads: StreamReads, timeout: float) -> None:
        self._nc = nc
        self.layout = layout
        self.reads = reads
        self.timeout = timeout
        self.max_inflight_batches = 32  # when isolating; the server allows 50 per stream
        self.retries = 0  # batches refused because a head moved or an id existed (stats, tests)
        self.batches = 0  # atomic batches stored
        self.unknown = 0  # commits whose answer was lost, resolved from the stream

    async def commit(self, batch: list[Pending]) -> tuple[list[Outcome], list[Committed]]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        for i, p in enumerate(batch):
            if len(p.request.items) > MAX_ITEMS_PER_APPEND:
                outcomes[i] = TooLargeError(
                    f"{len(p.request.items)} items in one append, over the JetStream store's limit of "
                    f"{MAX_ITEMS_PER_APPEND} (one atomic batch)",
                    limit=MAX_ITEMS_PER_APPEND,
                )
        committed: list[Committed] = []
        fresh = {p.session_id for p in batch if p.session_id not in self.reads.cache}
        careful: set[str] = set()
        for attempt in range(_ATTEMPTS):
            todo = [i for i, out in enumerate(outcomes) if out is None]
            if not todo:
                break
            try:
                parts, stale = await self._decide(batch, todo, fresh, careful, outcomes)
            except ConvlogError as e:
                for i in todo:
                    outcomes[i] = e
                break
            fresh = stale  # sessions refused on a cached head: decide again on a fresh one
            if attempt >= _ISOLATE_AFTER:
                gate = asyncio.Semaphore(self.max_inflight_batches)
                results = await asyncio.gather(
                    *(self._alone(gate, c, outcomes, committed) for c in _isolated(parts))
                )
            else:
                results = [await self._store_in_turn(_combined(parts), outcomes, committed)]
            for moved, taken in results:
                fresh |= moved
                careful |= taken
        committed.sort(key=lambda c: c.position)
        return [
            out if out is not None else UnavailableError("the session is too contended; nothing was written")
            for out in outcomes
        ], committed

    async def _decide(
        self,
        batch: list[Pending],
        todo: list[int],
        fresh: set[str],
        careful: set[str],
        outcomes: list[Outcome | None],
    ) -> tuple[list[_Part], set[str]]:
        """Decide the undecided requests; set the outcomes that are final.

        Returns the parts to store and the sessions to decide again on a
        fresh head (a refusal met a cached one).
        """
        by_sid: dict[str, list[int]] = {}
        for i in todo:
            by_sid.setdefault(batch[i].session_id, []).append(i)
        sids = list(by_sid)
        indexes = await asyncio.gather(*(self.reads.session(s, fresh=s in fresh) for s in sids))
        requests = {s: [batch[i].request for i in by_sid[s]] for s in sids}
        existing_all = await asyncio.gather(
            *(self._existing_ids(s, ix, requests[s], s in careful) for s, ix in zip(sids, indexes, strict=True))
        )
        kinds_all = await asyncio.gather(
            *(self._stored_kinds(s, ix, requests[s]) for s, ix in zip(sids, indexes, strict=True))
        )
        created_at = now_rfc3339()
        parts: list[_Part] = []
        stale: set[str] = set()
        for s, ix, existing, kinds in zip(sids, indexes, existing_all, kinds_all, strict=True):
            st = SessionState(ix.last_order, ix.last_hash, ix.last_clear)
            part = _Part(s, ix, ix.last_seq)
            for i in by_sid[s]:
                try:
                    reply, rows = decide(s, batch[i].request, st, existing, kinds, created_at, 0)
                    part.decided.append((i, reply, rows))
                except ConvlogError as e:
                    part.decided.append((i, e, []))
            if s not in fresh and any(isinstance(out, ConvlogError) for _, out, _ in part.decided):
                stale.add(s)  # refuse only against the head as the stream has it now
                continue
            if part.rows:
                parts.append(part)
            else:  # duplicates and refusals only: nothing to store
                for i, out, _ in part.decided:
                    outcomes[i] = out
        return parts, stale

    async def _alone(
        self,
        gate: asyncio.Semaphore,
        chunks: list[list[_Part]],
        outcomes: list[Outcome | None],
        committed: list[Committed],
    ) -> tuple[set[str], set[str]]:
        async with gate:
            return await self._store_in_turn(chunks, outcomes, committed)

    async def _store_in_turn(
        self, chunks: list[list[_Part]], outcomes: list[Outcome | None], committed: list[Committed]
    ) -> tuple[set[str], set[str]]:
        """Store ``chunks`` one after another; stop at the first refusal (the
        chunks after it were decided on heads that may be wrong now)."""
        for chunk in chunks:
            moved, taken = await self._store(chunk, outcomes, committed)
            if moved or taken:
                return moved, taken
        return set(), set()

    async def _store(
        self, chunk: list[_Part], outcomes: list[Outcome | None], committed: list[Committed]
    ) -> tuple[set[str], set[str]]:
        """Store one chunk as one atomic batch and answer its requests.

        Returns (sessions whose head moved, sessions to look ids up for) when
        the server refused the batch; both empty when it was stored.
        """
        try:
            positions = await self._publish(chunk)
        except OutcomeStillUnknown:
            raise  # maybe stored: never decide these requests again
        except UnavailableError as e:
            # Refused for another reason (a leader election, too many batches
            # in flight): nothing was stored; try again shortly, on fresh heads.
            log.info("append batch refused, retrying: %s", e.message)
            await asyncio.sleep(0.25)
            return {p.sid for p in chunk}, set()
        except WrongLastSequence:
            self.retries += 1
            heads = await asyncio.gather(*(self.reads.session(p.sid, fresh=True) for p in chunk))
            moved = {p.sid for p, ix in zip(chunk, heads, strict=True) if ix.last_seq != p.head_seq}
            return moved, set() if moved else {p.sid for p in chunk}
        self.batches += 1
        for k, part in enumerate(chunk):
            for i, out, _ in part.decided:
                outcomes[i] = out
            committed += [
                Committed(pos, part.sid, r[2], r[5]) for pos, r in zip(positions[k], part.rows, strict=True)
            ]
        return set(), set()

    async def _publish(self, chunk: list[_Part]) -> list[list[int]]:
        """One atomic batch: every part's envelopes, then their id records.
        Returns each part's new stream sequences and updates the cache."""
        msgs: list[Message] = []
        ids: list[Message] = []
        for part in chunk:
            if part.prev is not None:
                part.head_seq = part.prev.last_pos  # chained onto our own piece, exactly
            subject = self.layout.items(part.sid)
            for n, r in enumerate(part.rows):
                headers = {MSG_ID: f"{part.sid}:{r[2]}"}
                if n == 0:
                    headers[EXPECTED_LAST_SUBJECT_SEQ] = str(part.head_seq)
                msgs.append((subject, r[5], headers))
                order, hash_, digest = stored_entry(r[2], r[5])
                record = _encode(IdRecord(item_order=order, hash=hash_, digest=digest))
                ids.append((self.layout.id_subject(part.sid, r[3]), record, {EXPECTED_LAST_SUBJECT_SEQ: "0"}))
        try:
            ack = await publish_atomic(self._nc(), msgs + ids, timeout=self.timeout)
            positions = _positions(chunk, ack.first_seq)
        except OutcomeUnknown:
            self.unknown += 1
            positions = await self._resolve_unknown(chunk, msgs + ids)
        for part, pos_list in zip(chunk, positions, strict=True):
            part.last_pos = pos_list[-1]
            ix = part.index
            complete = ix.indexed == ix.last_order
            for pos, r in zip(pos_list, part.rows, strict=True):
                meta = _meta.decode(r[5])
                if complete:
                    ix.add(meta, pos)
                else:
                    ix.set_head(meta, pos)
        return positions

    async def _resolve_unknown(self, chunk: list[_Part], messages: list[Message]) -> list[list[int]]:
        """No answer came to a commit: make its outcome certain, then read it.

        A lookup alone could run before a batch still in flight lands.  So
        the same batch is sent again: the stream takes a connection's
        messages in order, so once the copy is answered the original, if it
        arrived, has been stored or refused.  If the copy is stored, the
        original was not (it would have failed the copy's expectations);
        if the copy is refused, the first id record tells whether the
        original is ours (a batch is all or nothing).
        """
        for _ in range(_ATTEMPTS):
            try:
                ack = await publish_atomic(self._nc(), messages, timeout=self.timeout)
            except WrongLastSequence:
                break  # something is stored: ours, or another writer's
            except (OutcomeUnknown, UnavailableError):
                await asyncio.sleep(0.5)
                continue
            return _positions(chunk, ack.first_seq)
        else:
            raise OutcomeStillUnknown("the outcome of an append is unknown; retry it with the same item_ids")
        first_part = chunk[0]
        first = first_part.rows[0]
        rec = await self.reads.get().last(self.layout.id_subject(first_part.sid, first[3]))
        if rec is None or (
            (found := _id_record.decode(rec.data)).item_order,
            found.hash,
        ) != (first[2], _meta.decode(first[5]).hash):
            raise WrongLastSequence("another append was stored first")  # decide again
        positions: list[list[int]] = []
        for part in chunk:
            ix = await self.reads.session(part.sid, fresh=True)
            await self.reads.extend(part.sid, ix, part.rows[-1][2])
            positions.append([int(ix.seqs[r[2] - 1]) for r in part.rows])
        return positions

    async def _existing_ids(
        self, sid: str, s: SessionIndex, requests: Sequence[AppendRequest], careful: bool
    ) -> dict[tuple[str, str], Existing]:
        """Look ids up where the answer changes the decision (as SQLite does):
        with ``expected_last`` behind, or after the server refused an id."""
        if not s.last_order:
            return {}
        wanted = list({
            it.item_id
            for r in requests
            if careful or (r.expected_last is not None and r.expected_last != s.last_order)
            for it in r.items
            if it.item_id is not None
        })
        get = self.reads.get()
        recs = await asyncio.gather(*(get.last(self.layout.id_subject(sid, iid)) for iid in wanted))
        found: dict[tuple[str, str], Existing] = {}
        for iid, rec in zip(wanted, recs, strict=True):
            if rec is not None:
                r = _id_record.decode(rec.data)
                found[(sid, iid)] = (r.item_order, r.hash, r.digest)
        return found

    async def _stored_kinds(
        self, sid: str, s: SessionIndex, requests: Sequence[AppendRequest]
    ) -> dict[tuple[str, int], str]:
        targets = {
            t
            for r in requests
            for it in r.items
            if it.kind == "retract" and isinstance(t := it.data.get("target"), int) and not isinstance(t, bool)
            and 1 <= t <= s.last_order
        }
        if not targets:
            return {}
        await self.reads.extend(sid, s, max(targets))
        return {(sid, t): k for t in targets if (k := s.kind(t)) is not None}


def _positions(chunk: list[_Part], first_seq: int) -> list[list[int]]:
    """Each part's envelope sequences in a stored batch (envelopes come first, in part order)."""
    out: list[list[int]] = []
    seq = first_seq
    for part in chunk:
        n = len(part.rows)
        out.append(list(range(seq, seq + n)))
        seq += n
    return out


def _size(part: _Part) -> int:
    return 2 * len(part.rows)


def _combined(parts: list[_Part]) -> list[list[_Part]]:
    """As few batches as hold the parts (a part larger than one batch is split
    at request boundaries, its pieces chained in order)."""
    if not parts:
        return []
    chunks: list[list[_Part]] = [[]]
    size = 0
    for part in _split(parts):
        if chunks[-1] and size + _size(part) > MAX_BATCH_MESSAGES:
            chunks.append([])
            size = 0
        chunks[-1].append(part)
        size += _size(part)
    return chunks


def _isolated(parts: list[_Part]) -> list[list[list[_Part]]]:
    """Per session, its pieces as one-part chunks, to store in turn."""
    by_sid: dict[str, list[list[_Part]]] = {}
    for piece in _split(parts):
        by_sid.setdefault(piece.sid, []).append([piece])
    return list(by_sid.values())


def _split(parts: list[_Part]) -> list[_Part]:
    """Parts larger than one batch, cut at request boundaries into chained pieces."""
    out: list[_Part] = []
    for part in parts:
        piece = _Part(part.sid, part.index, part.head_seq)
        for d in part.decided:
            if piece.decided and _size(piece) + 2 * len(d[2]) > MAX_BATCH_MESSAGES:
                out.append(piece)
                piece = _Part(part.sid, part.index, -1, prev=piece)
            piece.decided.append(d)
        out.append(piece)
    return out
