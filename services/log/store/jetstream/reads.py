"""Reads on the JetStream store: direct gets over a per-instance cache.

Reads go to the session's log stream (its shard), never to the fan-out
stream, which trails it by the copy: a read sees every append any instance
acknowledged.  The cache (:class:`~.index.SessionIndex` per session, least
recently used dropped first) maps each session's orders to stream
sequences.  Every read first loads the session's head fresh (one
``last_by_subj`` direct get on the session's wildcard
``<prefix>.log.<k>.<sid>.*``, or, for a cached head, an unfiltered probe
from its sequence: see :mod:`.unfiltered`); the index then grows from where
it stopped (``next_by_subj`` batches), and the envelopes come back with one
batch get from the first wanted sequence, unfiltered where a sequence of the
session is known (a page's mark, the index).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import msgspec
from nats.aio.msg import Msg

from shared.errors import UnavailableError
from shared.messages import SessionInfo
from shared.subjects import SESSION_ID_PATTERN

from ..base import Committed, Page
from . import unfiltered
from .api import MSG_ID, DirectGet
from .index import SessionIndex, meta_of, seq_of
from .layout import Layout

__all__ = ["StreamReads"]

_GET_CHUNK = 1000
#: Index entries per filtered get: each costs the server a walk over the
#: session's subjects (~15 ms at 50k items) whatever its size.
_INDEX_CHUNK = 10_000
_PAGE_CHUNK = 10_000
_NO_BYTE_LIMIT = unfiltered.NO_BYTE_LIMIT
_ENVELOPE_SLACK = 256 << 10  # about the largest envelope (a bigger one costs a second request)
#: Seconds a get that finds nothing where the session's head says items are is asked
#: again: on R3 a direct get goes to any replica, so the head and the page after it
#: may be answered by different ones, and a follower trails the leader by the
#: replication lag (milliseconds; more after a stall) until it has applied them.
TRAILING_WAIT = 1.0
#: Seconds the sessions list waits for a log stream's leader to answer its last item
#: before it takes any replica's: while the stream elects one (a few seconds after
#: its leader is lost) none answers, and no append to it is acknowledged either.
LEADER_WAIT = 1.0

_T = TypeVar("_T")


class _Order(msgspec.Struct):
    item_order: int


class _Id(msgspec.Struct):
    item_id: str


_first_order = msgspec.json.Decoder(_Order)
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


def _multi_last_chunks(subjects: list[str], max_bytes: int) -> Iterator[list[str]]:
    """``subjects`` in runs of at most 256 whose ``multi_last`` list (JSON, as the
    request encodes it) stays under ``max_bytes``: long ids on a small max payload
    would make a request nats-py refuses to send."""
    chunk: list[str] = []
    size = 0
    for subject in subjects:
        n = len(json.dumps(subject)) + 1
        if chunk and (len(chunk) == 256 or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(subject)
        size += n
    if chunk:
        yield chunk
_item_id = msgspec.json.Decoder(_Id)


def order_of(msg: Msg) -> int:
    """A stored envelope's order, from its ``Nats-Msg-Id: <sid>:<order>``."""
    msg_id = (msg.headers or {}).get(MSG_ID, "")
    head, _, tail = msg_id.rpartition(":")
    if head and tail.isdigit():
        return int(tail)
    return meta_of(msg).item_order


def _copied(msg: Msg | None, order: int) -> bool:
    """Whether the fan-out's last message of a session shows item ``order`` copied.
    One that is no envelope (a stray publish on the items subject) does not hold
    the wait up: the sessions list checks every session against its log."""
    if msg is None:
        return False
    try:
        return order_of(msg) >= order
    except UnavailableError:
        return True


