"""The conformance suite every :class:`~services.log.store.base.LogStore` passes.

``StoreSuite`` is not collected by itself (no ``Test`` prefix). Each backend's
test module subclasses it, implements :meth:`StoreSuite.make_store` and adds
only what is specific to that backend::

    class TestSQLiteStore(StoreSuite):
        async def make_store(self, tmp_path):
            store = SQLiteStore(tmp_path / "log.db")
            await store.open()
            return store

One test per guarantee of DESIGN.md and the ``LogStore`` docstring: orders
contiguous from 1, all-or-nothing batches, idempotent ``item_id``,
``expected_last`` and the retry-by-ids rule, the retract/clear projections,
paging, the global commit order the outbox relies on, group commit,
durability across a reopen and exclusive ownership of the data.
"""

from __future__ import annotations

import abc
import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.log.store.base import Committed, LogStore, StoreClosedError
from shared.chain import GENESIS_HASH, envelope_hash, verify
from shared.errors import BadRequestError, ConflictError, UnavailableError
from shared.history import visible
from shared.messages import AppendedItem, AppendItem, AppendReply, AppendRequest, Envelope

__all__ = ["StoreSuite"]

BIG = 1 << 30
RFC3339_MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


# -- helpers -------------------------------------------------------------------


def item(content: str = "hi", *, item_id: str | None = None, agent: str = "user") -> AppendItem:
    """A user message item as the Agents SDK stores it."""
    return AppendItem(agent=agent, data={"role": "user", "content": content}, item_id=item_id)


def retract(target: Any, *, item_id: str | None = None) -> AppendItem:
    return AppendItem(agent="system", kind="retract", data={"target": target}, item_id=item_id)


def clear(*, item_id: str | None = None) -> AppendItem:
    return AppendItem(agent="system", kind="clear", item_id=item_id)


def req(*items: AppendItem, expected_last: int | None = None) -> AppendRequest:
    return AppendRequest(items=list(items), expected_last=expected_last)


def envs(raw: Sequence[bytes]) -> list[Envelope]:
    return [msgspec.json.decode(b, type=Envelope) for b in raw]


async def read_all(store: LogStore, sid: str, *, visible_only: bool = False) -> list[Envelope]:
    page = await store.read(sid, after=0, limit=100_000, max_bytes=BIG, visible=visible_only)
    assert not page.more
    return envs(page.items)


def contents(items: Sequence[Envelope]) -> list[str]:
    return [e.data["content"] for e in items]


def orders(items: Sequence[Envelope]) -> list[int]:
    return [e.item_order for e in items]


