"""The store suite's write guarantees: contiguous orders, all-or-nothing batches,
idempotent ``item_id``, ``expected_last`` and the retry-by-ids rule.
"""

from __future__ import annotations

import asyncio

import pytest

from services.log.store.base import LogStore
from shared.chain import verify
from shared.errors import BadRequestError, ConflictError, TooLargeError
from shared.messages import AppendedItem, AppendItem, AppendReply

from .store_helpers import (
    BIG,
    RFC3339_MICRO,
    SuiteBase,
    clear,
    contents,
    item,
    orders,
    read_all,
    req,
    retract,
)

__all__ = ["WriteGuarantees"]


class WriteGuarantees(SuiteBase):
    """The write guarantees every log store backend must keep."""

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

    async def test_an_envelope_at_the_nats_max_payload_is_stored_or_refused_and_the_store_goes_on(
        self, store: LogStore
    ) -> None:
        # An envelope just under NATS's default max_payload (1 MiB): a store that
        # cannot take it with its headers refuses it ``too_large``, writes nothing
        # and keeps serving (the server counts headers too, and answers a message
        # over it by closing the connection).
        small = (await store.append("s", req(item("x", item_id="small")))).items[0]
        size = len((await store.read("s", after=0, limit=1, max_bytes=BIG)).items[0])
        big = item("x" * ((1 << 20) - 100 - size), item_id="big")
        try:
            r = await store.append("s", req(big))
        except TooLargeError:
            stored = 1
        else:
            assert r.items[0].item_order == 2
            stored = 2
        assert await store.last_order("s") == stored
        after = await store.append("s", req(item("after", item_id="after")))
        assert after.last_order == stored + 1
        assert [e.item_id for e in await read_all(store, "s")] == ["small", "big", "after"][: stored] + ["after"]
        assert small.item_order == 1

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

    # -- a request bad in two ways -------------------------------------------

    @pytest.mark.parametrize(
        ("case", "code"),
        [
            ("stale expected_last + empty item", "conflict"),
            ("stale expected_last + bad retract", "conflict"),
            ("stale expected_last + id twice", "bad_request"),
            ("stale expected_last + taken id", "conflict"),
            ("taken id + empty item", "bad_request"),
            ("taken id + bad retract", "bad_request"),
            ("retried id + empty item", "bad_request"),
            ("clear with data + bad retract", "bad_request"),
        ],
    )
    async def test_a_request_bad_in_two_ways_gets_one_code_on_every_store(
        self, store: LogStore, case: str, code: str
    ) -> None:
        """Which of two faults a request is refused for is the same on every store."""
        await store.append("s", req(item("m1", item_id="k1"), item("m2"), clear(), item("m4")))
        empty = AppendItem(agent="user", data={})
        bad_clear = AppendItem(agent="system", kind="clear", data={"x": 1})
        request = {
            "stale expected_last + empty item": req(empty, expected_last=1),
            "stale expected_last + bad retract": req(retract(99), expected_last=1),
            "stale expected_last + id twice": req(item("a", item_id="q"), item("b", item_id="q"), expected_last=1),
            "stale expected_last + taken id": req(item("other", item_id="k1"), expected_last=1),
            "taken id + empty item": req(item("other", item_id="k1"), empty),
            "taken id + bad retract": req(item("other", item_id="k1"), retract(99)),
            "retried id + empty item": req(item("m1", item_id="k1"), empty),
            "clear with data + bad retract": req(bad_clear, retract(99)),
        }[case]
        with pytest.raises((BadRequestError, ConflictError)) as exc:
            await store.append("s", request)
        assert exc.value.code == code, exc.value.message
        assert await store.last_order("s") == 4
