"""``new_item_id``: UUIDv7 hex, time-ordered, accepted as an ``item_id``."""

from __future__ import annotations

import time
import uuid

import msgspec

from shared.client import new_item_id
from shared.messages import AppendItem


def test_new_item_ids_are_uuid7_hex_and_unique() -> None:
    ids = [new_item_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for i in ids[:50]:
        u = uuid.UUID(hex=i)
        assert len(i) == 32 and u.hex == i
        assert u.version == 7 and u.variant == uuid.RFC_4122
        # The service validates ids on the wire: minted ones must pass.
        msgspec.convert({"agent": "a", "data": {"x": 1}, "item_id": i}, AppendItem)


def test_new_item_ids_carry_the_time_and_sort_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_item_id()
    time.sleep(0.003)
    second = new_item_id()
    after = time.time_ns() // 1_000_000
    assert before <= int(first[:12], 16) <= int(second[:12], 16) <= after
    # A later millisecond sorts later: the (item_id, session_id) index grows at its end.
    assert first < second
