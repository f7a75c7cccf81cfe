"""JetStream store edge cases, each a bug once (found in a review):

* a combined batch takes its expectation from the head its rows were decided
  on: a read on the same instance between the decision and the store moved the
  cached head on to another instance's append, the server's check passed, and
  the session got a second item at an order it held (a forked chain; only the
  two-minute ``Nats-Msg-Id`` window stood in the way -- shortened here to 1 s);
* a head probe and the sessions list's ``multi_last`` get ask for a byte limit
  and treat a reply cut at it as cut: the server stops a batch at its
  ``max_pending`` (64 MiB), which was read as "the shard ends here" (a stale
  head, sessions left out of the list);
* an append over nats-server's own atomic batch limit (``jetstream { limits {
  batch { max_msgs } } }`` below the store's 1000) is ``too_large``, not retried
  as contention and answered ``unavailable``;
* a batch get's frames that nats-py parsed itself (those after another
  subscription's message, a publish ack, in one read) went through the
  subscription's task, after frames of the same batch that came later: a read
  during appends lost or reordered envelopes (``the log stream lacks item 1``);
* the sessions list's ``multi_last`` gets asked for 256 subjects whatever their
  length: over the server's max payload with long ids, every page ``unavailable``;
* the sessions list took each session as ``<PREFIX>_ITEMS`` had it last, and
  that stream stores whatever is published on ``<prefix>.items.>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from services.log.handlers import Handlers
from services.log.store.jetstream import JetStreamStore, Layout
from services.log.store.jetstream.api import DirectGet
from services.log.store.jetstream.commit import BatchWriter
from services.log.store.jetstream.reads import StreamReads
from shared.chain import verify
from shared.errors import TooLargeError
from shared.messages import AppendItem, AppendRequest
from shared.subjects import Subjects
from tests.contract.store_helpers import item, read_all, req
from tests.contract.test_store_jetstream import prefix_for
from tests.support.natsd import NatsServer

SID = "s" * 128  # longest legal session id
OTHER = "o" * 128
AGENT = "\U0001f600" * 128  # 128 characters, as AgentName allows
SIG = "A" * 86 + "." + "B" * 704  # the longest shape SIG_PATTERN allows (unsigned log: stored as sent)
KEY_ID = "U" + "A" * 55
#: nats-server with atomic batches limited below the store's 1000
BATCH_LIMIT_CONF = "jetstream { limits { batch { max_msgs: 100 } } }\n"


async def test_a_read_between_decision_and_combined_store_does_not_fork_the_session(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Layout.log_stream_config

    def short_window(self: Layout, k: int, replicas: int) -> dict[str, Any]:
        return {**config(self, k, replicas), "duplicate_window": 1_000_000_000}

    monkeypatch.setattr(Layout, "log_stream_config", short_window)
    subjects = Subjects(prefix_for(tmp_path))

    async def mk() -> JetStreamStore:
        s = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects)
        await s.open()
        return s

    a, b = await mk(), await mk()
    gate = asyncio.Event()
    try:
        await b.append("s", req(item("1")))  # b caches the head at 1
        await a.append("s", req(item("2")))  # a moves it on: b's cache is stale
        await asyncio.sleep(1.5)  # past the duplicate window

        # The shard's previous combined batch is slow to store (a loaded server).
        store_combined = BatchWriter._store_combined
        calls = 0

        async def slow_first(self: BatchWriter, parts: list[Any]) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                await gate.wait()
            return await store_combined(self, parts)

        monkeypatch.setattr(BatchWriter, "_store_combined", slow_first)
        first = asyncio.create_task(b.append("other", req(*(item(f"o{i}") for i in range(40)))))
        loop = asyncio.get_running_loop()
        until = loop.time() + 10
        while loop.time() < until:  # its session's head is read first (a new session): I/O
            if calls == 1 and any(c.busy for c in b._writer._combiners.values()):
                break
            await asyncio.sleep(0.001)
        else:
            pytest.fail("the first combined batch never started: the race below is not set up")
        # 40 items: a combined batch, decided on b's cached (stale) head 1, waiting its turn.
        second = asyncio.create_task(b.append("s", req(*(item(f"s{i}") for i in range(40)))))
        for _ in range(50):
            await asyncio.sleep(0)
        assert await b.last_order("s") == 2  # a reader on b meanwhile: the cached head is now 2
        gate.set()
        await first
        # Decided on head 1, refused by the server (the head is 2), decided again: orders 3..42.
        r = await asyncio.wait_for(second, 20)
        assert (r.first_order, r.last_order) == (3, 42), r
        stored = await read_all(a, "s")
        orders = [e.item_order for e in stored]
        assert orders == list(range(1, 43)), orders[:6]
        assert verify(stored, session_id="s") is None
    finally:
        gate.set()  # a failure above must not leave the first batch held (b.close() would wait on it)
        await a.close()
        await b.close()


def big(n: int) -> AppendItem:
    item_id = f"{n:06d}" + "i" * 194  # 200 characters
    content = "x" * (256 * 1024 - 40)
    data = {"role": "user", "content": content}
    assert len(msgspec.json.encode(data)) <= 256 * 1024  # within max_item_bytes
    return AppendItem(agent=AGENT, data=data, item_id=item_id, sig=SIG, key_id=KEY_ID)


async def test_a_cached_head_probe_cut_short_by_the_server_still_finds_the_head(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    subjects = Subjects(prefix_for(tmp_path))

    async def mk() -> JetStreamStore:
        s = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects)
        await s.open()
        return s

    first, second = await mk(), await mk()
    try:
        # The items are ones the log service accepts as they are.
        h = Handlers(store=first, subjects=subjects)
        h.parse_append(subjects.append(SID), msgspec.json.encode(AppendRequest(items=[big(0)])))

        await first.append(SID, AppendRequest(items=[big(0)]))
        assert await second.last_order(SID) == 1  # second caches the head
        for n in range(1, 255):  # 254 items of another session on the same shard
            await first.append(OTHER, AppendRequest(items=[big(n)]))
        await first.append(SID, AppendRequest(items=[AppendItem(agent="user", data={"role": "user", "content": "hi"})]))
        assert await first.last_order(SID) == 2
        # The probe from the cached head gets 255 of the 256 messages it asked for.
        assert await second.last_order(SID) == 2
        page = await second.read(SID, after=1, limit=10, max_bytes=1 << 20)
        assert len(page.items) == 1 and page.last_order == 2
    finally:
        await first.close()
        await second.close()


async def test_the_sessions_list_keeps_every_session_when_a_multi_last_get_is_cut_short(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # reads.sessions asks the fan-out for the last item of 256 sessions at once
    # (multi_last) with no max_bytes: the server stops at 64 MiB, and the
    # sessions past the cut are silently left out of a page that goes on.
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects(prefix_for(tmp_path)))
    await store.open()
    try:
        sids = [f"a{n:03d}" + "s" * 124 for n in range(256)] + ["b"]
        for n, sid in enumerate(sids):
            await store.append(sid, AppendRequest(items=[big(n)]))
        listed, more = await store.sessions(after=None, limit=1000)  # the service's default page
        assert not more
        assert [i.session_id for i in listed] == sids
    finally:
        await store.close()


async def test_the_sessions_list_of_long_ids_on_a_small_max_payload_is_answered(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    # The sessions list's multi_last gets asked for 256 item subjects at once,
    # whatever their length: with long session and item ids that request was over
    # a 64 KiB max payload, nats-py refused to send it, and every sessions page
    # (`convlog sessions`, iter_sessions) was `unavailable`.
    server = nats_server_factory(config="max_payload: 65536\n")
    store = JetStreamStore({"servers": [server.url]}, subjects=Subjects(prefix_for(tmp_path)))
    await store.open()
    try:
        sids = [f"a{n:03d}" + "s" * 124 for n in range(256)]
        for n, sid in enumerate(sids):
            await store.append(sid, req(item(f"m{n}", item_id=f"{n:03d}" + "i" * 97)))
        listed, more = await store.sessions(after=None, limit=1000)
        assert not more
        assert [i.session_id for i in listed] == sids
        assert {i.last_order for i in listed} == {1}
    finally:
        await store.close()


async def test_an_append_over_the_servers_batch_limit_is_too_large(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = nats_server_factory(config=BATCH_LIMIT_CONF)
    store = JetStreamStore({"servers": [server.url]}, subjects=Subjects("bl"))
    await store.open()
    try:
        ok = await store.append("s", req(*(item(f"m{i}") for i in range(100))))
        assert ok.last_order == 100
        with pytest.raises(TooLargeError) as exc:
            await store.append("s", req(*(item(f"n{i}") for i in range(101))))
        assert exc.value.extra.get("limit") == 100, exc.value.message  # the body names the limit
    finally:
        await store.close()


async def test_a_replica_that_trails_the_leader_does_not_move_a_head_back(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On R3 a follower joins the direct gets once 90% caught up, so a head read may be
    # answered by a replica still at an older item. This instance's cache knows order 2
    # was stored: the leader is asked, and the head stays at 2 (it moved back to 1, and
    # reads missed an acknowledged item). Here the trailing replica is played by
    # answering the direct gets with the message at order 1.
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects(prefix_for(tmp_path)))
    await store.open()
    try:
        await store.append("s", req(item("1")))
        stale = await store._reads.get("s").last(store.layout.session_filter("s"))
        await store.append("s", req(item("2")))
        asked: list[str] = []

        async def trailing(self: DirectGet, subject: str) -> Any:
            return stale

        async def not_the_head(self: StreamReads, sid: str, s: Any) -> bool:
            return False  # the replica does not hold the cached head's sequence yet

        real = DirectGet.last_from_leader

        async def leader(self: DirectGet, subject: str) -> Any:
            asked.append(subject)
            return await real(self, subject)

        monkeypatch.setattr(DirectGet, "last", trailing)
        monkeypatch.setattr(StreamReads, "_probe_head", not_the_head)
        monkeypatch.setattr(DirectGet, "last_from_leader", leader)
        assert await store.last_order("s") == 2
        assert asked == [store.layout.session_filter("s")]
        page = await store.read("s", after=0, limit=10, max_bytes=1 << 20)
        assert [msgspec.json.decode(e)["item_order"] for e in page.items] == [1, 2]
    finally:
        await store.close()


async def test_reads_during_appends_get_every_envelope_in_order(nats_server: NatsServer, tmp_path: Path) -> None:
    # The store's connection carries the appends' acks and the reads' batch gets
    # at once; a batch get's frames take the raw path until an ack comes between
    # them in one socket read, and nats-py parses the rest of that read.
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects(prefix_for(tmp_path)))
    await store.open()
    stop = False

    async def writer(n: int) -> None:
        i = 0
        while not stop:
            await store.append(f"w{n}", req(item(f"x{i}")))
            i += 1

    try:
        for start in range(0, 2000, 500):
            await store.append("big", req(*(item(f"m{start + k}") for k in range(500))))
        want = (await store.read("big", after=0, limit=5000, max_bytes=1 << 30)).items
        assert len(want) == 2000
        writers = [asyncio.create_task(writer(n)) for n in range(16)]
        try:
            for _ in range(60):
                page = await store.read("big", after=0, limit=5000, max_bytes=1 << 30)
                assert page.items == want
        finally:
            stop = True
            await asyncio.gather(*writers)
    finally:
        await store.close()


async def test_the_sessions_list_is_the_logs_whatever_else_is_on_the_items_subjects(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # <PREFIX>_ITEMS stores anything published on <prefix>.items.> (a loose NATS
    # configuration, a stray `nats pub`): the list showed a session the log never
    # held and another's wrong last order, and a body that is no envelope made
    # the whole list (convlog sessions, the console, migrate) unavailable.
    subjects = Subjects(prefix_for(tmp_path))
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects)
    await store.open()
    nc = await nats.connect(nats_server.url)
    try:
        await store.append("a", req(item("a1"), item("a2")))
        await store.append("b", req(item("b1")))  # the shard's last item
        real, _ = await store.sessions(after=None, limit=100)
        assert [(i.session_id, i.last_order) for i in real] == [("a", 2), ("b", 1)]
        js = nc.jetstream()
        forged = {"session_id": "a", "item_order": 9, "item_id": "forged", "agent": "user", "kind": "item",
                  "data": {"role": "user", "content": "x"}, "created_at": "2030-01-01T00:00:00.000000Z",
                  "hash": "0" * 64}
        await js.publish(subjects.items("a"), msgspec.json.encode(forged))
        await js.publish(subjects.items("ghost"), msgspec.json.encode({**forged, "session_id": "ghost"}))
        await js.publish(subjects.items("b"), b"not an envelope")
        await js.publish(subjects.items("junk"), b"not an envelope either")
        listed, more = await store.sessions(after=None, limit=100)
        assert listed == real and not more
        # A page whose sessions are all dropped is no end: a client stops at an empty one.
        for k in range(3):
            await js.publish(subjects.items(f"aa{k}"), msgspec.json.encode({**forged, "session_id": f"aa{k}"}))
        first, more = await store.sessions(after=None, limit=2)
        assert [i.session_id for i in first] == ["a", "b"]
        first, more = await store.sessions(after=None, limit=1)
        assert [i.session_id for i in first] == ["a"] and more
        rest, more = await store.sessions(after="a", limit=1)
        assert [i.session_id for i in rest] == ["b"]
    finally:
        await nc.close()
        await store.close()


async def test_a_follower_skips_what_is_not_an_envelope_of_its_session(nats_server: NatsServer, tmp_path: Path) -> None:
    # The items stream takes whatever is published on <prefix>.items.<sid> (a loose NATS
    # configuration): a body that was no envelope ended `convlog tail`, `send`'s wait for
    # its turn and the console's live tail (BadRequestError out of follow()).
    from services.log.service import LogService
    from shared.client import LogClient
    from shared.config import load_settings

    settings = load_settings({"nats_url": nats_server.url, "store": "jetstream",
                              "prefix": prefix_for(tmp_path)}, {})
    service = LogService(settings)
    await service.start()
    client = await LogClient.connect(nats_server.url, settings=settings)
    try:
        await client.append("fol", [AppendItem(agent="a", data={"n": 1})])
        got: list[int] = []

        async def follow() -> None:
            async for env in client.follow("fol", after=0, idle_check=0.5):
                got.append(env.item_order)
                if env.item_order == 2:
                    return

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.5)  # live on the subject
        js = client.nc.jetstream()
        await js.publish(settings.subjects.items("fol"), b"not an envelope")
        await client.append("fol", [AppendItem(agent="a", data={"n": 2})])
        await asyncio.wait_for(task, 10)
        assert got == [1, 2]
    finally:
        await client.close()
        await service.shutdown()


async def test_a_full_log_stream_is_named_not_taken_for_contention(nats_server: NatsServer, tmp_path: Path) -> None:
    """A log stream at a limit (here max_msgs with discard new; max_bytes or the server's
    storage alike) refuses every publish with JetStream's store-failed code, which the
    store took for "this id's subject is taken": it re-read and retried as contention, and
    the append failed "the session is too contended" -- sending an operator after writers
    that were not there.  The refusal is named now."""
    import dataclasses

    from nats.js.api import DiscardPolicy

    from shared.errors import UnavailableError

    store = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects(prefix_for(tmp_path)))
    await store.open()
    nc = await nats.connect(nats_server.url)
    try:
        await store.append("s", req(item("one")))
        js = nc.jetstream()
        log_stream = next(si for si in await js.streams_info() if si.config.name.endswith("_LOG_0"))
        await js.update_stream(dataclasses.replace(log_stream.config, max_msgs=log_stream.state.messages,
                                                   discard=DiscardPolicy.NEW))
        with pytest.raises(UnavailableError) as e:
            await store.append("s", req(item("two")))
        assert "maximum messages exceeded" in e.value.message and "contended" not in e.value.message, e.value.message
        assert [env.data["content"] for env in await read_all(store, "s")] == ["one"]
    finally:
        await nc.close()
        await store.close()


async def test_a_full_log_stream_is_named_when_the_answer_to_the_append_was_lost(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log stream at a limit, and the answer to the publish lost (the server paused
    past the store's resend time).  The copy sent to settle it is refused by the stream
    ("maximum messages exceeded"): answered, so the original was stored or refused
    before it, and the first item's subject says which.  That refusal was taken for a
    stream that could not be asked: the copy was sent again every 0.5 s, 16 times, and
    the append answered "the outcome of an append is unknown" -- of a publish that was
    not stored.  It is named now, as without the lost answer."""
    import dataclasses

    from nats.js.api import DiscardPolicy

    from shared.errors import UnavailableError

    subjects = Subjects(prefix_for(tmp_path))
    first = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects)
    await first.open()
    nc = await nats.connect(nats_server.url)
    try:
        await first.append("s", req(item("one")))
        js = nc.jetstream()
        log_stream = next(si for si in await js.streams_info() if si.config.name.endswith("_LOG_0"))
        await js.update_stream(dataclasses.replace(log_stream.config, max_msgs=log_stream.state.messages,
                                                   discard=DiscardPolicy.NEW))
    finally:
        await nc.close()
        await first.close()

    store = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, timeout=0.5)
    await store.open()
    real = DirectGet.last
    paused: list[bool] = []

    async def then_pause_the_server(self: DirectGet, subject: str) -> Any:
        msg = await real(self, subject)
        if subject == store.layout.session_filter("s") and not paused:
            # The head is read: the publish that follows is answered after the store
            # gave up waiting for it (0.5 s).
            paused.append(True)
            nats_server.pause()
            asyncio.get_running_loop().call_later(0.8, nats_server.resume)
        return msg

    monkeypatch.setattr(DirectGet, "last", then_pause_the_server)
    try:
        with pytest.raises(UnavailableError) as e:
            await store.append("s", req(item("two")))
        assert paused and store._writer.unknown == 1
        assert "maximum messages exceeded" in e.value.message, e.value.message
        monkeypatch.undo()
        assert [env.data["content"] for env in await read_all(store, "s")] == ["one"]
    finally:
        nats_server.resume()
        await store.close()


