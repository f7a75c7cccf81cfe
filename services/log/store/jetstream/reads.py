"""Reads on the JetStream store: direct gets over a per-instance cache.

The cache (:class:`~.index.SessionIndex` per session, least recently used
dropped first) maps each session's orders to stream sequences.  Every read
first loads the session's head fresh (one ``last_by_subj`` direct get), so it
sees every append any instance acknowledged; the index then grows from where
it stopped (``next_by_subj`` batches), and the envelopes come back with one
batch get from the first wanted sequence.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg

from shared.errors import UnavailableError
from shared.messages import SessionInfo

from ..base import Committed, Page
from .api import MSG_ID, DirectGet
from .index import SessionIndex, meta_of, seq_of
from .layout import Layout

__all__ = ["StreamReads"]

_GET_CHUNK = 1000
_PAGE_CHUNK = 10_000
_NO_BYTE_LIMIT = 1 << 40
_ENVELOPE_SLACK = 256 << 10  # about the largest envelope (a bigger one costs a second request)


class _Order(msgspec.Struct):
    item_order: int


_first_order = msgspec.json.Decoder(_Order)


def order_of(msg: Msg) -> int:
    """A stored envelope's order, from its ``Nats-Msg-Id: <sid>:<order>``."""
    msg_id = (msg.headers or {}).get(MSG_ID, "")
    head, _, tail = msg_id.rpartition(":")
    if head and tail.isdigit():
        return int(tail)
    return meta_of(msg).item_order