class StreamReads:
    """The read side of :class:`~.store.JetStreamStore`, and its session cache.

    Args:
        layout: the store's subjects.
        gets: returns the open store's :class:`~.api.DirectGet` of each log
            stream (by shard), then the fan-out stream's.
        max_cached_sessions: sessions kept in the cache.
        timeout: seconds the sessions list waits for the fan-out to catch up.
    """

    def __init__(
        self, layout: Layout, gets: Callable[[], list[DirectGet]], *, max_cached_sessions: int, timeout: float = 5.0
    ) -> None:
        self.layout = layout
        self._gets = gets
        self.max_cached_sessions = max_cached_sessions
        self.timeout = timeout
        self.cache: OrderedDict[str, SessionIndex] = OrderedDict()
        #: the fan-out's session ids, sorted, and the subject count they were listed at
        self._sids: tuple[tuple[int, int, int], list[str]] | None = None

    def get(self, sid: str) -> DirectGet:
        """Direct gets on the session's log stream."""
        return self._gets()[self.layout.shard_of(sid)]

    def shard(self, k: int) -> DirectGet:
        return self._gets()[k]

    def fan_out(self) -> DirectGet:
        return self._gets()[-1]

    async def session(self, sid: str, *, fresh: bool, leader: bool = False) -> SessionIndex:
        """The session's cached index; with ``fresh``, its head read from the stream
        (with ``leader``, from the stream's leader: no replica that trails it)."""
        s = self.cache.get(sid)
        if s is not None:
            self.cache.move_to_end(sid)
            if not fresh or (not leader and s.last_seq and await self._probe_head(sid, s)):
                return s
        get = self.get(sid)
        msg = await (get.last_from_leader if leader else get.last)(self.layout.session_filter(sid))
        if not leader and s is not None and s.last_order and (msg is None or meta_of(msg).item_order < s.last_order):
            # Behind what this instance knows was stored: a replica that trails the leader
            # (on R3 a follower answers direct gets once 90% caught up), or a stream that
            # no longer matches the cache. The leader tells which; a head never moves back
            # on a replica's word.
            msg = await get.last_from_leader(self.layout.session_filter(sid))
        if s is None or (msg is None and s.last_order) or (msg is not None and meta_of(msg).item_order < s.last_order):
            s = SessionIndex()  # new, or the stream no longer matches the cache
            self.cache[sid] = s
            while len(self.cache) > self.max_cached_sessions:
                self.cache.popitem(last=False)
        if msg is not None:
            s.set_head(meta_of(msg), seq_of(msg))
        return s

    async def _probe_head(self, sid: str, s: SessionIndex) -> bool:
        return await unfiltered.probe_head(self.get(sid), self.layout, sid, s)

    async def extend(self, sid: str, s: SessionIndex, upto: int) -> None:
        """Index the session's envelopes up to order ``upto``."""
        subject = self.layout.session_filter(sid)
        while s.indexed < upto:
            request = {"seq": s.seqs[-1] + 1 if s.indexed else 1, "next_by_subj": subject,
                       "batch": min(_INDEX_CHUNK, upto - s.indexed)}
            msgs = await self._caught_up(lambda request=request: self.get(sid).batch(request))
            if not msgs:
                raise UnavailableError(self._lacks(sid, s, s.indexed + 1))
            for m in msgs:
                s.add(meta_of(m), seq_of(m))

    async def last_order(self, session_id: str) -> int:
        return (await self.session(session_id, fresh=True)).last_order

    async def read(
        self, session_id: str, *, after: int, limit: int, max_bytes: int, visible: bool = False
    ) -> Page:
        s = await self.session(session_id, fresh=True)
        last = s.last_order
        if after >= last:
            return Page([], last, False)
        after = max(after, 0)
        if visible:
            await self.extend(session_id, s, last)
            orders = s.visible_orders(after, last)
            if not orders:
                return Page([], last, False)
            if limit <= 0:  # at most none, as SQLite reads: nothing, and items follow
                return Page([], last, True)
            first = orders[0]
            if first > 1 and orders[-1] == last and last - first + 1 == len(orders):
                # Nothing hidden from here on: the page is a forward read
                # from the item before it, as raw pages are.
                page = await self._fetch_plain(session_id, s, int(s.seqs[first - 2]), first - 1, last, limit, max_bytes)
                if page is not None:
                    return Page(page[0], last, page[1])
            start = s.seqs[first - 1]
        elif limit <= 0:
            return Page([], last, True)
        else:
            # A forward read needs the sequence of item ``after`` only, not an
            # index: where the last page ended (a mark), else the index.
            known = s.marks.get(after) or (int(s.seqs[after - 1]) if 0 < after <= s.indexed else 0)
            if known:
                page = await self._fetch_plain(session_id, s, known, after, last, limit, max_bytes)
                if page is not None:
                    return Page(page[0], last, page[1])
            orders = list(range(after + 1, last + 1))
            start = await self.seq_at(session_id, s, after) + 1
        items, more = await self.fetch(session_id, s, start, orders, limit, max_bytes, mark=not visible)
        return Page(items, last, more)

    async def seq_at(self, sid: str, s: SessionIndex, order: int) -> int:
        """The stream sequence of item ``order`` (0 for order 0)."""
        if order == 0:
            return 0
        if order <= s.indexed:
            return int(s.seqs[order - 1])
        if order == s.last_order:
            return s.last_seq
        seq = s.marks.get(order)
        if seq is None:
            await self.extend(sid, s, order)
            seq = int(s.seqs[order - 1])
        return seq

    async def _fetch_plain(
        self, sid: str, s: SessionIndex, seq: int, after: int, last: int, limit: int, max_bytes: int
    ) -> tuple[list[bytes], bool] | None:
        """See :func:`.unfiltered.fetch_forward`."""
        return await unfiltered.fetch_forward(self.get(sid), sid, s, seq, after, last, limit, max_bytes)

    async def _mark(self, sid: str, s: SessionIndex, order: int, envelope: bytes) -> int:
        """Look up (one direct get on its item subject) and remember the
        stream sequence of an envelope read without headers."""
        subject = self.layout.item_subject(sid, _item_id.decode(envelope).item_id)
        got = await self._caught_up(lambda: self._listed_last(sid, subject))
        if not got:
            raise UnavailableError(self._lacks(sid, s, order))
        msg = got[0]
        seq = seq_of(msg)
        unfiltered.remember(s, order, seq)
        return seq

    async def tail(
        self, session_id: str, n: int, *, visible: bool = True, max_bytes: int | None = None
    ) -> Page:
        s = await self.session(session_id, fresh=True)
        last = s.last_order
        if n <= 0 or last == 0:
            return Page([], last, False)
        await self.extend(session_id, s, last)
        orders = s.visible_tail(n, last) if visible else list(range(max(1, last - n + 1), last + 1))
        if not orders:
            return Page([], last, False)
        budget = _NO_BYTE_LIMIT if max_bytes is None else max_bytes
        items, more = await self.fetch(session_id, s, s.seqs[orders[0] - 1], orders, len(orders), budget)
        if more or sum(len(b) + 1 for b in items) > budget:  # over it (fetch gives one item whatever its size)
            return Page([], last, True)
        return Page(items, last, False)

    async def fetch(
        self, sid: str, s: SessionIndex, start: int, orders: list[int], limit: int, max_bytes: int,
        *, mark: bool = False,
    ) -> tuple[list[bytes], bool]:
        """The envelopes of ``orders`` (ascending; ``start`` is the stream
        sequence of the first), at most ``limit`` and ``max_bytes`` (but at
        least one); and whether more of ``orders`` remain.

        One batch get without headers (parsing them costs more than the rest)
        per up to 10,000 messages: the k-th message on the session's subject
        from the first order's sequence is that order + k, since orders are
        contiguous on the subject.  With ``mark`` (a forward read of every
        envelope) the sequence where a page ends, or a chunk continues, is
        looked up by its item subject instead of indexing the session.
        """
        subject = self.layout.session_filter(sid)
        items: list[bytes] = []
        size = 0
        idx = 0
        seq, base = start, orders[0]
        while True:
            end = orders[min(len(orders), idx + limit + 1) - 1]
            request: dict[str, object] = {
                "seq": seq, "next_by_subj": subject, "batch": min(_PAGE_CHUNK, end - base + 1),
            }
            if max_bytes < _NO_BYTE_LIMIT:
                # A little past the budget: the server stops soon after the
                # page is full, and usually sends the envelope that tells
                # there is more (if not, the loop asks again).
                request["max_bytes"] = max_bytes - size + _ENVELOPE_SLACK
            bodies = await self._caught_up(lambda request=request: self.get(sid).bodies(request))
            if not bodies or _first_order.decode(bodies[0]).item_order != base:
                raise UnavailableError(self._lacks(sid, s, base))
            for k, body in enumerate(bodies):
                if base + k != orders[idx]:
                    continue
                if len(items) == limit or (items and size + len(body) + 1 > max_bytes):
                    if mark:
                        await self._mark(sid, s, orders[idx - 1], items[-1])
                    return items, True
                items.append(body)
                size += len(body) + 1
                idx += 1
                if idx == len(orders):
                    return items, False
            if mark and orders[idx] == base + len(bodies):
                seq = await self._mark(sid, s, base + len(bodies) - 1, bodies[-1]) + 1
                base = orders[idx]
                continue
            base = orders[idx]
            await self.extend(sid, s, base)
            seq = s.seqs[base - 1]

    async def _caught_up(self, ask: Callable[[], Awaitable[list[_T]]]) -> list[_T]:
        """``ask()``'s answer; asked again for up to :data:`TRAILING_WAIT` seconds while
        it is empty.  Only for gets of items at or below a head read fresh: the log
        stream holds them (it deletes nothing), so nothing means a replica that trails
        the one that answered the head (the next ask may go to another replica, or
        find this one caught up)."""
        deadline = time.monotonic() + min(TRAILING_WAIT, self.timeout)
        pause = 0.005
        while True:
            got = await ask()
            if got or time.monotonic() + pause > deadline:
                return got
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def _listed_last(self, sid: str, subject: str) -> list[Msg]:
        msg = await self.get(sid).last(subject)
        return [] if msg is None else [msg]

    def _lacks(self, sid: str, s: SessionIndex, order: int) -> str:
        return (f"the log stream lacks item {order} of session {sid!r} below its head {s.last_order} "
                f"for {min(TRAILING_WAIT, self.timeout):g}s: a replica trailing its leader for longer answered, "
                f"or the stream lost it")

    async def sessions(self, *, after: str | None, limit: int) -> tuple[list[SessionInfo], bool]:
        """From the fan-out stream (one subject per session), once it holds
        the last item every log stream's leader had when the call began (and
        from a replica of it that does: on R3 any replica answers a direct get).

        The fan-out also takes whatever anyone may publish on
        ``<prefix>.items.<sid>`` (a loose NATS configuration): a session is
        listed only as its log stream holds it.  Each last envelope is checked
        against its item subject in the log (one ``multi_last`` per 256
        sessions or fewer); one that is not there is read from the log's leader instead, and a
        session the log does not hold is left out.

        The whole call keeps to ``timeout`` (each request has its own, and the
        service's client waits that long for the answer): past it, the call says
        which stream it was waiting for.

        Raises:
            UnavailableError: a stream did not answer (or the fan-out did not catch
                up) within ``timeout``.
        """
        stream = self.layout.stream
        waiting = [f"the log streams did not answer (their last items) within {self.timeout:g}s"]
        try:
            async with asyncio.timeout(self.timeout):
                floor = await self._fan_out_caught_up(waiting)
                # STREAM.INFO: only the stream's leader answers it (none while one is elected).
                waiting[0] = (f"the fan-out stream {stream} did not answer STREAM.INFO within {self.timeout:g}s "
                              f"(no leader: one is being elected, or too few of its servers are up)")
                sids = await self._session_ids()
                sids = sids[bisect.bisect_right(sids, after or ""):]
                waiting[0] = (f"the streams did not answer the sessions' last items within {self.timeout:g}s "
                              f"(or only a replica of {stream} that trails the copies waited for did)")
                out: list[SessionInfo] = []
                start = 0
                while start < len(sids) and len(out) < limit:  # a page of dropped sessions is no end
                    page = sids[start : start + limit - len(out)]
                    start += len(page)
                    out += await self._listed(page, floor)
                return out, start < len(sids)
        except TimeoutError as e:
            raise UnavailableError(f"cannot list sessions: {waiting[0]}") from e

    async def _session_ids(self) -> list[str]:
        """Every session id of the fan-out, sorted.  Listing its subjects costs the whole
        stream's, so one listing is kept while the stream's subject count says no session
        came since: a client paging through N sessions cost N subjects a page, N²/limit in
        all.  (The count is read first: a session that comes during the listing makes the
        next call list again.)"""
        key = await self.fan_out().subject_count()
        if self._sids is not None and self._sids[0] == key:
            return self._sids[1]
        counts = await self.fan_out().subjects(self.layout.items_all)
        sids = sorted(sid for sid in map(self.layout.session_of_items, counts) if _SESSION_ID.match(sid))
        self._sids = (key, sids)
        return sids

    async def _listed(self, page: list[str], floor: int) -> list[SessionInfo]:
        """The sessions of ``page`` the log holds, as it holds them (see :meth:`sessions`),
        from a replica of the fan-out that holds its sequence ``floor`` (where it showed
        the log's last items copied: on R3 the ``multi_last`` may go to another replica,
        one that trails it, whose last items of a session are older)."""
        items = self.fan_out()
        lasts = await self._multi_last(items, [self.layout.items(s) for s in page], floor=floor)
        claimed: dict[int, dict[str, bytes]] = {}  # shard -> item subject -> the fan-out's envelope
        for subject, m in lasts.items():
            sid = self.layout.session_of_items(subject)
            w = unfiltered.where(m.data)
            if w is not None and w.session_id == sid:
                claimed.setdefault(self.layout.shard_of(sid), {})[self.layout.item_subject(sid, w.item_id)] = m.data
        infos: dict[str, SessionInfo] = {}
        for k, wanted in claimed.items():
            for subject, m in (await self._multi_last(self.shard(k), list(wanted))).items():
                if m.data == wanted[subject]:
                    meta = meta_of(m)
                    sid = self.layout.session_of_log(subject)
                    infos[sid] = SessionInfo(session_id=sid, last_order=meta.item_order, updated_at=meta.created_at)
        for sid in page:
            if sid not in infos:  # not the log's envelope (or none came): the log says
                # Its leader: the replica that did not confirm the fan-out's envelope may
                # trail it, and so would its head (another instance's append, which this
                # instance's cache does not know, left out).
                ix = await self.session(sid, fresh=True, leader=True)
                if ix.last_order:
                    infos[sid] = SessionInfo(session_id=sid, last_order=ix.last_order, updated_at=ix.updated_at)
        return [infos[s] for s in page if s in infos]

    @staticmethod
    async def _multi_last(get: DirectGet, subjects: list[str], *, floor: int = 0) -> dict[str, Msg]:
        """The last message of each of ``subjects`` that has one, by subject, from a
        replica that holds the stream at least up to sequence ``floor``: one that
        answers as of an earlier one (a follower still applying what it missed) is
        asked again (the caller bounds the wait)."""
        found: dict[str, Msg] = {}
        for chunk in _multi_last_chunks(subjects, get.max_payload - 256):
            pause = 0.002
            while chunk:  # the server stops a batch at its max_pending bytes: ask again for the rest
                got, upto = await get.multi_last(chunk)
                if upto is not None and upto < floor:  # the next ask may go to another replica
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.1)
                    continue
                for m in got:
                    found[m.headers["Nats-Subject"]] = m  # type: ignore[index]
                if not got:
                    break
                chunk = [c for c in chunk if c not in found]
        return found

    async def _fan_out_caught_up(self, waiting: list[str]) -> int:
        """Wait until the fan-out holds each shard's last item (the caller bounds
        the wait; ``waiting[0]`` is set to what it waits for); returns the highest
        fan-out sequence they were copied at (0 for an empty log).

        Each source is copied in order, so once a shard's last item is there,
        every earlier one is: on a replica of the fan-out that holds that sequence.

        The shards' last items are read from their leaders (see :meth:`_shard_last`).
        """
        lasts = await asyncio.gather(*(self._shard_last(k) for k in range(self.layout.shards)))
        wanted = [
            (self.layout.session_of_log(m.headers["Nats-Subject"]), order_of(m))  # type: ignore[index]
            for m in lasts if m is not None
        ]
        waiting[0] = f"the fan-out stream {self.layout.stream} is more than {self.timeout:g}s behind the log streams"
        pause = 0.002
        floor = 0
        while wanted:
            got = await asyncio.gather(*(self.fan_out().last(self.layout.items(sid)) for sid, _ in wanted))
            floor = max([floor] + [seq_of(m) for w, m in zip(wanted, got, strict=True) if _copied(m, w[1])])
            wanted = [w for w, m in zip(wanted, got, strict=True) if not _copied(m, w[1])]
            if not wanted:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)
        return floor

    async def _shard_last(self, k: int) -> Msg | None:
        """Log stream ``k``'s last item, as its leader has it: a direct get may be
        answered by a replica that trails the leader, whose older last item let the
        list skip an append acknowledged just before the call (read-your-writes).
        A stream with no leader for :data:`LEADER_WAIT` (an election, when no append
        to it is acknowledged) is answered by any replica, so the list stays as
        available as with direct gets alone."""
        get, subject = self.shard(k), self.layout.log_all(k)
        try:
            async with asyncio.timeout(min(LEADER_WAIT, self.timeout / 2)):
                return await get.last_from_leader(subject)
        except (TimeoutError, UnavailableError):
            return await get.last(subject)

    async def committed_after(self, position: int, limit: int) -> list[Committed]:
        """Committed envelopes past ``position`` (see :func:`.commit.position`)."""
        n = self.layout.shards
        out: list[Committed] = []
        for k in range(n):
            seq = max(1, (position - k) // n + 1)
            mine = 0
            while mine < limit:
                msgs = await self.shard(k).batch(
                    {"seq": seq, "next_by_subj": self.layout.log_all(k), "batch": min(_GET_CHUNK, limit - mine)}
                )
                if not msgs:
                    break
                for m in msgs:
                    at = seq_of(m)
                    seq = at + 1
                    sid = self.layout.session_of_log(m.headers["Nats-Subject"])  # type: ignore[index]
                    out.append(Committed(at * n + k, sid, order_of(m), m.data))
                mine += len(msgs)
        out.sort(key=lambda c: c.position)
        return out[:limit]

    async def position_of(self, session_id: str, item_order: int) -> int | None:
        s = await self.session(session_id, fresh=True)
        if not 1 <= item_order <= s.last_order:
            return None
        await self.extend(session_id, s, item_order)
        return int(s.seqs[item_order - 1]) * self.layout.shards + self.layout.shard_of(session_id)