async def test_a_full_server_storage_refuses_the_append_at_once(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    """The server's JetStream storage full (another stream took it): every publish to
    the log stream is refused "insufficient resources", a limit only an operator clears.
    The store took it for a refusal that might clear and tried again 16 times, 0.25 s
    apart: the append was answered after ~4 s (each one, while the service's queue
    filled).  It is refused at once now, with the stream's reason; nothing stored."""
    import json

    from shared.errors import UnavailableError

    server = nats_server_factory(config="jetstream { max_file_store: 1MB }\n")
    store = JetStreamStore({"servers": [server.url]}, subjects=Subjects(prefix_for(tmp_path)))
    await store.open()
    nc = await nats.connect(server.url)
    try:
        await store.append("s", req(item("one")))
        filler = {"name": "FILLER", "subjects": ["filler.>"], "storage": "file"}
        await nc.request("$JS.API.STREAM.CREATE.FILLER", json.dumps(filler).encode(), timeout=5)
        for _ in range(40):  # until the server's 1 MB is taken
            ack = json.loads((await nc.request("filler.x", b"x" * 60_000, timeout=5)).data)
            if "error" in ack:
                break
        else:
            pytest.fail("the server's storage never filled: the refusal below is not set up")
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(UnavailableError) as e:
            await store.append("s", req(item("two")))
        took = loop.time() - began
        assert "insufficient resources" in e.value.message, e.value.message
        assert took < 1.0, f"refused after {took:.1f} s"
        assert [env.data["content"] for env in await read_all(store, "s")] == ["one"]
    finally:
        await nc.close()
        await store.close()