class StoreSuite(abc.ABC):
    """Guarantees every log store backend must keep."""

    @abc.abstractmethod
    async def make_store(self, tmp_path: Path) -> LogStore:
        """Return an *opened* store whose data lives under ``tmp_path``.

        Calling it again with the same ``tmp_path`` must open the same data
        (the durability and exclusive-ownership tests rely on it).
        """

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[LogStore]:
        s = await self.make_store(tmp_path)
        try:
            yield s
        finally:
            await s.close()

    # -- 1. one contiguous order per session --------------------------------

    async def test_orders_are_contiguous_from_one_per_session(self, store: LogStore) -> None:
        r1 = await store.append("s1", req(item("a", item_id="a"), item("b", item_id="b")))
        assert (r1.session_id, r1.first_order, r1.last_order) == ("s1", 1, 2)
        assert [(i.item_order, i.item_id, i.duplicate) for i in r1.items] == [
            (1, "a", False), (2, "b", False),
        ]
        r2 = await store.append("s1", req(item("c")))
        assert (r2.first_order, r2.last_order) == (3, 3)
        # Another session has its own sequence, starting at 1.
        r3 = await store.append("s2", req(item("x")))
        assert (r3.first_order, r3.last_order) == (1, 1)

        stored = await read_all(store, "s1")
        assert orders(stored) == [1, 2, 3]
        assert contents(stored) == ["a", "b", "c"]
        assert [e.hash for e in stored] == [i.hash for i in r1.items + r2.items]
        assert [e.item_id for e in stored[:2]] == ["a", "b"]
        assert stored[2].item_id == r2.items[0].item_id and stored[2].item_id
        assert all(e.session_id == "s1" and e.kind == "item" for e in stored)
        assert all(RFC3339_MICRO.match(e.created_at) for e in stored)
        assert verify(stored, session_id="s1") is None
        assert await store.last_order("s1") == 3
        assert await store.last_order("s2") == 1
        assert await store.last_order("never-written") == 0

    # -- 2. all-or-nothing batches ---------------------------------------------

    async def test_a_retract_may_target_an_item_of_its_own_request(self, store: LogStore) -> None:
        await store.append("s", req(item("kept")))
        # Order 2 is the item, order 3 the retract that hides it (the SDK's
        # pop-then-add rewinds can land together like this).
        await store.append("s", req(item("gone"), retract(2)))
        assert contents(await read_all(store, "s", visible_only=True)) == ["kept"]
        assert await store.last_order("s") == 3

    @pytest.mark.parametrize(
        "bad",
        [
            pytest.param(retract(99), id="retract-nonexistent-target"),
            pytest.param(retract(4), id="retract-own-order"),  # the retract itself is order 4
            pytest.param(retract("1"), id="retract-target-not-int"),
            pytest.param(retract([1]), id="retract-target-unhashable"),
            pytest.param(retract(True), id="retract-target-bool"),
            pytest.param(AppendItem(agent="s", kind="retract", data={"target": 1, "x": 1}), id="retract-extra-field"),
            pytest.param(AppendItem(agent="s", kind="clear", data={"x": 1}), id="clear-with-data"),
            pytest.param(AppendItem(agent="s", kind="item", data={}), id="empty-item"),
        ],
    )
    async def test_a_batch_with_one_bad_item_writes_nothing(
        self, store: LogStore, bad: AppendItem
    ) -> None:
        await store.append("s", req(item("one"), item("two")))
        with pytest.raises(BadRequestError):
            await store.append("s", req(item("good", item_id="g1"), bad, item("good too", item_id="g2")))
        assert await store.last_order("s") == 2
        assert contents(await read_all(store, "s")) == ["one", "two"]
        # Nothing of the refused batch exists: its ids are new, and the next
        # append gets the next order with no gap.
        r = await store.append("s", req(item("again", item_id="g1")))
        assert r.items == [AppendedItem(item_order=3, item_id="g1", hash=r.items[0].hash)]
        assert verify(await read_all(store, "s"), session_id="s") is None

    async def test_a_bad_request_does_not_disturb_others_in_the_same_group_commit(
        self, store: LogStore
    ) -> None:
        await store.append("s", req(item("zero")))
        results = await asyncio.gather(
            store.append("s", req(item("a"))),
            store.append("s", req(item("b"), retract(42))),
            store.append("s", req(item("c"), item("d"))),
            store.append("t", req(item("other"))),
            return_exceptions=True,
        )
        assert isinstance(results[1], BadRequestError)
        good = [r for i, r in enumerate(results) if i in (0, 2)]
        assert sorted(o.item_order for r in good for o in r.items) == [2, 3, 4]
        stored = await read_all(store, "s")
        assert orders(stored) == [1, 2, 3, 4]
        assert "b" not in contents(stored)
        assert verify(stored, session_id="s") is None
        assert orders(await read_all(store, "t")) == [1]

    # -- 3. idempotent item_id -------------------------------------------------

    async def test_same_item_id_twice_is_a_duplicate_with_original_order_and_hash(
        self, store: LogStore
    ) -> None:
        first = await store.append("s", req(item("original", item_id="x")))
        await store.append("s", req(item("later")))
        again = await store.append("s", req(item("original", item_id="x")))
        assert again.items == [
            AppendedItem(item_order=1, item_id="x", hash=first.items[0].hash, duplicate=True)
        ]
        assert (again.first_order, again.last_order) == (1, 1)
        assert await store.last_order("s") == 2
        assert contents(await read_all(store, "s")) == ["original", "later"]
        # The same id in another session is another item.
        other = await store.append("t", req(item("t", item_id="x")))
        assert other.items[0].item_order == 1 and not other.items[0].duplicate

    async def test_an_item_id_with_different_content_is_a_conflict_naming_the_id(
        self, store: LogStore
    ) -> None:
        # Nobody can pre-empt another writer's item by taking its id first: the
        # second writer hears ``conflict`` (not ``duplicate``), and nothing is written.
        await store.append("s", req(item("original", item_id="x", agent="Triage")))
        for forged in (
            item("forged reply", item_id="x", agent="Triage"),  # other data
            item("original", item_id="x", agent="Billing"),  # other author
            AppendItem(agent="Triage", kind="clear", item_id="x"),  # other kind
        ):
            with pytest.raises(ConflictError, match="'x'") as e:
                await store.append("s", req(forged))
            assert e.value.last_order == 1 and e.value.extra["item_id"] == "x"
            # ... also when it rides along with a new item, or behind expected_last.
            with pytest.raises(ConflictError, match="'x'"):
                await store.append("s", req(item("new", item_id="n1"), forged))
            with pytest.raises(ConflictError, match="'x'"):
                await store.append("s", req(forged, expected_last=0))
        assert [e.item_id for e in await read_all(store, "s")] == ["x"]
        # Within one group commit: the first of two racing writers wins, the other conflicts.
        a, b = await asyncio.gather(
            store.append("s", req(item("mine", item_id="y", agent="Triage"))),
            store.append("s", req(item("theirs", item_id="y", agent="Triage"))),
            return_exceptions=True,
        )
        assert isinstance(a, AppendReply) and isinstance(b, ConflictError)
        assert contents(await read_all(store, "s")) == ["original", "mine"]
        # A number written as 1.0 is the same JSON number as 1 (as the hash sees it).
        await store.append("s", req(AppendItem(agent="A", data={"n": 1}, item_id="z")))
        again = await store.append("s", req(AppendItem(agent="A", data={"n": 1.0}, item_id="z")))
        assert again.items[0].duplicate
        with pytest.raises(ConflictError):
            await store.append("s", req(AppendItem(agent="A", data={"n": True}, item_id="z")))

    async def test_same_item_id_twice_in_one_request_is_refused(self, store: LogStore) -> None:
        await store.append("s", req(item("before")))
        with pytest.raises(BadRequestError, match="twice"):
            await store.append("s", req(item("a", item_id="dup"), item("b", item_id="dup")))
        assert await store.last_order("s") == 1
        r = await store.append("s", req(item("a", item_id="dup")))
        assert r.items[0].item_order == 2 and not r.items[0].duplicate

    async def test_concurrent_retries_of_one_item_id_write_it_once(self, store: LogStore) -> None:
        await store.append("s", req(item("before")))
        replies = await asyncio.gather(*(store.append("s", req(item("m", item_id="r"))) for _ in range(5)))
        assert {r.items[0].item_order for r in replies} == {2}
        assert len({r.items[0].hash for r in replies}) == 1
        assert sum(not r.items[0].duplicate for r in replies) == 1
        assert orders(await read_all(store, "s")) == [1, 2]

    async def test_known_ids_without_expected_last_are_duplicates_and_new_ones_are_written(
        self, store: LogStore
    ) -> None:
        await store.append("s", req(item("a", item_id="a")))
        await store.append("s", req(item("b", item_id="b")))
        r = await store.append("s", req(item("a", item_id="a"), item("c", item_id="c")))
        assert [(i.item_id, i.item_order, i.duplicate) for i in r.items] == [
            ("a", 1, True), ("c", 3, False),
        ]
        assert contents(await read_all(store, "s")) == ["a", "b", "c"]

    # -- 4. expected_last (optimistic concurrency) ------------------------------

    async def test_expected_last_success_and_conflict(self, store: LogStore) -> None:
        assert (await store.append("s", req(item("1"), expected_last=0))).last_order == 1
        r = await store.append("s", req(item("2"), item("3"), expected_last=1))
        assert (r.first_order, r.last_order) == (2, 3)

        for stale in (0, 1, 2, 4, 99):
            with pytest.raises(ConflictError) as exc:
                await store.append("s", req(item("late"), expected_last=stale))
            assert exc.value.last_order == 3
            assert exc.value.code == "conflict"
        with pytest.raises(ConflictError) as exc:
            await store.append("empty", req(item("x"), expected_last=5))
        assert exc.value.last_order == 0
        assert await store.last_order("s") == 3
        assert await store.last_order("empty") == 0
        assert contents(await read_all(store, "s")) == ["1", "2", "3"]

    async def test_concurrent_writers_with_the_same_expected_last_one_wins(
        self, store: LogStore
    ) -> None:
        await store.append("s", req(item("base")))
        results = await asyncio.gather(
            *(store.append("s", req(item(f"w{i}"), expected_last=1)) for i in range(6)),
            return_exceptions=True,
        )
        wins = [r for r in results if not isinstance(r, BaseException)]
        losses = [r for r in results if isinstance(r, BaseException)]
        assert len(wins) == 1 and wins[0].last_order == 2
        assert all(isinstance(e, ConflictError) and e.last_order == 2 for e in losses)
        assert orders(await read_all(store, "s")) == [1, 2]

    # -- 5. the retry-by-ids rule ----------------------------------------------

    async def test_retry_with_stale_expected_last_is_answered_by_ids(self, store: LogStore) -> None:
        first = await store.append("s", req(item("a", item_id="a"), item("b", item_id="b"), expected_last=0))
        await store.append("s", req(item("c", item_id="c")))  # another writer moved on

        # All ids present: the retry of a committed append gets its original answer.
        retry = await store.append("s", req(item("a", item_id="a"), item("b", item_id="b"), expected_last=0))
        assert [(i.item_id, i.item_order, i.hash, i.duplicate) for i in retry.items] == [
            ("a", 1, first.items[0].hash, True),
            ("b", 2, first.items[1].hash, True),
        ]
        assert (retry.first_order, retry.last_order) == (1, 2)

        # None present: a genuine conflict.
        with pytest.raises(ConflictError) as conflict:
            await store.append("s", req(item("x", item_id="x"), item("y", item_id="y"), expected_last=0))
        assert conflict.value.last_order == 3

        # Some present: neither a retry nor a fresh write.
        with pytest.raises(BadRequestError) as partial:
            await store.append("s", req(item("a", item_id="a"), item("z", item_id="z"), expected_last=0))
        assert type(partial.value) is BadRequestError

        assert [e.item_id for e in await read_all(store, "s")] == ["a", "b", "c"]

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

    # -- 10. the global commit order the outbox relies on ------------------------

    async def test_committed_after_is_one_total_order_matching_commit_order(
        self, store: LogStore
    ) -> None:
        committed_in_order: list[tuple[str, int]] = []
        for i in range(12):
            sid = f"s{i % 3}"
            r = await store.append(sid, req(*(item(f"{i}.{k}") for k in range(1 + i % 2))))
            committed_in_order += [(sid, it.item_order) for it in r.items]

        commits = await store.committed_after(0, 1000)
        assert [(c.session_id, c.item_order) for c in commits] == committed_in_order
        positions = [c.position for c in commits]
        assert positions == sorted(set(positions)) and positions[0] >= 1
        for sid in ("s0", "s1", "s2"):
            stored = await read_all(store, sid)
            mine = [c for c in commits if c.session_id == sid]
            assert envs([c.envelope for c in mine]) == stored

        # Paging by position.
        assert await store.committed_after(positions[4], 3) == commits[5:8]
        assert await store.committed_after(positions[-1], 10) == []

    async def test_position_of(self, store: LogStore) -> None:
        await store.append("a", req(item("1"), item("2")))
        await store.append("b", req(item("1")))
        await store.append("a", req(item("3")))
        commits = await store.committed_after(0, 100)
        assert len(commits) == 4
        for c in commits:
            assert await store.position_of(c.session_id, c.item_order) == c.position
        assert await store.position_of("a", 4) is None
        assert await store.position_of("nobody", 1) is None

    async def test_commit_listeners_get_every_commit_in_position_order(self, store: LogStore) -> None:
        sync_seen: list[Committed] = []
        async_seen: list[Committed] = []

        async def async_listener(batch: Sequence[Committed]) -> None:
            async_seen.extend(batch)

        store.add_commit_listener(sync_seen.extend)
        store.add_commit_listener(async_listener)
        results = await asyncio.gather(
            *(store.append(f"s{i % 4}", req(item(f"{i}"), item_id_suffix(i))) for i in range(40)),
            store.append("s0", req(retract(1000))),  # refused: reported to nobody
            return_exceptions=True,
        )
        assert isinstance(results[-1], BadRequestError)
        await store.append("s1", req(item("1b", item_id="id-1")))  # a duplicate: no commit

        everything = await store.committed_after(0, 1000)
        assert len(everything) == 80
        assert sync_seen == everything
        assert async_seen == everything

    # -- 11. group commit --------------------------------------------------------

    async def test_many_concurrent_appends_stay_contiguous_and_share_transactions(
        self, store: LogStore
    ) -> None:
        commits_before = store.commits  # type: ignore[attr-defined]
        replies = await asyncio.gather(
            *(store.append(f"s{i % 10}", req(item(f"m{i}", item_id=f"id-{i}"))) for i in range(500))
        )
        transactions = store.commits - commits_before  # type: ignore[attr-defined]
        assert 1 <= transactions < 500, transactions

        acked = {r.items[0].item_id: (r.session_id, r.items[0].item_order) for r in replies}
        commits = await store.committed_after(0, 10_000)
        for s in range(10):
            sid = f"s{s}"
            stored = await read_all(store, sid)
            assert orders(stored) == list(range(1, 51))
            assert verify(stored, session_id=sid) is None
            assert all(acked[e.item_id] == (sid, e.item_order) for e in stored)
            # Within a session, global positions follow item_order.
            mine = [c.item_order for c in commits if c.session_id == sid]
            assert mine == list(range(1, 51))
        assert len(commits) == 500

    async def test_a_started_commit_finishes_when_its_caller_is_cancelled(
        self, store: LogStore
    ) -> None:
        task = asyncio.create_task(store.append("s", req(item("survives", item_id="c1"))))
        await asyncio.sleep(0)  # the request is handed to the store
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The commit still lands, exactly once.
        r = await store.append("s", req(item("survives", item_id="c1")))
        assert r.items[0].duplicate and r.items[0].item_order == 1
        assert contents(await read_all(store, "s")) == ["survives"]

    async def test_submit_calls_back_once_per_request_in_submission_order(
        self, store: LogStore
    ) -> None:
        # The log service's hot path: no future per request, a callback instead.
        outcomes: list[tuple[int, object]] = []
        all_done = asyncio.Event()

        def done_for(i: int) -> Any:
            def done(out: object) -> None:
                outcomes.append((i, out))
                if len(outcomes) == 6:
                    all_done.set()
            return done

        store.submit("s", req(item("a", item_id="a")), done_for(0))
        store.submit("s", req(item("b", item_id="b")), done_for(1))
        store.submit("s", req(item("a", item_id="a")), done_for(2))  # a retry
        store.submit("s", req(item("c"), expected_last=1), done_for(3))  # behind
        store.submit("t", req(retract(9)), done_for(4))  # refused
        store.submit("s", req(item("d", item_id="d"), expected_last=2), done_for(5))
        assert outcomes == []  # nothing is answered before the commit
        await asyncio.wait_for(all_done.wait(), 10)
        await asyncio.sleep(0.05)  # a second call would land here
        assert [i for i, _ in outcomes] == [0, 1, 2, 3, 4, 5]
        by = dict(outcomes)
        assert isinstance(by[0], AppendReply) and by[0].items[0].item_order == 1
        assert isinstance(by[1], AppendReply) and by[1].items[0].item_order == 2
        assert isinstance(by[2], AppendReply) and by[2].items[0].duplicate
        assert by[2].items[0].item_order == 1
        assert isinstance(by[3], ConflictError) and by[3].last_order == 2
        assert isinstance(by[4], BadRequestError)
        assert isinstance(by[5], AppendReply) and by[5].items[0].item_order == 3
        assert contents(await read_all(store, "s")) == ["a", "b", "d"]
        assert await store.last_order("t") == 0

    async def test_submit_after_close_raises_and_never_calls_back(self, tmp_path: Path) -> None:
        store = await self.make_store(tmp_path)
        await store.close()
        called: list[object] = []
        with pytest.raises(StoreClosedError):
            store.submit("s", req(item("late")), called.append)
        await asyncio.sleep(0.05)
        assert called == []

    # -- 12. durability and ownership -----------------------------------------

    async def test_data_and_hash_chain_survive_close_and_reopen(self, tmp_path: Path) -> None:
        first = await self.make_store(tmp_path)
        await first.append("s", req(item("a", item_id="a"), item("b")))
        await first.append("s", req(retract(1)))
        await first.append("t", req(item("t1")))
        await first.close()
        await first.close()  # idempotent

        store = await self.make_store(tmp_path)
        try:
            assert await store.last_order("s") == 3
            dup = await store.append("s", req(item("a", item_id="a")))
            assert dup.items[0].duplicate and dup.items[0].item_order == 1
            with pytest.raises(ConflictError) as exc:
                await store.append("s", req(item("c"), expected_last=2))
            assert exc.value.last_order == 3
            r = await store.append("s", req(item("c"), expected_last=3))
            assert r.last_order == 4

            stored = await read_all(store, "s")
            assert orders(stored) == [1, 2, 3, 4]
            assert verify(stored, session_id="s") is None
            # The new envelope chains onto the one written before the reopen.
            assert stored[3].hash == envelope_hash(stored[3], stored[2].hash) == r.items[0].hash
            assert stored[0].hash == envelope_hash(stored[0], GENESIS_HASH)
            assert contents(envs((await store.tail("s", 10)).items)) == ["b", "c"]
            assert [i.session_id for i in (await store.sessions(after=None, limit=10))[0]] == ["s", "t"]
            commits = await store.committed_after(0, 100)
            assert [(c.session_id, c.item_order) for c in commits] == [
                ("s", 1), ("s", 2), ("s", 3), ("t", 1), ("s", 4),
            ]
            assert [c.position for c in commits] == sorted({c.position for c in commits})
        finally:
            await store.close()

    async def test_a_second_store_on_the_same_data_is_refused(self, tmp_path: Path) -> None:
        first = await self.make_store(tmp_path)
        try:
            await first.append("s", req(item("one")))
            with pytest.raises(UnavailableError):
                await self.make_store(tmp_path)
            # The owner is unaffected.
            assert (await first.append("s", req(item("two")))).last_order == 2
        finally:
            await first.close()
        # Closing releases ownership.
        again = await self.make_store(tmp_path)
        try:
            assert await again.last_order("s") == 2
        finally:
            await again.close()


def item_id_suffix(i: int) -> AppendItem:
    """A second item per request with a predictable id (``id-<i>``)."""
    return item(f"{i}b", item_id=f"id-{i}")
