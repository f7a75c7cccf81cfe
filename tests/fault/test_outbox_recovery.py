"""Committed items always reach ``convlog.items.<sid>``, and followers never miss one.

Guarantee 4: every committed item is published exactly once, in order — also
items committed while no outbox ran (a crash between commit and publish,
reproduced here by committing with a bare :class:`SQLiteStore`), without
republishing what the stream already holds.  And the follower side of issue 3:
``LogClient.follow`` resumes after a nats-server restart and yields every item
exactly once, in order (designed around nats-py #504/#510).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.log.outbox import (
    MAX_REFUSALS,
    PENDING_WINDOWS,
    Outbox,
    StreamRefusedError,
    ensure_stream,
)
from services.log.store.sqlite import SQLiteStore
from shared.client import LogClient
from shared.codec import decode
from shared.messages import AppendItem, AppendRequest, Envelope
from shared.subjects import Subjects
from tests.support.eventually import assert_eventually
from tests.support.logsvc import LogServiceProc, following, read_stream, stream_matches_log
from tests.support.natsd import NatsServer


def _item(item_id: str, text: str | None = None) -> AppendItem:
    return AppendItem(
        agent="user", data={"role": "user", "content": text or item_id}, item_id=item_id
    )


@contextlib.asynccontextmanager
async def outbox_over(store: SQLiteStore, url: str, **options: Any) -> AsyncIterator[tuple[Client, Outbox]]:
    """Open ``store`` and give an outbox listening to its commits (not started)."""
    await store.open()
    nc = await nats.connect(url)
    subjects = Subjects("convlog")
    outbox = Outbox(nc, store, subjects, **options)
    try:
        await ensure_stream(nc.jetstream(), subjects)
        store.add_commit_listener(outbox.on_commit)
        yield nc, outbox
    finally:
        await outbox.stop()
        await store.close()
        await nc.close()


@pytest.mark.parametrize("published_before", [True, False], ids=["after-a-service-run", "fresh"])
async def test_committed_but_unpublished_items_are_published_after_restart(
    nats_server: NatsServer,
    tmp_db: Path,
    log_services: Callable[..., LogServiceProc],
    published_before: bool,
) -> None:
    sessions = ["outbox-a", "outbox-b"]
    before: list[tuple[str, str, bytes]] = []

    if published_before:
        # A normal run publishes the first items, then stops gracefully.
        svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
        async with await LogClient.connect(nats_server.url) as client:
            await client.append("outbox-a", [_item("a1"), _item("a2"), _item("a3")])
            await client.append("outbox-a", [_item("a4")])
            await client.append("outbox-b", [_item("b1")])
            await assert_eventually(
                lambda: stream_matches_log(client.nc, client, sessions), timeout=10, interval=0.1
            )
            before = await read_stream(client.nc)
        assert await asyncio.to_thread(svc.stop) == 0, svc.output()
        assert len(before) == 5

    # Commit behind the outbox's back: a bare store, no service, no NATS — what a
    # crash right after the commit and before the publish leaves behind.
    store = SQLiteStore(tmp_db)
    await store.open()
    try:
        await store.append("outbox-a", AppendRequest(items=[_item("a5"), _item("a6"), _item("a7")]))
        await store.append("outbox-b", AppendRequest(items=[_item("b2")]))
        await store.append("outbox-a", AppendRequest(items=[_item("a8")]))
        await store.append("outbox-b", AppendRequest(items=[_item("b3"), _item("b4")]))
    finally:
        await store.close()

    # The service starts on that file and publishes exactly what the stream lacks.
    await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, sessions), timeout=15, interval=0.1
        )
        after = await read_stream(client.nc)
        assert len(after) == len(before) + 7
        assert after[: len(before)] == before, "earlier messages changed or were republished"

        # New appends keep flowing after the recovered ones.
        await client.append("outbox-b", [_item("b5")])
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, sessions), timeout=10, interval=0.1
        )


async def test_a_commit_landing_while_the_outbox_looks_for_work_is_published(
    nats_server: NatsServer, tmp_db: Path
) -> None:
    """Regression: the outbox once cleared its wake-up event *after* finding no
    backlog, so a commit landing during that store query was stranded until the
    next commit — the last item of a quiet session never reached the stream.
    (The outbox now asks the store for a backlog only after a (re)sync, so the
    commit lands during its first look, at start.)"""
    sid = "quiet"

    class CommitWhileLooking(SQLiteStore):
        armed = False

        async def committed_after(self, position: int, limit: int) -> list:  # type: ignore[type-arg]
            found = await super().committed_after(position, limit)
            if self.armed and not found:
                # The outbox saw nothing to do; a commit lands before it goes to sleep.
                self.armed = False
                await self.append(sid, AppendRequest(items=[_item("late")]))
            return found

    store = CommitWhileLooking(tmp_db)
    async with outbox_over(store, nats_server.url) as (nc, outbox):
        store.armed = True
        await outbox.start()

        async def published(n: int) -> None:
            msgs = await read_stream(nc)
            assert [m for _, m, _ in msgs] == [f"{sid}:{i}" for i in range(1, n + 1)]

        await assert_eventually(lambda: published(1), timeout=5)
        assert not store.armed
        await store.append(sid, AppendRequest(items=[_item("second")]))
        await assert_eventually(lambda: published(2), timeout=5)


async def test_a_caught_up_outbox_publishes_from_commits_without_querying_the_store(
    nats_server: NatsServer, tmp_db: Path
) -> None:
    """Each store query costs the single writer's event loop a thread round
    trip; once caught up, the outbox takes commits from the commit listener."""
    sid = "busy"

    class CountingStore(SQLiteStore):
        queries = 0

        async def committed_after(self, position: int, limit: int) -> list:  # type: ignore[type-arg]
            self.queries += 1
            return await super().committed_after(position, limit)

    store = CountingStore(tmp_db)
    async with outbox_over(store, nats_server.url) as (nc, outbox):
        await outbox.start()
        await store.append(sid, AppendRequest(items=[_item("first")]))

        async def published(n: int) -> None:
            assert len(await read_stream(nc)) == n

        await assert_eventually(lambda: published(1), timeout=5)
        before = store.queries
        for i in range(40):
            await store.append(sid, AppendRequest(items=[_item(f"m{i}")]))
            await asyncio.sleep(0.005)  # the outbox goes idle between commits
        await assert_eventually(lambda: published(41), timeout=5)
        assert store.queries == before


async def test_commits_during_a_long_outage_are_not_all_held_in_memory_and_all_get_published(
    nats_server: NatsServer, tmp_db: Path
) -> None:
    """While the stream answers nothing, the outbox once queued every commit in
    memory, without bound (an outage long enough exhausts the log service's
    memory).  Beyond a few windows it now reads them back from the store, and
    still publishes every item exactly once, in order, when the stream is back."""
    sid = "outage"
    window = 8
    store = SQLiteStore(tmp_db)
    async with outbox_over(store, nats_server.url, window=window, ack_timeout=0.5) as (nc, outbox):
        await outbox.start()
        await store.append(sid, AppendRequest(items=[_item("m0")]))

        async def published(n: int) -> None:
            msgs = await read_stream(nc)
            assert [m for _, m, _ in msgs] == [f"{sid}:{i}" for i in range(1, n + 1)]

        await assert_eventually(lambda: published(1), timeout=5)
        nats_server.pause()  # nothing is answered: every window's ack times out
        try:
            most = 0
            for i in range(60):
                await store.append(sid, AppendRequest(items=[_item(f"m{i}-{j}") for j in range(10)]))
                most = max(most, len(outbox._pending))
        finally:
            nats_server.resume()
        assert most <= PENDING_WINDOWS * window + 10, f"{most} commits held in memory"
        await assert_eventually(lambda: published(601), timeout=30, interval=0.2)


@pytest.mark.slow
async def test_follower_resumes_through_nats_restarts_with_every_item_once_in_order(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    sid = "followed"
    await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    writer = await LogClient.connect(nats_server.url, name="test-writer")
    follower = await LogClient.connect(nats_server.url, name="test-follower")

    async def orders(into: list[Envelope], first: int, last: int) -> None:
        assert [e.item_order for e in into] == list(range(first, last + 1))

    try:
        await writer.append(sid, [_item("m1"), _item("m2"), _item("m3")])
        async with following(follower, sid) as seen:
            await assert_eventually(lambda: orders(seen, 1, 3), timeout=10)

            # Live items, then a graceful restart with items appended right after it.
            await writer.append(sid, [_item("m4")])
            await assert_eventually(lambda: orders(seen, 1, 4), timeout=10)
            await asyncio.to_thread(nats_server.restart)
            await writer.append(sid, [_item("m5")])
            await writer.append(sid, [_item("m6"), _item("m7")])
            await assert_eventually(lambda: orders(seen, 1, 7), timeout=30, interval=0.1)

            # A second follower from the middle, then a crash of nats-server (SIGKILL).
            async with following(follower, sid, after=5) as late:
                await assert_eventually(lambda: orders(late, 6, 7), timeout=10)
                await asyncio.to_thread(nats_server.kill)
                await asyncio.to_thread(nats_server.start)
                for i in range(8, 12):
                    await writer.append(sid, [_item(f"m{i}")])
                await assert_eventually(lambda: orders(seen, 1, 11), timeout=30, interval=0.1)
                await assert_eventually(lambda: orders(late, 6, 11), timeout=30, interval=0.1)

        # Exactly the log, once each, in order.
        assert seen == await writer.items(sid)
        assert late == seen[5:]
    finally:
        await follower.close()
        await writer.close()


async def test_a_follower_stops_when_cancelled_even_if_a_reply_races_the_cancel(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    """Regression: on Python 3.11 ``asyncio.wait_for`` (under nats-py requests)
    returns the reply instead of raising when the reply and a cancel land in the
    same loop tick.  ``follow`` loops forever, so it swallowed the cancel and
    never stopped (a hung shutdown).  It must honour the pending cancellation."""
    sid = "cancel-me"
    await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        await client.append(sid, [_item("only")])
        loop = asyncio.get_running_loop()
        in_idle_check = asyncio.Event()
        reply: asyncio.Future[None] = loop.create_future()
        real_last_order = client.last_order

        async def last_order(session_id: str) -> int:
            # The follower's idle check asks the log for its last order: hold the
            # "reply" until the test delivers it in the same tick as the cancel.
            in_idle_check.set()
            await asyncio.wait_for(reply, timeout=10)
            return await real_last_order(session_id)

        client.last_order = last_order  # type: ignore[method-assign]
        seen: list[Envelope] = []

        async def consume() -> None:
            async for env in client.follow(sid, idle_check=0.2):
                seen.append(env)

        task = asyncio.create_task(consume())
        try:
            await asyncio.wait_for(in_idle_check.wait(), timeout=10)
            reply.set_result(None)
            task.cancel()  # same tick as the reply
            done, _ = await asyncio.wait({task}, timeout=5)
            assert done, "the follower ignored its cancellation"
            assert task.cancelled()
            assert [e.item_id for e in seen] == ["only"]
        finally:
            for _ in range(3):  # never leave a runaway follower behind
                if task.done():
                    break
                task.cancel()
                await asyncio.wait({task}, timeout=2)


async def test_outbox_resyncs_on_reconnect_not_after_its_ack_timeout(
    nats_server: NatsServer, tmp_db: Path
) -> None:
    """An ack in flight when the server dies never arrives.  The outbox must
    notice the disconnect and resync once reconnected, instead of sitting out
    its ack timeout (here 10 minutes, far beyond the test's patience)."""
    from services.log.service import LogService
    from shared.config import load_settings

    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_db)}, {})
    service = LogService(settings, outbox_ack_timeout=600.0)
    await service.start()
    try:
        async with await LogClient.connect(nats_server.url) as client:
            await client.append("resync", [_item("before")])
            await assert_eventually(
                lambda: stream_matches_log(client.nc, client, ["resync"]), timeout=10, interval=0.1
            )
        # Freeze the server, then commit straight into the service's store: the
        # outbox publishes into the frozen connection and waits for an ack that
        # will never come, because the server is then killed.
        await asyncio.to_thread(nats_server.pause)
        await service.store.append("resync", AppendRequest(items=[_item("in-flight")]))
        assert service.outbox is not None
        await assert_eventually(lambda: _ack_pending(service.outbox), timeout=10)
        await asyncio.to_thread(nats_server.kill)
        await asyncio.to_thread(nats_server.restart)
        async with await LogClient.connect(nats_server.url) as client:
            await assert_eventually(
                lambda: stream_matches_log(client.nc, client, ["resync"]), timeout=60, interval=0.2
            )
    finally:
        await service.shutdown()


