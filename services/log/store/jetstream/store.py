"""The JetStream store: the log lives in a JetStream stream (see :mod:`.layout`).

Any number of log-service instances may serve the same sessions at once:
each keeps only caches (:class:`~.index.SessionIndex`), and every append is
checked by the server against the head it was decided on:

* the first item of a session's batch carries
  ``Nats-Expected-Last-Subject-Sequence`` = the stream sequence of the
  session's last item as this instance knows it — if another instance moved
  the head on, the server refuses and this instance reloads and decides again;
* every new ``item_id`` writes its id record with an expected last subject
  sequence of 0 — the id subject must be empty, so an id is stored once, ever;
* the items and id records of a session's requests go in ONE atomic batch
  (``allow_atomic``), so a multi-item append is stored whole or not at all.

Ordering rules are :func:`~..ordering.decide`, the same as SQLite's; the
envelopes are byte-identical.  Errors (a conflict, a bad retract) are only
ever reported against a head freshly read from the stream.  Reads are direct
gets, answered by any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec
import nats
from nats.aio.client import Client

from shared.errors import ConvlogError, TooLargeError, UnavailableError
from shared.messages import AppendReply, AppendRequest, SessionInfo
from shared.subjects import Subjects

from ..base import AppendDone, CommitListener, Committed, Page
from ..committer import GroupCommitter, Outcome, Pending
from ..ordering import Row, SessionState, decide, now_rfc3339
from .api import (
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID,
    DirectGet,
    Message,
    OutcomeUnknown,
    WrongLastSequence,
    publish_atomic,
)
from .index import Meta, SessionIndex
from .layout import Layout, ensure_log_stream
from .reads import StreamReads

__all__ = ["MAX_BATCH_MESSAGES", "MAX_ITEMS_PER_APPEND", "JetStreamStore"]

log = logging.getLogger("convlog.store.jetstream")

#: The server's limit on one atomic batch (ADR-50).
MAX_BATCH_MESSAGES = 1000
#: Each item is two messages (its envelope and its id record).
MAX_ITEMS_PER_APPEND = MAX_BATCH_MESSAGES // 2
_ATTEMPTS = 10


class _IdRecord(msgspec.Struct, frozen=True):
    item_order: int
    hash: str


_encode = msgspec.json.Encoder().encode
_id_record = msgspec.json.Decoder(_IdRecord)


class JetStreamStore:
    """A :class:`~services.log.store.base.LogStore` on a JetStream stream.

    Args:
        connect_options: ``nats.connect`` keyword arguments (the store owns
            its connection), unless ``nc`` is given.
        subjects: subject names for the prefix.
        replicas: the stream's replicas when this store creates it.
        max_batch: most append requests one group commit takes.
        timeout: seconds to wait for the stream's answers.
        max_cached_sessions: sessions whose head and index are kept in memory.
        nc: an already connected client to use (not closed by :meth:`close`).
    """

    #: The stream is the fan-out of ``<prefix>.items.<sid>``: no outbox.
    publishes_items = True

    def __init__(
        self,
        connect_options: dict[str, Any] | None = None,
        *,
        subjects: Subjects,
        replicas: int = 1,
        max_batch: int = 512,
        timeout: float = 5.0,
        max_cached_sessions: int = 10_000,
        nc: Client | None = None,
    ) -> None:
        self.layout = Layout(subjects)
        self.path = f"jetstream:{self.layout.stream}"  # for the service's ready line
        self._connect_options = connect_options or {}
        self._nc = nc
        self._owns_nc = nc is None
        self.replicas = replicas
        self.timeout = timeout
        self.max_cached_sessions = max_cached_sessions
        self.max_inflight_batches = 32  # the server allows 50 per stream
        self._committer = GroupCommitter(self._commit_batch, max_batch=max_batch)
        self._reads = StreamReads(self.layout, lambda: self._get, max_cached_sessions=max_cached_sessions)
        self._direct: DirectGet | None = None
        self._opened = False
        self.retries = 0  # appends decided again after the server refused a head (stats, tests)

    @property
    def commits(self) -> int:
        """Group commits that stored something (for stats and tests)."""
        return self._committer.commits

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        if self._opened:
            return
        try:
            if self._nc is None:
                self._nc = await nats.connect(**self._connect_options)
            await ensure_log_stream(self._nc.jetstream(timeout=self.timeout), self.layout, replicas=self.replicas)
            self._direct = DirectGet(self._nc, self.layout.stream, timeout=self.timeout)
            await self._direct.start()
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as e:
            await self._close_nc()
            raise UnavailableError(f"cannot open the JetStream store {self.layout.stream}: {e}") from e
        self._opened = True
        self._committer.start()

    async def close(self) -> None:
        await self._committer.stop()
        await self._close_nc()

    async def _close_nc(self) -> None:
        if self._owns_nc and self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    async def __aenter__(self) -> JetStreamStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._committer.add_listener(listener)

    @property
    def _get(self) -> DirectGet:
        if self._direct is None:
            raise UnavailableError("the JetStream store is not open")
        return self._direct

    # -- appends ---------------------------------------------------------
    def submit(self, session_id: str, request: AppendRequest, done: AppendDone) -> None:
        self._committer.submit(session_id, request, done)

    async def append(self, session_id: str, request: AppendRequest) -> AppendReply:
        return await self._committer.append(session_id, request)

    async def _commit_batch(self, batch: list[Pending]) -> tuple[list[Outcome], list[Committed]]:
        """Each session's requests go to the stream as one atomic batch; the
        sessions of a group commit in parallel."""
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault(p.session_id, []).append(i)
        outcomes: list[Outcome | None] = [None] * len(batch)
        committed: list[Committed] = []
        gate = asyncio.Semaphore(self.max_inflight_batches)

        async def one(sid: str, idxs: list[int]) -> None:
            async with gate:
                try:
                    outs, done = await self._commit_session(sid, [batch[i].request for i in idxs])
                except ConvlogError as e:
                    outs, done = [e] * len(idxs), []
                except Exception:
                    log.exception("append to session %s failed", sid)
                    outs, done = [UnavailableError("the store failed to commit")] * len(idxs), []
            for i, out in zip(idxs, outs, strict=True):
                outcomes[i] = out
            committed.extend(done)

        await asyncio.gather(*(one(sid, idxs) for sid, idxs in groups.items()))
        committed.sort(key=lambda c: c.position)
        return [o if o is not None else UnavailableError("not decided") for o in outcomes], committed

    async def _commit_session(
        self, sid: str, requests: Sequence[AppendRequest]
    ) -> tuple[list[Outcome], list[Committed]]:
        results: list[Outcome | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            if len(r.items) > MAX_ITEMS_PER_APPEND:
                results[i] = TooLargeError(
                    f"{len(r.items)} items in one append, over the JetStream store's limit of "
                    f"{MAX_ITEMS_PER_APPEND} (one atomic batch)",
                    limit=MAX_ITEMS_PER_APPEND,
                )
        committed: list[Committed] = []
        careful = False
        fresh = sid not in self._cache
        for _attempt in range(_ATTEMPTS):
            todo = [i for i, out in enumerate(results) if out is None]
            if not todo:
                break
            s = await self._session(sid, fresh=fresh)
            st = SessionState(s.last_order, s.last_hash, s.last_clear)
            # The head the rows are decided on: a read may move the cache's
            # head on meanwhile, and the server must check against THIS one.
            head_seq = s.last_seq
            existing = await self._existing_ids(sid, s, [requests[i] for i in todo], careful)
            stored_kinds = await self._stored_kinds(sid, s, [requests[i] for i in todo])
            created_at = now_rfc3339()
            decided: list[tuple[int, Outcome, list[Row]]] = []
            for i in todo:
                try:
                    reply, rows = decide(sid, requests[i], st, existing, stored_kinds, created_at, 0)
                    decided.append((i, reply, rows))
                except ConvlogError as e:
                    decided.append((i, e, []))
            if not fresh and any(isinstance(out, ConvlogError) for _, out, _ in decided):
                fresh = True  # refuse only against the head as the stream has it now
                continue
            retry = False
            for chunk in _chunks(decided):
                rows = [r for _, _, rs in chunk for r in rs]
                if rows:
                    try:
                        positions = await self._publish(sid, s, head_seq, rows)
                    except WrongLastSequence:
                        # Another instance moved the head, or an id is stored already.
                        s = await self._session(sid, fresh=True)
                        careful = careful or s.last_seq == head_seq
                        fresh = retry = True
                        self.retries += 1
                        break
                    committed += [Committed(pos, sid, r[2], r[5]) for pos, r in zip(positions, rows, strict=True)]
                    head_seq = positions[-1]  # the next chunk chains onto this one
                for i, out, _ in chunk:
                    results[i] = out
            if not retry:
                fresh = False
        final = [
            out if out is not None else UnavailableError(f"session {sid!r} is too contended; nothing was written")
            for out in results
        ]
        return final, committed

    async def _publish(self, sid: str, s: SessionIndex, head_seq: int, rows: list[Row]) -> list[int]:
        """Store ``rows`` (one session's, contiguous after its head) atomically;
        their stream sequences.  Updates the cache on success."""
        subject = self.layout.items(sid)
        msgs: list[Message] = []
        for n, r in enumerate(rows):
            headers = {MSG_ID: f"{sid}:{r[2]}"}
            if n == 0:
                headers[EXPECTED_LAST_SUBJECT_SEQ] = str(head_seq)
            msgs.append((subject, r[5], headers))
        for r in rows:
            body = _encode(_IdRecord(item_order=r[2], hash=msgspec.json.decode(r[5], type=dict)["hash"]))
            msgs.append((self.layout.id_subject(sid, r[3]), body, {EXPECTED_LAST_SUBJECT_SEQ: "0"}))
        assert self._nc is not None
        try:
            ack = await publish_atomic(self._nc, msgs, timeout=self.timeout)
            positions = [ack.first_seq + k for k in range(len(rows))]
        except OutcomeUnknown:
            positions = await self._resolve_unknown(sid, rows)
        complete = s.indexed == s.last_order
        for pos, r in zip(positions, rows, strict=True):
            meta = meta_of_row(r)
            if complete:
                s.add(meta, pos)
            else:
                s.set_head(meta, pos)
        return positions

    async def _resolve_unknown(self, sid: str, rows: list[Row]) -> list[int]:
        """No answer came to a commit: find out from the stream whether it landed."""
        first = rows[0]
        for _ in range(_ATTEMPTS):
            try:
                rec = await self._get.last(self.layout.id_subject(sid, first[3]))
                break
            except UnavailableError:
                await asyncio.sleep(0.5)
        else:
            raise UnavailableError("the outcome of an append is unknown; retry it with the same item_ids")
        if rec is None:
            raise WrongLastSequence("not stored")  # decide again: nothing was written
        found = _id_record.decode(rec.data)
        if found.item_order != first[2] or found.hash != meta_of_row(first).hash:
            raise WrongLastSequence("another append took the id")
        s = await self._session(sid, fresh=True)
        await self._extend(sid, s, rows[-1][2])
        return [s.seqs[r[2] - 1] for r in rows]

    async def _existing_ids(
        self, sid: str, s: SessionIndex, requests: Sequence[AppendRequest], careful: bool
    ) -> dict[tuple[str, str], tuple[int, str]]:
        """Look ids up where the answer changes the decision (as SQLite does):
        with ``expected_last`` behind, or after the server refused an id."""
        if not s.last_order:
            return {}
        wanted = {
            it.item_id
            for r in requests
            if careful or (r.expected_last is not None and r.expected_last != s.last_order)
            for it in r.items
            if it.item_id is not None
        }
        found: dict[tuple[str, str], tuple[int, str]] = {}
        recs = await asyncio.gather(*(self._get.last(self.layout.id_subject(sid, iid)) for iid in wanted))
        for iid, rec in zip(wanted, recs, strict=True):
            if rec is not None:
                r = _id_record.decode(rec.data)
                found[(sid, iid)] = (r.item_order, r.hash)
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
        await self._extend(sid, s, max(targets))
        return {(sid, t): k for t in targets if (k := s.kind(t)) is not None}

    # -- reads: the cached index and direct gets (see .reads) ------------
    async def last_order(self, session_id: str) -> int:
        return await self._reads.last_order(session_id)

    async def read(
        self, session_id: str, *, after: int, limit: int, max_bytes: int, visible: bool = False
    ) -> Page:
        return await self._reads.read(session_id, after=after, limit=limit, max_bytes=max_bytes, visible=visible)

    async def tail(self, session_id: str, n: int, *, visible: bool = True) -> Page:
        return await self._reads.tail(session_id, n, visible=visible)

    async def sessions(self, *, after: str | None, limit: int) -> tuple[list[SessionInfo], bool]:
        return await self._reads.sessions(after=after, limit=limit)

    async def committed_after(self, position: int, limit: int) -> list[Committed]:
        return await self._reads.committed_after(position, limit)

    async def position_of(self, session_id: str, item_order: int) -> int | None:
        return await self._reads.position_of(session_id, item_order)

    async def _session(self, sid: str, *, fresh: bool) -> SessionIndex:
        return await self._reads.session(sid, fresh=fresh)

    async def _extend(self, sid: str, s: SessionIndex, upto: int) -> None:
        await self._reads.extend(sid, s, upto)

    @property
    def _cache(self) -> OrderedDict[str, SessionIndex]:
        return self._reads.cache

def meta_of_row(r: Row) -> Meta:
    return msgspec.json.decode(r[5], type=Meta)


def _chunks(decided: list[tuple[int, Outcome, list[Row]]]) -> list[list[tuple[int, Outcome, list[Row]]]]:
    """Consecutive requests whose messages fit one atomic batch together."""
    out: list[list[tuple[int, Outcome, list[Row]]]] = [[]]
    size = 0
    for d in decided:
        n = 2 * len(d[2])
        if out[-1] and size + n > MAX_BATCH_MESSAGES:
            out.append([])
            size = 0
        out[-1].append(d)
        size += n
    return out
