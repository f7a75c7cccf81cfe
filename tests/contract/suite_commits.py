"""The store suite's commit guarantees: the global commit order the outbox relies
on, group commit, durability across a reopen and exclusive ownership.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from services.log.store.base import Committed, LogStore, StoreClosedError
from shared.chain import GENESIS_HASH, envelope_hash, verify
from shared.errors import BadRequestError, ConflictError, UnavailableError
from shared.messages import AppendReply

from .store_helpers import (
    SuiteBase,
    contents,
    envs,
    item,
    item_id_suffix,
    orders,
    read_all,
    req,
    retract,
)

__all__ = ["CommitGuarantees"]


class CommitGuarantees(SuiteBase):
    """The commit guarantees every log store backend must keep."""

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