def _ack_pending(outbox: Outbox) -> None:
    assert outbox._acks, "the outbox has no publish window waiting for its ack yet"


async def test_after_a_purged_items_stream_only_new_commits_are_published(
    nats_server: NatsServer, tmp_db: Path
) -> None:
    """The stream emptied (purged, aged out): the outbox cannot tell what it held, so it
    takes everything committed as published and goes on with new commits.  It finds
    the log's end page by page (it read the whole log into memory at once)."""
    sid = "purged"

    class PagingStore(SQLiteStore):
        limits: list[int] = []

        async def committed_after(self, position: int, limit: int) -> list:  # type: ignore[type-arg]
            self.limits.append(limit)
            return await super().committed_after(position, limit)

    store = PagingStore(tmp_db)
    async with outbox_over(store, nats_server.url) as (nc, outbox):
        await store.append(sid, AppendRequest(items=[_item(f"m{i}") for i in range(5)]))
        js = nc.jetstream()
        await js.publish("convlog.items.other", b"{}")  # the stream held something once
        await js.purge_stream("CONVLOG_ITEMS")
        await outbox.start()
        await store.append(sid, AppendRequest(items=[_item("new")]))

        async def published() -> None:
            msgs = await read_stream(nc)
            assert [m for _, m, _ in msgs] == [f"{sid}:6"]

        await assert_eventually(published, timeout=5)
        assert store.limits and max(store.limits) <= 10_000


