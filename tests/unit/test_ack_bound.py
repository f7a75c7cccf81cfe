"""The ack-size bound the log service checks before an append is written."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from services.log.handlers import ack_size_bound
from shared.messages import AppendedItem, AppendReply

MAX_ORDER = 2**53 - 1
ids = st.text(alphabet="abcXYZ019_.:@=+/-", min_size=1, max_size=200)


def test_the_bound_is_tight_for_the_largest_ack() -> None:
    item_ids = ["i" * 200, "j" * 200]
    reply = AppendReply(
        session_id="s" * 128, first_order=MAX_ORDER, last_order=MAX_ORDER,
        items=[AppendedItem(item_order=MAX_ORDER, item_id=i, hash="f" * 64) for i in item_ids],
    )
    # Off by one byte only: n items are separated by n - 1 commas, the bound counts n.
    assert ack_size_bound(item_ids) - len(msgspec.json.encode(reply)) == 1


@given(
    sid=st.text(alphabet="ab-_0", min_size=1, max_size=128),
    first=st.integers(1, MAX_ORDER - 1000),
    items=st.lists(st.tuples(ids, st.booleans()), min_size=1, max_size=50),
)
def test_no_real_ack_is_larger_than_the_bound(sid: str, first: int, items: list[tuple[str, bool]]) -> None:
    reply = AppendReply(
        session_id=sid, first_order=first, last_order=first + len(items) - 1,
        items=[
            AppendedItem(item_order=first + n, item_id=i, hash="0" * 64, duplicate=dup)
            for n, (i, dup) in enumerate(items)
        ],
    )
    assert len(msgspec.json.encode(reply)) <= ack_size_bound([i for i, _ in items])