class StreamReads:
    """The read side of :class:`~.store.JetStreamStore`, and its session cache.

    Args:
        layout: the store's subjects.
        get: returns the open store's :class:`~.api.DirectGet`.
        max_cached_sessions: sessions kept in the cache.
    """

    def __init__(self, layout: Layout, get: Callable[[], DirectGet], *, max_cached_sessions: int) -> None:
        self.layout = layout
        self.get = get
        self.max_cached_sessions = max_cached_sessions
        self.cache: OrderedDict[str, SessionIndex] = OrderedDict()

    async def session(self, sid: str, *, fresh: bool) -> SessionIndex:
        """The session's cached index; with ``fresh``, its head read from the stream."""
        s = self.cache.get(sid)
        if s is not None:
            self.cache.move_to_end(sid)
            if not fresh:
                return s
        msg = await self.get().last(self.layout.items(sid))
        if s is None or (msg is None and s.last_order) or (msg is not None and meta_of(msg).item_order < s.last_order):
            s = SessionIndex()  # new, or the stream no longer matches the cache
            self.cache[sid] = s
            while len(self.cache) > self.max_cached_sessions:
                self.cache.popitem(last=False)
        if msg is not None:
            s.set_head(meta_of(msg), seq_of(msg))
        return s

    async def extend(self, sid: str, s: SessionIndex, upto: int) -> None:
        """Index the session's envelopes up to order ``upto``."""
        subject = self.layout.items(sid)
        while s.indexed < upto:
            start = s.seqs[-1] + 1 if s.indexed else 1
            msgs = await self.get().batch(
                {"seq": start, "next_by_subj": subject, "batch": min(_GET_CHUNK, upto - s.indexed)}
            )
            if not msgs:
                raise UnavailableError(f"the log stream lacks items of session {sid!r} after {s.indexed}")
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
            start = s.seqs[orders[0] - 1]
        else:
            await self.extend(session_id, s, after)
            orders = list(range(after + 1, last + 1))
            start = s.seqs[after - 1] + 1 if after else 1
        items, more = await self.fetch(session_id, s, start, orders, limit, max_bytes)
        return Page(items, last, more)

    async def tail(self, session_id: str, n: int, *, visible: bool = True) -> Page:
        s = await self.session(session_id, fresh=True)
        last = s.last_order
        if n <= 0 or last == 0:
            return Page([], last, False)
        await self.extend(session_id, s, last)
        orders = s.visible_tail(n, last) if visible else list(range(max(1, last - n + 1), last + 1))
        if not orders:
            return Page([], last, False)
        items, _ = await self.fetch(session_id, s, s.seqs[orders[0] - 1], orders, len(orders), _NO_BYTE_LIMIT)
        return Page(items, last, False)

    async def fetch(
        self, sid: str, s: SessionIndex, start: int, orders: list[int], limit: int, max_bytes: int
    ) -> tuple[list[bytes], bool]:
        """The envelopes of ``orders`` (ascending; ``start`` is the stream
        sequence of the first), at most ``limit`` and ``max_bytes`` (but at
        least one); and whether more of ``orders`` remain.

        One batch get without headers (parsing them costs more than the rest)
        per up to 10,000 messages: the k-th message on the session's subject
        from the first order's sequence is that order + k, since orders are
        contiguous on the subject.
        """
        subject = self.layout.items(sid)
        items: list[bytes] = []
        size = 0
        idx = 0
        seq, base = start, orders[0]
        while True:
            end = orders[min(len(orders), idx + limit + 1) - 1]
            request: dict[str, object] = {
                "seq": seq, "next_by_subj": subject, "batch": min(_PAGE_CHUNK, end - base + 1), "no_hdr": True,
            }
            if max_bytes < _NO_BYTE_LIMIT:
                # A little past the budget: the server stops soon after the
                # page is full, and usually sends the envelope that tells
                # there is more (if not, the loop asks again).
                request["max_bytes"] = max_bytes - size + _ENVELOPE_SLACK
            msgs = await self.get().batch(request)
            if not msgs or _first_order.decode(msgs[0].data).item_order != base:
                raise UnavailableError(f"the log stream lacks item {base} of session {sid!r}")
            for k, m in enumerate(msgs):
                if base + k != orders[idx]:
                    continue
                if len(items) == limit or (items and size + len(m.data) + 1 > max_bytes):
                    return items, True
                items.append(m.data)
                size += len(m.data) + 1
                idx += 1
                if idx == len(orders):
                    return items, False
            base = orders[idx]
            await self.extend(sid, s, base)
            seq = s.seqs[base - 1]

    async def sessions(self, *, after: str | None, limit: int) -> tuple[list[SessionInfo], bool]:
        counts = await self.get().subjects(self.layout.items_all)
        sids = sorted(sid for sid in map(self.layout.session_of, counts) if sid > (after or ""))
        page, more = sids[:limit], len(sids) > limit
        infos: dict[str, SessionInfo] = {}
        for i in range(0, len(page), 256):
            chunk = [self.layout.items(s) for s in page[i : i + 256]]
            for m in await self.get().batch({"multi_last": chunk, "batch": len(chunk)}):
                meta = meta_of(m)
                sid = self.layout.session_of(m.headers["Nats-Subject"])  # type: ignore[index]
                infos[sid] = SessionInfo(session_id=sid, last_order=meta.item_order, updated_at=meta.created_at)
        return [infos[s] for s in page if s in infos], more

    async def committed_after(self, position: int, limit: int) -> list[Committed]:
        out: list[Committed] = []
        seq = position + 1
        while len(out) < limit:
            msgs = await self.get().batch(
                {"seq": seq, "next_by_subj": self.layout.items_all, "batch": min(_GET_CHUNK, limit - len(out))}
            )
            if not msgs:
                break
            for m in msgs:
                seq = seq_of(m) + 1
                sid = self.layout.session_of(m.headers["Nats-Subject"])  # type: ignore[index]
                out.append(Committed(seq - 1, sid, order_of(m), m.data))
        return out

    async def position_of(self, session_id: str, item_order: int) -> int | None:
        s = await self.session(session_id, fresh=True)
        if not 1 <= item_order <= s.last_order:
            return None
        await self.extend(session_id, s, item_order)
        return int(s.seqs[item_order - 1])

