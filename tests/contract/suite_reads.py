"""The store suite's read guarantees: the retract/clear projections, tail, paging
and the sessions listing.
"""

from __future__ import annotations

import pytest

from services.log.store.base import LogStore
from shared.chain import verify
from shared.errors import BadRequestError
from shared.history import visible

from .store_helpers import (
    BIG,
    RFC3339_MICRO,
    SuiteBase,
    clear,
    contents,
    envs,
    item,
    orders,
    read_all,
    req,
    retract,
)

__all__ = ["ReadGuarantees"]


class ReadGuarantees(SuiteBase):
    """The read guarantees every log store backend must keep."""

    # -- 6. retract and clear projections ---------------------------------------

    async def test_retract_and_clear_projections(self, store: LogStore) -> None:
        await store.append("s", req(*(item(f"m{i}") for i in range(1, 5))))  # 1..4
        await store.append("s", req(retract(2)))  # 5
        assert contents(envs((await store.tail("s", 10)).items)) == ["m1", "m3", "m4"]
        assert contents(await read_all(store, "s", visible_only=True)) == ["m1", "m3", "m4"]
        raw = await read_all(store, "s")
        assert [e.kind for e in raw] == ["item"] * 4 + ["retract"]
        assert raw[4].data == {"target": 2}

        # Only items can be retracted, not a retract or a clear.
        with pytest.raises(BadRequestError):
            await store.append("s", req(retract(5)))
        await store.append("s", req(item("m6")))  # 6
        await store.append("s", req(clear()))  # 7
        with pytest.raises(BadRequestError):
            await store.append("s", req(retract(7)))
        assert envs((await store.tail("s", 10)).items) == []
        assert await read_all(store, "s", visible_only=True) == []

        await store.append("s", req(item("m8"), item("m9")))  # 8, 9
        await store.append("s", req(retract(8)))  # 10
        await store.append("s", req(item("m11")))  # 11
        expected = ["m9", "m11"]
        assert contents(envs((await store.tail("s", 10)).items)) == expected
        assert contents(await read_all(store, "s", visible_only=True)) == expected
        page = await store.read("s", after=9, limit=10, max_bytes=BIG, visible=True)
        assert orders(envs(page.items)) == [11] and page.last_order == 11
        # The projection agrees with the shared fold over the raw log.
        raw = await read_all(store, "s")
        assert orders(raw) == list(range(1, 12))
        assert orders(visible(raw)) == [9, 11]
        assert verify(raw, session_id="s") is None

    # -- 7. tail ---------------------------------------------------------------

    async def test_tail_gives_the_last_n_visible_items_oldest_first(self, store: LogStore) -> None:
        await store.append("s", req(*(item(f"m{i}") for i in range(1, 13))))  # 1..12
        await store.append("s", req(retract(11)))  # 13
        p = await store.tail("s", 3)
        assert orders(envs(p.items)) == [9, 10, 12]
        assert (p.last_order, p.more) == (13, False)
        assert orders(envs((await store.tail("s", 1)).items)) == [12]
        assert orders(envs((await store.tail("s", 100)).items)) == [o for o in range(1, 13) if o != 11]
        zero = await store.tail("s", 0)
        assert (zero.items, zero.last_order) == ([], 13)
        assert orders(envs((await store.tail("s", 3, visible=False)).items)) == [11, 12, 13]
        none = await store.tail("unknown", 5)
        assert (none.items, none.last_order) == ([], 0)

    async def test_a_tail_over_max_bytes_is_empty_with_more(self, store: LogStore) -> None:
        # The log service refuses such a tail (too_large); the store tells it so
        # without handing over every item it would take.
        await store.append("s", req(*(item(f"m{i:02d} " + "x" * 200) for i in range(1, 41))))
        whole = await store.tail("s", 40)
        assert orders(envs(whole.items)) == list(range(1, 41)) and not whole.more
        size = sum(len(b) + 1 for b in whole.items)
        fits = await store.tail("s", 40, max_bytes=size)
        assert (fits.items, fits.more) == (whole.items, False)
        for budget in (size - 1, size // 2, 1):
            over = await store.tail("s", 40, max_bytes=budget)
            assert (over.items, over.last_order, over.more) == ([], 40, True), budget
        one = await store.tail("s", 1, visible=False, max_bytes=len(whole.items[-1]))
        assert (one.items, one.more) == ([], True)  # one item over it too
        assert orders(envs((await store.tail("s", 3, max_bytes=size)).items)) == [38, 39, 40]

    # -- 8. paging ---------------------------------------------------------------

    async def test_read_pages_with_limit_and_max_bytes(self, store: LogStore) -> None:
        await store.append("s", req(*(item(f"message number {i:03d} " + "x" * 80) for i in range(1, 31))))

        p = await store.read("s", after=0, limit=10, max_bytes=BIG)
        assert orders(envs(p.items)) == list(range(1, 11))
        assert (p.more, p.last_order) == (True, 30)
        p = await store.read("s", after=20, limit=10, max_bytes=BIG)
        assert orders(envs(p.items)) == list(range(21, 31)) and not p.more
        p = await store.read("s", after=30, limit=10, max_bytes=BIG)
        assert (p.items, p.more, p.last_order) == ([], False, 30)

        sizes = [len(b) for b in (await store.read("s", after=0, limit=100, max_bytes=BIG)).items]
        budget = sum(sizes[:3]) + 3
        p = await store.read("s", after=0, limit=100, max_bytes=budget)
        assert orders(envs(p.items)) == [1, 2, 3] and p.more
        assert sum(len(b) for b in p.items) <= budget
        # A single item larger than the budget still comes back, alone.
        p = await store.read("s", after=4, limit=100, max_bytes=1)
        assert orders(envs(p.items)) == [5] and p.more

        # A negative after reads from the start (the wire refuses one; other callers
        # compute it, e.g. item_order - 1), raw and visible alike.
        for only_visible in (False, True):
            p = await store.read("s", after=-1, limit=3, max_bytes=BIG, visible=only_visible)
            assert orders(envs(p.items)) == [1, 2, 3] and p.more

        # Paging with small byte budgets reassembles the session exactly once.
        seen: list[int] = []
        after = 0
        while True:
            p = await store.read("s", after=after, limit=7, max_bytes=budget)
            seen += orders(envs(p.items))
            if not p.more:
                break
            after = seen[-1]
        assert seen == list(range(1, 31))

    async def test_a_limit_of_zero_reads_nothing_and_says_whether_items_follow(self, store: LogStore) -> None:
        # The wire refuses limit 0; a caller that computes a limit may not: "at most
        # limit" items, and ``more`` as for any full page.
        await store.append("s", req(item("a"), item("b"), item("c")))
        for only_visible in (False, True):
            for after in (0, 1):
                p = await store.read("s", after=after, limit=0, max_bytes=BIG, visible=only_visible)
                assert (p.items, p.last_order, p.more) == ([], 3, True)
            p = await store.read("s", after=3, limit=0, max_bytes=BIG, visible=only_visible)
            assert (p.items, p.last_order, p.more) == ([], 3, False)

    # -- 9. sessions listing -----------------------------------------------------

    async def test_sessions_are_listed_by_id_with_paging(self, store: LogStore) -> None:
        for n, sid in enumerate(["c", "a", "e", "b", "d"], start=1):
            await store.append(sid, req(*(item(f"{sid}{i}") for i in range(n))))
        infos, more = await store.sessions(after=None, limit=2)
        assert [(i.session_id, i.last_order) for i in infos] == [("a", 2), ("b", 4)] and more
        infos, more = await store.sessions(after="b", limit=2)
        assert [(i.session_id, i.last_order) for i in infos] == [("c", 1), ("d", 5)] and more
        infos, more = await store.sessions(after="d", limit=2)
        assert [(i.session_id, i.last_order) for i in infos] == [("e", 3)] and not more
        assert await store.sessions(after="e", limit=2) == ([], False)
        everything, more = await store.sessions(after=None, limit=100)
        assert [i.session_id for i in everything] == ["a", "b", "c", "d", "e"] and not more
        assert all(RFC3339_MICRO.match(i.updated_at) for i in everything)

        before = {i.session_id: i.updated_at for i in everything}
        await store.append("a", req(item("later")))
        infos, _ = await store.sessions(after=None, limit=1)
        assert infos[0].last_order == 3 and infos[0].updated_at >= before["a"]
