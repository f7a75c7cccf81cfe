"""The visible-history projection against an independent reference model.

The reference says, for each ``item`` at order ``o``: it is visible unless a
``clear`` has a higher order, or some ``retract`` names ``o`` as an int target.
It is checked against the shared fold (``shared.history.visible``) and against
what a real SQLite store serves from ``tail`` and ``read(visible=True)``.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from services.log.store.sqlite import SQLiteStore
from shared.chain import verify
from shared.history import retract_target, visible
from shared.messages import AppendItem, AppendRequest, Envelope

# One op per order: (kind, data).
Op = tuple[str, dict[str, Any]]


def reference_visible(ops: list[Op]) -> list[int]:
    """Orders of the visible items, straight from the definition."""
    clears = [o for o, (kind, _) in enumerate(ops, 1) if kind == "clear"]
    retracted = {
        data.get("target")
        for kind, data in ops
        if kind == "retract" and type(data.get("target")) is int
    }
    return [
        o
        for o, (kind, _) in enumerate(ops, 1)
        if kind == "item" and not any(c > o for c in clears) and o not in retracted
    ]


@st.composite
def programs(draw: st.DrawFn, *, valid: bool) -> list[Op]:
    """A session's ops; with ``valid`` only what a store accepts (retracts
    target an earlier ``item``), otherwise any target at all."""
    ops: list[Op] = []
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(["item", "item", "item", "retract", "clear"]))
        if kind == "item":
            ops.append(("item", {"role": "user", "content": f"m{len(ops) + 1}"}))
        elif kind == "clear":
            ops.append(("clear", {}))
        elif valid:
            items = [o for o, (k, _) in enumerate(ops, 1) if k == "item"]
            if items:
                ops.append(("retract", {"target": draw(st.sampled_from(items))}))
        else:
            target = draw(
                st.integers(-1, len(ops) + 3) | st.sampled_from([True, False, "1", None, 1.0])
            )
            ops.append(("retract", {"target": target}))
    return ops


def envelopes(ops: list[Op]) -> list[Envelope]:
    return [
        Envelope(session_id="s", item_order=o, item_id=f"i{o}", agent="a", kind=kind,  # type: ignore[arg-type]
                 data=data, created_at="2026-03-14T09:30:00.000000Z", hash="")
        for o, (kind, data) in enumerate(ops, 1)
    ]


@settings(max_examples=300, deadline=None)
@given(programs(valid=False))
def test_fold_matches_the_reference_model(ops: list[Op]) -> None:
    shown = visible(envelopes(ops))
    assert [e.item_order for e in shown] == reference_visible(ops)
    assert all(e.kind == "item" for e in shown)


def test_fold_examples() -> None:
    ops: list[Op] = [
        ("item", {"content": "a"}),  # 1
        ("item", {"content": "b"}),  # 2
        ("retract", {"target": 1}),  # 3
        ("item", {"content": "c"}),  # 4
    ]
    assert [e.item_order for e in visible(envelopes(ops))] == [2, 4]
    ops += [("clear", {}), ("item", {"content": "d"}), ("retract", {"target": True})]
    assert [e.item_order for e in visible(envelopes(ops))] == [6]
    assert retract_target(envelopes(ops)[6]) is None
    assert retract_target(envelopes(ops)[2]) == 1


# -- the same projection served by a real SQLite store ----------------------------


def requests_for(ops: list[Op], splits: list[int]) -> list[list[AppendItem]]:
    """Group ops into append requests; a retract never shares a request with its target."""
    groups: list[list[AppendItem]] = [[]]
    start = 1  # order of the first op of the current group
    for o, (kind, data) in enumerate(ops, 1):
        target = data.get("target")
        split_here = (o - 1) in splits or (kind == "retract" and target >= start)
        if split_here and groups[-1]:
            groups.append([])
            start = o
        agent = "user" if kind == "item" else "system"
        groups[-1].append(AppendItem(agent=agent, kind=kind, data=data, item_id=f"i{o}"))  # type: ignore[arg-type]
    return [g for g in groups if g]


async def served(tmp: Path, ops: list[Op], splits: list[int], after: int) -> None:
    store = SQLiteStore(tmp / "log.db")
    await store.open()
    try:
        for items in requests_for(ops, splits):
            await store.append("s", AppendRequest(items=items))
        expected = reference_visible(ops)

        raw_page = await store.read("s", after=0, limit=10_000, max_bytes=1 << 30)
        raw = [msgspec.json.decode(b, type=Envelope) for b in raw_page.items]
        assert [e.item_order for e in raw] == list(range(1, len(ops) + 1))
        assert verify(raw, session_id="s") is None
        assert [e.item_order for e in visible(raw)] == expected

        page = await store.read("s", after=0, limit=10_000, max_bytes=1 << 30, visible=True)
        assert [decode_order(b) for b in page.items] == expected
        page = await store.read("s", after=after, limit=10_000, max_bytes=1 << 30, visible=True)
        assert [decode_order(b) for b in page.items] == [o for o in expected if o > after]
        for n in {0, 1, 3, len(expected), len(expected) + 5}:
            tail = await store.tail("s", n)
            assert [decode_order(b) for b in tail.items] == (expected[-n:] if n else [])
            assert tail.last_order == len(ops)
    finally:
        await store.close()


def decode_order(raw: bytes) -> int:
    env = msgspec.json.decode(raw, type=Envelope)
    assert env.kind == "item"
    return env.item_order


@settings(max_examples=30, deadline=None)
@given(
    programs(valid=True),
    st.lists(st.integers(1, 30), max_size=6),
    st.integers(0, 32),
)
def test_store_tail_and_visible_read_equal_the_fold(
    ops: list[Op], splits: list[int], after: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(served(Path(tmp), ops, splits, after))
