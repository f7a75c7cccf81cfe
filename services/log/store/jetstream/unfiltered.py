"""Reads on a log stream without the session's wildcard filter.

A direct get filtered by ``<prefix>.log.<k>.<sid>.*`` (a last-by-subject or
a batch) costs the server a walk over the session's subjects, one per item:
about 15-20 ms per request at 50k items, whatever the request's size, where
an unfiltered batch costs ~0.2 ms.  So where the store already knows a
sequence of the session (its cached head, the mark where a forward page
ended, its index), it reads the shard from there unfiltered and picks the
session's envelopes by their body (``session_id``, ``item_order``), checking
that the known sequence still holds what it should.  Otherwise, or when the
shard interleaves other sessions' items so much that the filter is cheaper,
the callers in :mod:`.reads` take the filtered way.
"""

from __future__ import annotations

import msgspec

from .api import DirectGet
from .index import SessionIndex, meta_of, seq_of
from .layout import Layout

__all__ = ["NO_BYTE_LIMIT", "fetch_forward", "probe_head", "remember", "where"]

NO_BYTE_LIMIT = 1 << 40
MAX_MARKS = 64
#: Messages a head probe reads past the cached head (more: the wildcard get).
_PROBE = 256
#: Most bytes a head probe asks for (the server's own cap is its max_pending).
_PROBE_BYTES = 8 << 20
#: The first unfiltered chunk of a page: small, in case the shard interleaves sessions.
_FIRST_PLAIN = 256
#: Past a page's byte budget an unfiltered get may send (``more`` comes from the head).
_PLAIN_SLACK = 4096
_PAGE_CHUNK = 10_000


class _Where(msgspec.Struct):
    """Whose envelope a message is (read from a body without headers)."""

    session_id: str
    item_order: int
    item_id: str
    hash: str


_where_of = msgspec.json.Decoder(_Where)


def where(data: bytes) -> _Where | None:
    """Whose envelope ``data`` is, or None when it is not one."""
    try:
        return _where_of.decode(data)
    except msgspec.DecodeError:
        return None


def remember(s: SessionIndex, order: int, seq: int) -> None:
    """Mark the stream sequence of item ``order`` (a few kept per session)."""
    if len(s.marks) >= MAX_MARKS:
        s.marks.clear()
    s.marks[order] = seq


async def probe_head(get: DirectGet, layout: Layout, sid: str, s: SessionIndex) -> bool:
    """Bring a cached head up to date without the session's wildcard.

    A wildcard get costs the server a walk over the session's subjects
    (one per item: ~15 ms at 50k items), so a cached head is checked with
    one unfiltered batch from its own sequence instead: the first message
    must be that head, and the session's last message among the rest (if
    any) is looked up by its item subject for its sequence.  False (the
    caller reads the head the wildcard way): the shard moved on by more
    than :data:`_PROBE` messages, or the stream no longer matches.
    """
    bodies = await get.bodies({"seq": s.last_seq, "batch": _PROBE, "max_bytes": _PROBE_BYTES})
    # Fewer than asked for means the shard ends here only if the server did
    # not stop at the byte limit (it counts subject and headers too).
    if not bodies or len(bodies) >= _PROBE or sum(len(b) + 2048 for b in bodies) >= _PROBE_BYTES:
        return False
    first = where(bodies[0])
    if first is None or (first.session_id, first.item_order, first.hash) != (sid, s.last_order, s.last_hash):
        return False
    for body in reversed(bodies[1:]):
        w = where(body)
        if w is None:
            return False
        if w.session_id == sid:
            got = await get.last(layout.item_subject(sid, w.item_id))
            if got is None or w.item_order <= s.last_order:
                return False
            s.set_head(meta_of(got), seq_of(got))
            break
    return True


async def fetch_forward(
    get: DirectGet, sid: str, s: SessionIndex, seq: int, after: int, last: int, limit: int, max_bytes: int
) -> tuple[list[bytes], bool] | None:
    """A forward page from ``seq`` (where item ``after`` is stored) with
    unfiltered batch gets: the server skips its per-request walk over the
    session's subjects (a filtered get costs ~20 ms at 50k items), and the
    session's envelopes are picked from the shard's by their body.

    The k-th message of an unfiltered batch from ``seq`` is taken to be at
    ``seq + k`` (log streams delete nothing); that only places the mark
    where the page ends, and a mark is checked when used: the first
    message must be item ``after`` of this session.  ``None`` (the filtered
    path takes over): the check failed, or the shard interleaves other
    sessions' items so much that the filter is cheaper.
    """
    items: list[bytes] = []
    size = 0
    want = after  # first the item at the mark itself, then after + 1, ...
    chunk = _FIRST_PLAIN
    taken = seq
    while True:
        request: dict[str, object] = {"seq": seq, "batch": chunk}
        if max_bytes < NO_BYTE_LIMIT:
            request["max_bytes"] = max_bytes - size + _PLAIN_SLACK
        bodies = await get.bodies(request)
        if not bodies:
            return None
        mine = 0
        for k, body in enumerate(bodies):
            w = where(body)
            if w is None:
                return None
            if w.session_id != sid:
                continue
            mine += 1
            if w.item_order != want:
                s.marks.pop(after, None)  # the mark (or the seq arithmetic) was wrong
                return None
            want += 1
            if want == after + 1:
                continue  # the mark checked out
            if items and size + len(body) + 1 > max_bytes:
                remember(s, want - 2, taken)
                return items, True
            items.append(body)
            size += len(body) + 1
            taken = seq + k
            if want > last:
                return items, False
            if len(items) == limit:
                remember(s, want - 1, taken)
                return items, True
        if mine * 2 < len(bodies):
            return None
        seq += len(bodies)
        chunk = min(_PAGE_CHUNK, max(limit - len(items), 1))
