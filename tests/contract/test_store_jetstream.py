"""The JetStream store passes the store conformance suite, plus JetStream specifics.

One real nats-server serves the module; each test gets its own subject
prefix (so its own streams), derived from its ``tmp_path`` so that calling
``make_store`` again opens the same log.  The suite runs on one shard and
again on two (sessions spread over two log streams).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from services.log.store.base import LogStore
from services.log.store.jetstream import MAX_ITEMS_PER_APPEND, JetStreamStore, Layout
from shared.chain import verify
from shared.errors import BadRequestError, TooLargeError
from shared.failures import StreamConfigError
from shared.nats_seam import RawFrames
from shared.subjects import Subjects
from tests.support.natsd import NatsServer

from .store_helpers import BIG, envs, item, read_all, req
from .store_suite import StoreSuite


@pytest.fixture(scope="module")
def js_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("natsd")) as server:
        yield server


def prefix_for(tmp_path: Path) -> str:
    return "t" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]


class TestJetStreamStore(StoreSuite):
    shards = 1

    @pytest.fixture(autouse=True)
    def _server(self, js_server: NatsServer) -> None:
        self.server = js_server

    async def make_store(self, tmp_path: Path, **kwargs: object) -> JetStreamStore:
        kwargs.setdefault("shards", self.shards)
        store = JetStreamStore(
            {"servers": [self.server.url]}, subjects=Subjects(prefix_for(tmp_path)), **kwargs  # type: ignore[arg-type]
        )
        await store.open()
        return store

    async def test_implements_the_store_protocol(self, store: JetStreamStore) -> None:
        assert isinstance(store, LogStore)

    async def test_a_second_store_on_the_same_data_is_refused(self, tmp_path: Path) -> None:
        # The opposite of SQLite: any number of instances serve one log at once.
        first = await self.make_store(tmp_path)
        second = await self.make_store(tmp_path)
        try:
            await first.append("s", req(item("one", item_id="one")))
            assert await second.last_order("s") == 1
            # The second instance decides on the head the stream has, not a stale one.
            await second.append("s", req(item("two")))
            r = await first.append("s", req(item("three"), expected_last=2))
            assert r.last_order == 3
            dup = await second.append("s", req(item("one", item_id="one")))
            assert dup.items[0].duplicate and dup.items[0].item_order == 1
        finally:
            await first.close()
            await second.close()

    async def test_two_instances_appending_to_one_session_make_one_history(self, tmp_path: Path) -> None:
        stores = [await self.make_store(tmp_path) for _ in range(2)]
        try:
            replies = await asyncio.gather(
                *(stores[i % 2].append("s", req(item(f"m{i}", item_id=f"id-{i}"))) for i in range(60))
            )
            # Each instance started from a stale head at least once; the server refused it.
            assert sum(s.retries for s in stores) > 0
            stored = await read_all(stores[0], "s")
            assert [e.item_order for e in stored] == list(range(1, 61))
            assert verify(stored, session_id="s") is None
            acked = {r.items[0].item_id: r.items[0].item_order for r in replies}
            assert {e.item_id: e.item_order for e in stored} == acked
            # A retry through the other instance is a duplicate, with no time window.
            again = await stores[1].append("s", req(item("m0", item_id="id-0")))
            assert again.items[0].duplicate and again.items[0].item_order == acked["id-0"]
        finally:
            for s in stores:
                await s.close()

    async def test_two_loaded_instances_combine_appends_and_fall_back_per_session(self, tmp_path: Path) -> None:
        # Each instance gets enough appends at once to put them in one atomic
        # batch; over shared sessions the other instance's batches move heads,
        # so some combined batches are refused and retried session by session.
        stores = [await self.make_store(tmp_path) for _ in range(2)]
        try:
            for _round in range(3):
                replies = await asyncio.gather(*(
                    stores[(i // 10) % 2].append(f"s{i % 10}", req(item(f"m{_round}.{i}", item_id=f"id-{_round}-{i}")))
                    for i in range(200)
                ))
            assert all(s._writer.combined for s in stores)
            assert sum(s.retries for s in stores) > 0
            for sid in (f"s{k}" for k in range(10)):
                stored = await read_all(stores[0], sid)
                assert [e.item_order for e in stored] == list(range(1, 61))
                assert verify(stored, session_id=sid) is None
            last = {(r.session_id, r.items[0].item_id): r.items[0].item_order for r in replies}
            for (sid, iid), order in last.items():
                page = await stores[1].read(sid, after=order - 1, limit=1, max_bytes=1 << 20)
                assert envs(page.items)[0].item_id == iid
        finally:
            for s in stores:
                await s.close()

    async def test_the_items_stream_is_the_fan_out_of_the_log_streams(self, store: JetStreamStore) -> None:
        # Envelopes reach <prefix>.items.<sid> with Nats-Msg-Id <sid>:<order>, byte
        # for byte, and a trace context given with the append rides along.
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        store.submit("s", req(item("a", item_id="a"), item("b")), done.set_result, trace=trace)
        await done
        nc = await nats.connect(self.server.url)
        try:
            js = nc.jetstream()
            sub = await js.subscribe(store.layout.items("s"), ordered_consumer=True)
            got = [await sub.next_msg(timeout=5) for _ in range(2)]
            stored = (await store.read("s", after=0, limit=10, max_bytes=1 << 20)).items
            assert [m.data for m in got] == stored
            assert [m.headers["Nats-Msg-Id"] for m in got] == ["s:1", "s:2"]
            assert [m.headers["traceparent"] for m in got] == [trace, trace]
            # Appends arriving together go in one combined atomic batch: each keeps its trace.
            outcomes: list[asyncio.Future[object]] = []
            for i in range(40):
                fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                store.submit(f"c{i}", req(item(f"c{i}")), fut.set_result, trace=f"{trace[:-2]}{i % 2:02d}")
                outcomes.append(fut)
            await asyncio.gather(*outcomes)
            assert store._writer.combined >= 1
            for i in (0, 39):
                sub_c = await js.subscribe(store.layout.items(f"c{i}"), ordered_consumer=True)
                assert (await sub_c.next_msg(timeout=5)).headers["traceparent"] == f"{trace[:-2]}{i % 2:02d}"
            info = await js.stream_info(store.layout.stream)
            assert {s.name for s in info.config.sources or []} == set(store.layout.log_streams)
            for name in store.layout.log_streams:
                log_cfg = (await js.stream_info(name)).config
                assert log_cfg.allow_atomic and log_cfg.allow_direct and log_cfg.max_msgs_per_subject == 1
                assert log_cfg.metadata["convlog_shards"] == str(self.shards)
        finally:
            await nc.close()

    async def test_ids_are_unique_forever_not_for_a_window(self, store: JetStreamStore) -> None:
        await store.append("s", req(item("x", item_id="weird.id/with:chars@1")))
        store._cache.clear()  # a fresh instance: nothing remembered, only the stream
        again = await store.append("s", req(item("x", item_id="weird.id/with:chars@1")))
        assert again.items[0].duplicate and again.items[0].item_order == 1
        assert await store.last_order("s") == 1
        assert Layout(Subjects("p")).item_subject("s", "a.b") != Layout(Subjects("p")).item_subject("s", "a-b")

    async def test_appends_arriving_while_a_combined_batch_is_stored_ride_the_next(
        self, store: JetStreamStore
    ) -> None:
        # A loaded group commit goes in one combined batch; group commits made while it
        # is being stored do not send batches (or publishes) of their own: they wait and
        # go together in the next one.  Every session stays one contiguous, verified history.
        sids = [f"w{i}" for i in range(60)]
        await asyncio.gather(*(store.append(s, req(item("first"))) for s in sids))  # heads cached
        writer = store._writer
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[object]] = []

        def submit(wave: list[str], n: int) -> None:
            for s in wave:
                fut: asyncio.Future[object] = loop.create_future()
                store.submit(s, req(item(f"{s}.{n}", item_id=f"{s}.{n}")), fut.set_result)
                futs.append(fut)

        async def spin(until: object = None, turns: int = 5) -> None:
            for _ in range(turns if until is None else 10_000):
                if until is not None and any(c.busy for c in writer._combiners.values()):
                    return
                await asyncio.sleep(0)

        rounds = 0
        while not sum(c.merged for c in writer._combiners.values()) and rounds < 10:
            rounds += 1
            submit(sids[:40], rounds)  # 40 items at once: combined
            await spin(until=True)
            submit(sids[40:50], rounds)  # its own group commit ...
            await spin()
            submit(sids[50:], rounds)  # ... and another, both while the first batch is stored
            await asyncio.gather(*futs)
        assert sum(c.merged for c in writer._combiners.values()) >= 1
        for outcome in [f.result() for f in futs]:
            assert not isinstance(outcome, Exception), outcome
        for sid in sids:
            stored = await read_all(store, sid)
            assert [e.item_order for e in stored] == list(range(1, rounds + 2))
            assert [e.item_id for e in stored[1:]] == [f"{sid}.{n}" for n in range(1, rounds + 1)]
            assert verify(stored, session_id=sid) is None

    async def test_too_many_items_for_one_atomic_batch_are_refused(self, store: JetStreamStore) -> None:
        items = [item(f"m{i}") for i in range(MAX_ITEMS_PER_APPEND + 1)]
        with pytest.raises(TooLargeError, match=str(MAX_ITEMS_PER_APPEND)):
            await store.append("s", req(*items))
        assert await store.last_order("s") == 0
        r = await store.append("s", req(*items[:MAX_ITEMS_PER_APPEND]))
        assert r.last_order == MAX_ITEMS_PER_APPEND

    async def test_large_requests_of_one_session_in_one_group_commit_go_in_order(
        self, store: JetStreamStore
    ) -> None:
        # Three requests of 400 items arrive together: each is one atomic
        # batch, chained onto the head the one before it left.
        replies = await asyncio.gather(
            *(store.append("s", req(*(item(f"{r}.{i}") for i in range(400)))) for r in range(3))
        )
        assert sorted((r.first_order, r.last_order) for r in replies) == [(1, 400), (401, 800), (801, 1200)]
        stored = await read_all(store, "s")
        assert [e.item_order for e in stored] == list(range(1, 1201))
        assert verify(stored, session_id="s") is None

    async def test_a_commit_whose_answer_is_lost_is_resolved_from_the_stream(self, tmp_path: Path) -> None:
        store = await self.make_store(tmp_path, timeout=0.5)
        try:
            await store.append("s", req(item("before")))
            # The server freezes with the commit in its socket: no answer within
            # the timeout, then it stores the batch when it wakes up.
            self.server.pause()
            try:
                task = asyncio.create_task(store.append("s", req(item("lost", item_id="lost"), item("too"))))
                await asyncio.sleep(1.5)  # the fault lasts three timeouts
            finally:
                self.server.resume()
            r = await asyncio.wait_for(task, 20)
            assert (r.first_order, r.last_order) == (2, 3) and store._writer.unknown == 1
            stored = await read_all(store, "s")
            assert [e.item_order for e in stored] == [1, 2, 3] and verify(stored, session_id="s") is None
            again = await store.append("s", req(item("lost", item_id="lost")))
            assert again.items[0].duplicate and again.items[0].item_order == 2
        finally:
            await store.close()

    async def test_a_stale_cache_never_refuses_a_valid_request(self, tmp_path: Path) -> None:
        first = await self.make_store(tmp_path)
        second = await self.make_store(tmp_path)
        try:
            await first.append("s", req(item("1")))
            await second.last_order("s")  # second caches the head at 1
            await first.append("s", req(item("2"), item("3")))
            # expected_last and a retract target beyond second's cached head
            r = await second.append("s", req(item("4"), expected_last=3))
            assert r.last_order == 4
            await first.append("s", req(item("5")))
            r = await second.append("s", req(AppendItemRetract(5)))
            assert r.last_order == 6
            with pytest.raises(BadRequestError):
                await second.append("s", req(AppendItemRetract(6)))
        finally:
            await first.close()
            await second.close()


    async def test_headerless_batches_come_off_the_wire_as_bytes_and_read_the_same_on_the_public_seam(
        self, tmp_path: Path
    ) -> None:
        fast = await self.make_store(tmp_path)
        public = await self.make_store(tmp_path, nats_seam="public")
        try:
            await fast.append("r", req(*(item(f"m{i}") for i in range(1, 301))))
            pages = []
            for st in (fast, public):
                got: list[bytes] = []
                after = 0
                while True:
                    p = await st.read("r", after=after, limit=70, max_bytes=BIG)
                    got += p.items
                    after += len(p.items)
                    if not p.more:
                        break
                pages.append(got)
            assert pages[0] == pages[1] and [e.item_order for e in envs(pages[0])] == list(range(1, 301))
            assert isinstance(getattr(fast._nc._ps.parse, "__self__", None), RawFrames)  # type: ignore[union-attr]
            assert not isinstance(getattr(public._nc._ps.parse, "__self__", None), RawFrames)  # type: ignore[union-attr]
        finally:
            await fast.close()
            await public.close()

    async def test_forward_pages_are_exact_with_and_without_the_unfiltered_path(
        self, store: JetStreamStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # "a" alone in long runs (pages are read unfiltered, from the marks),
        # then interleaved 1:3 with "b" (the filtered path takes over).
        await store.append("a", req(*(item(f"a{i}") for i in range(1, 201))))
        for i in range(201, 241):
            await store.append("a", req(item(f"a{i}")))
            await store.append("b", req(item("b"), item("b"), item("b")))
        plain: list[bool] = []
        fetch_plain = store._reads._fetch_plain

        async def counted(*args: object) -> tuple[list[bytes], bool] | None:
            got = await fetch_plain(*args)  # type: ignore[arg-type]
            plain.append(got is not None)
            return got

        monkeypatch.setattr(store._reads, "_fetch_plain", counted)
        whole = (await store.read("a", after=0, limit=1000, max_bytes=BIG)).items
        assert [e.item_order for e in envs(whole)] == list(range(1, 241))
        cases = ((37, BIG, False), (1000, sum(len(b) + 1 for b in whole[:23]), False), (37, BIG, True))
        for limit, max_bytes, visible in cases:
            got: list[bytes] = []
            after = 0
            while True:
                p = await store.read("a", after=after, limit=limit, max_bytes=max_bytes, visible=visible)
                got += p.items
                assert p.last_order == 240 and len(p.items) <= limit
                if not p.more:
                    break
                after = envs(p.items)[-1].item_order
            assert got == whole
        assert True in plain and False in plain  # both paths served pages

        # A wrong mark (another item's sequence: items 1-200 are at 1-200) is caught, not trusted.
        cached = store._reads.cache["a"]
        cached.marks.clear()
        cached.marks.update({100: 107, 150: 140})
        for after in (100, 150):
            p = await store.read("a", after=after, limit=5, max_bytes=BIG)
            assert p.items == whole[after : after + 5]

    async def test_a_cached_head_sees_what_another_instance_appended(self, tmp_path: Path) -> None:
        first = await self.make_store(tmp_path)
        second = await self.make_store(tmp_path)
        try:
            await first.append("s", req(item("1")))
            assert (await second.read("s", after=0, limit=10, max_bytes=BIG)).last_order == 1  # cached
            await first.append("s", req(item("2"), item("3")))
            p = await second.read("s", after=1, limit=10, max_bytes=BIG)
            assert [e.item_order for e in envs(p.items)] == [2, 3] and p.last_order == 3
            # More than one probe's worth of other appends on the shard: the wildcard way.
            for _ in range(3):
                await first.append("other", req(*(item("o") for _ in range(100))))
            await first.append("s", req(item("4")))
            assert await second.last_order("s") == 4
            await first.append("s", req(item("5")))
            p = await second.read("s", after=3, limit=10, max_bytes=BIG)
            assert [e.item_order for e in envs(p.items)] == [4, 5] and p.last_order == 5
        finally:
            await first.close()
            await second.close()

class TestJetStreamStoreTwoShards(TestJetStreamStore):
    """The same suite with sessions spread over two log streams."""

    shards = 2

    async def test_committed_after_is_one_total_order_matching_commit_order(self, store: LogStore) -> None:
        pytest.skip("over several shards positions are per-session ordered, not one total order (see commit.position)")

    async def test_data_and_hash_chain_survive_close_and_reopen(self, tmp_path: Path) -> None:
        pytest.skip("checks one total order of positions; over two shards see the test above")

    async def test_sessions_spread_over_both_shards_and_the_count_is_fixed(self, tmp_path: Path) -> None:
        store = await self.make_store(tmp_path)
        try:
            sids = [f"s{i}" for i in range(8)]
            for sid in sids:
                await store.append(sid, req(item(sid)))
            assert {store.layout.shard_of(s) for s in sids} == {0, 1}
            infos, _ = await store.sessions(after=None, limit=100)
            assert [(i.session_id, i.last_order) for i in infos] == [(s, 1) for s in sids]
            commits = await store.committed_after(0, 100)
            assert sorted(c.session_id for c in commits) == sids
        finally:
            await store.close()
        with pytest.raises(StreamConfigError, match="CONVLOG_SHARDS=2, not 1"):
            await self.make_store(tmp_path, shards=1)


async def test_an_items_stream_of_an_earlier_layout_is_refused_with_what_to_do(
    js_server: NatsServer, tmp_path: Path
) -> None:
    subjects = Subjects(prefix_for(tmp_path))
    nc = await nats.connect(js_server.url)
    try:
        js = nc.jetstream()
        # The single-stream JetStream layout: envelopes and id records together.
        await js.add_stream(name=subjects.stream_name, subjects=[subjects.items_all, f"{subjects.prefix}.ids.>"])
        store = JetStreamStore({"servers": [js_server.url]}, subjects=subjects)
        with pytest.raises(StreamConfigError, match="earlier single-stream JetStream layout.*migrate"):
            await store.open()
        # A stream the SQLite store's outbox filled: refused too, naming the fix.
        await js.delete_stream(subjects.stream_name)
        await js.add_stream(name=subjects.stream_name, subjects=[subjects.items_all])
        await js.publish(subjects.items("s"), b"{}")
        with pytest.raises(StreamConfigError, match="outbox published.*nats stream rm"):
            await store.open()
        # An empty one (a worker created it first) becomes the fan-out.
        await js.purge_stream(subjects.stream_name)
        async with JetStreamStore({"servers": [js_server.url]}, subjects=subjects) as store:
            await store.append("s", req(item("x")))
            sub = await js.subscribe(subjects.items("s"), ordered_consumer=True)
            assert (await sub.next_msg(timeout=5)).headers["Nats-Msg-Id"] == "s:1"
    finally:
        await nc.close()


def AppendItemRetract(target: int):  # noqa: N802 - reads like the suite's item()
    from .store_helpers import retract

    return retract(target)