# A cluster without quorum refuses the resend of a window whose first publish it is
# still replicating: 10158 "duplicate message id is in process".  The outbox counted
# those toward MAX_REFUSALS, so an outage of five ack waits stopped the log service
# (seen in a suite run, test_health); a busy server's refusals are now retried for as
# long as they last, while a refusal a resync should cure still ends it after five.
async def test_a_busy_servers_refusals_are_retried_without_end_and_others_are_counted(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    async with outbox_over(store, nats_server.url) as (nc, outbox):
        def ack(err_code: int, description: str) -> Msg:
            body = {"error": {"code": 503, "err_code": err_code, "description": description}}
            return Msg(nc, subject="_INBOX.x.1", data=msgspec.json.encode(body))

        for _ in range(3 * MAX_REFUSALS):
            with pytest.raises(nats.js.errors.APIError) as refused:
                outbox._check_ack(ack(10158, "duplicate message id is in process"), "s:1")
            assert not isinstance(refused.value, StreamRefusedError)
        for _ in range(MAX_REFUSALS - 1):
            with pytest.raises(nats.js.errors.APIError) as refused:
                outbox._check_ack(ack(10070, "wrong last msg ID"), "s:1")
            assert not isinstance(refused.value, StreamRefusedError)
        with pytest.raises(StreamRefusedError, match="5 windows in a row"):
            outbox._check_ack(ack(10070, "wrong last msg ID"), "s:1")


# Something else publishing on `convlog.items.<sid>` (a loose NATS configuration, a
# misconfigured app): its message, with no `Nats-Msg-Id`, broke the outbox's
# `Nats-Expected-Last-Msg-Id` chain; the resync then found the stream ending with a
# message this database does not hold, took the stream for another database's and
# stopped the log service (CRITICAL, exit 1) -- and a restart stopped the same way.
# Such a message is skipped now (logged); a stream ending with another database's
# convlog message is still refused.
async def test_a_stray_message_on_the_items_subjects_does_not_stop_the_fan_out(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    sessions = ["stray-a", "stray-b"]
    async with await LogClient.connect(nats_server.url) as client:
        await client.append("stray-a", [_item("a1"), _item("a2")])

        async def published() -> None:
            got = [(s, i) for s, i, _ in await read_stream(client.nc)]
            assert got and got[-1][1] == "stray-a:2", got

        await assert_eventually(published, timeout=10, interval=0.1)
        js = client.nc.jetstream()
        await js.publish("convlog.items.stray-a", b'{"not": "an envelope"}')
        await js.publish("convlog.items.stray-b", b"hello", headers={"Nats-Msg-Id": "hello"})
        for k in range(3, 6):
            await client.append("stray-a", [_item(f"a{k}")])
            await client.append("stray-b", [_item(f"b{k}")])

        async def all_published() -> None:
            ids = [i for _, i, _ in await read_stream(client.nc)]
            assert ids[-2:] == ["stray-a:5", "stray-b:3"], ids

        await assert_eventually(all_published, timeout=15, interval=0.1)
        assert svc.proc is not None and svc.proc.running, svc.output()
        stream = await read_stream(client.nc)
        assert [i for _, i, _ in stream] == ["stray-a:1", "stray-a:2", "", "hello", "stray-a:3", "stray-b:1",
                                             "stray-a:4", "stray-b:2", "stray-a:5", "stray-b:3"]
        for sid in sessions:  # each session's own messages are its log, byte for byte
            mine = [d for s, i, d in stream if s.endswith("." + sid) and i.startswith(sid + ":")]
            assert [decode(d, Envelope) for d in mine] == await client.items(sid)
    assert "skipped" in svc.output() and "CRITICAL" not in svc.output(), svc.output()


# An item committed while the server took larger messages (max_payload 64 KiB here)
# and not on the stream when the server comes back with a smaller max_payload (here:
# the items stream deleted, which the service answers by republishing every item, as
# after a restore; or a crash between its commit and its publish) can never be
# published again.  The outbox raised nats-py's MaxPayloadError, which stopped the log
# service (exit 1, "outbox stopped: MaxPayloadError: nats: maximum payload exceeded",
# naming neither the item nor the limit) -- and every restart stopped the same way, so
# no later item of any session was published (nor any append answered) for good.  Such
# an item is skipped now, logged at ERROR naming it, its size and the limit; every
# other item is published, in order.
async def test_an_item_over_a_lowered_max_payload_does_not_stop_the_fan_out(
    nats_server_factory: Callable[..., NatsServer], tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    server = nats_server_factory(config="max_payload: 65536\n")
    svc = await asyncio.to_thread(log_services, server.url, tmp_db)
    async with await LogClient.connect(server.url) as client:
        await client.append("small", [_item("s1")])
        await client.append("big", [_item("b1", "x" * 40_000)])
        await client.append("small", [_item("s2")])
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, ["small", "big"]), timeout=10, interval=0.1
        )
    assert await asyncio.to_thread(svc.stop) == 0, svc.output()

    # The operator lowers max_payload; the items stream is gone (its whole log is due again).
    server.config = "max_payload: 16384\n"
    await asyncio.to_thread(server.restart)
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().delete_stream("CONVLOG_ITEMS")
    finally:
        await nc.close()
    svc.start()
    async with await LogClient.connect(server.url) as client:
        await client.append("small", [_item("s3")])

        async def published() -> None:
            ids = [i for _, i, _ in await read_stream(client.nc)]
            assert ids == ["small:1", "small:2", "small:3"], ids

        await assert_eventually(published, timeout=10, interval=0.1)
        await client.append("big", [_item("b2")])  # and the session of the big item goes on

        async def big_goes_on() -> None:
            ids = [i for _, i, _ in await read_stream(client.nc)]
            assert ids == ["small:1", "small:2", "small:3", "big:2"], ids

        await assert_eventually(big_goes_on, timeout=10, interval=0.1)
        assert svc.proc is not None and svc.proc.running, svc.output()
    out = svc.output()
    assert "CRITICAL" not in out, out
    assert "big #1" in out and "16384" in out, out
