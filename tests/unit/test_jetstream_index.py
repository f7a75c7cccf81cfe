"""The JetStream store's session index answers visibility as of the head a read took.

A read takes the session's head, then extends the index up to it; the index may
already reach further (another read, or a commit on this instance, extended it
meanwhile). A retract or clear past the read's head must hide nothing in that
read, as on the SQLite store (``hidden = 0 OR hidden > last``): a read as of
order 3 hid every item because of a clear at order 4 (seen with two instances
appending and reading one session: an empty history with ``last_order`` 3).
"""

from __future__ import annotations

import msgspec

from services.log.store.jetstream.index import Meta, SessionIndex


def _meta(order: int, kind: str = "item", target: int | None = None) -> Meta:
    data = msgspec.Raw(msgspec.json.encode({"target": target} if kind == "retract" else {"n": order}))
    return Meta(item_order=order, kind=kind, hash=f"h{order}", created_at="2026-01-01T00:00:00.000000Z", data=data)


def _index(*metas: Meta) -> SessionIndex:
    s = SessionIndex()
    for seq, m in enumerate(metas, start=1):
        s.add(m, seq)
    return s


def test_a_clear_past_the_reads_head_hides_nothing_yet() -> None:
    s = _index(_meta(1), _meta(2), _meta(3), _meta(4, "clear"), _meta(5), _meta(6, "clear"), _meta(7))
    assert s.visible_orders(0, 3) == [1, 2, 3]
    assert s.visible_tail(10, 3) == [1, 2, 3]
    assert s.visible_orders(0, 5) == [5]
    assert s.visible_tail(10, 5) == [5]
    assert s.visible_orders(0, 7) == [7]
    assert s.visible_tail(10, 7) == [7]


def test_a_retract_past_the_reads_head_hides_nothing_yet() -> None:
    s = _index(_meta(1), _meta(2), _meta(3, "retract", 1), _meta(4, "retract", 2), _meta(5, "retract", 2))
    assert s.visible_orders(0, 2) == [1, 2]
    assert s.visible_tail(2, 2) == [1, 2]
    assert s.visible_orders(0, 3) == [2]
    assert s.visible_tail(5, 3) == [2]
    assert s.visible_orders(0, 5) == []
    assert s.visible_tail(5, 5) == []
