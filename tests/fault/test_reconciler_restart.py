"""The notice reconciler after a restart, or a failed sweep: a user message whose notice
was never published, and whose item a pull had been handed but never handled, is still
announced (no agent consumer: notices stay in the work stream)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from services.log.reconciler import RECONCILER
from services.log.service import LogService
from shared.client import LogClient
from shared.config import Settings, load_settings
from shared.work import work_stream_name
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer


async def _notice_ids(js: nats.js.JetStreamContext, stream: str) -> list[str]:
    state = (await js.stream_info(stream)).state
    ids = []
    for seq in range(max(1, state.first_seq), state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    return ids


async def _stack(
    nats_server: NatsServer, tmp_path: Path
) -> tuple[Settings, nats.NATS, nats.js.JetStreamContext, str]:
    """A log service's settings on ``nats_server``, a connection of the test's own, its
    JetStream context and the work stream's name (where the notices are)."""
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"),
                              "data_dir": str(tmp_path)}, environ={})
    nc = await nats.connect(nats_server.url)
    return settings, nc, nc.jetstream(), work_stream_name(settings.subjects)


async def test_a_notice_the_dead_process_neither_published_nor_reconciled_is_published_after_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The reconciler's consumer acks with AckPolicy.ALL: an ack of one message acks
    every earlier one.  Items its pull had been handed when the process died stay
    pending until the consumer's ack wait (30 s) redelivers them; the next process
    acked the first items committed after its start long before that, and with them
    the dead process's unhandled ones: their notices were never published and those
    user messages never answered."""
    settings, nc, js, work = await _stack(nats_server, tmp_path)
    first = LogService(settings)
    await first.start()
    try:
        client = LogClient(nc, timeout=5, deadline=10)
        assert first.notifier is not None and first._reconciler is not None
        first._reconciler.cancel()  # its reconciler gets the item but dies before handling it
        await asyncio.wait({first._reconciler})
        # As if the process died right after the commit: the notice is never published.
        first.notifier._start = lambda *a, **k: None  # type: ignore[method-assign]
        await client.send("lost", "anyone there?")

        dying = await nats.connect(nats_server.url)
        sub = await dying.jetstream().pull_subscribe_bind(durable=RECONCILER, stream=settings.subjects.stream_name)

        async def handed() -> None:
            assert len(await sub.fetch(1, timeout=1)) == 1  # delivered, never acked

        await assert_eventually(handed, timeout=10)
        await dying.close()
    finally:
        await first.shutdown()
    assert "lost:1" not in await _notice_ids(js, work)

    second = LogService(settings)
    await second.start()
    try:
        await LogClient(nc, timeout=5, deadline=10).send("next", "hello")

        async def both_announced() -> None:
            ids = await _notice_ids(js, work)
            assert "next:1" in ids and "lost:1" in ids, ids

        await assert_eventually(both_announced, timeout=15)
        assert second.reconciler is not None
        await asyncio.sleep(2.5)  # a sweep later: nothing announced twice
        ids = await _notice_ids(js, work)
        assert sorted(ids) == ["lost:1", "next:1"], ids
    finally:
        await second.shutdown()
        await nc.close()


async def test_items_handed_to_a_pull_lost_with_the_connection_are_redone_before_the_next_ack(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same loss within one process: a sweep whose pull had been handed an item
    failed (the connection dropped before the item arrived); the reconciler bound
    again and its next sweep acked newer items, and with them (AckPolicy.ALL) the one
    it never saw. Its catch-up ran once per process, so that notice was never
    published. A failed sweep now makes the next one catch up first."""
    settings, nc, js, work = await _stack(nats_server, tmp_path)
    service = LogService(settings)
    await service.start()
    dying = await nats.connect(nats_server.url)
    try:
        client = LogClient(nc, timeout=5, deadline=10)
        reconciler, notifier = service.reconciler, service.notifier
        assert reconciler is not None and notifier is not None
        lost_pull = await dying.jetstream().pull_subscribe_bind(
            durable=RECONCILER, stream=settings.subjects.stream_name)
        real_sweep = reconciler.sweep
        fail_next, waiting, failed = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def sweep() -> int:
            if fail_next.is_set():
                fail_next.clear()
                waiting.set()
                # The pull is handed the item, and the connection fails before it arrives.
                assert len(await lost_pull.fetch(1, timeout=10)) == 1
                failed.set()
                raise nats.errors.ConnectionClosedError
            return await real_sweep()

        monkeypatch.setattr(reconciler, "sweep", sweep)
        monkeypatch.setattr(notifier, "_start", lambda *a, **k: None)  # its notice is never published
        fail_next.set()
        await asyncio.wait_for(waiting.wait(), 10)  # no sweep of the reconciler's own is under way
        await client.send("lost", "anyone there?")
        await asyncio.wait_for(failed.wait(), 10)
        monkeypatch.undo()  # notices are published again, sweeps succeed
        await client.send("next", "hello")

        async def both_announced() -> None:
            ids = await _notice_ids(js, work)
            assert "next:1" in ids and "lost:1" in ids, ids

        await assert_eventually(both_announced, timeout=15)  # (the consumer's ack wait is 30 s)
    finally:
        await dying.close()
        await service.shutdown()
        await nc.close()


# The items stream made again (deleted while the service ran, by an operator after a
# restore -- README --, or as a refusal of the service advises): the log service
# republishes every item of the log, and the reconciler's consumer, made again as well
# (DeliverPolicy.NEW) while that went on, was handed them as new.  It announced every
# user message the log ever held once more: each worker was sent a notice per message
# of the past (here once the work stream's duplicate window no longer hides them), and
# read each finished turn again.  Items committed before the consumer is made are
# taken as announced, as on a first start.
async def test_an_items_stream_made_again_does_not_announce_the_logs_past_messages_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    settings, nc, js, work = await _stack(nats_server, tmp_path)
    service = LogService(settings)
    await service.start()
    try:
        client = LogClient(nc, timeout=5, deadline=10)
        for i in range(20):
            await client.append(f"past-{i}", [{"agent": "user", "data": {"role": "user", "content": f"m{i}"}}])
        await assert_eventually(lambda: _count(js, work, 20), timeout=5)
        await service.shutdown()
        await js.delete_stream(settings.subjects.stream_name)
        # As if the past messages were announced longer ago than the work stream remembers.
        config = (await js.stream_info(work)).config
        config.duplicate_window = 0.5
        await js.update_stream(config)
        await asyncio.sleep(0.6)

        service = LogService(settings)
        await service.start()
        assert service.reconciler is not None
        service.reconciler.interval = 0.1
        await client.append("new", [{"agent": "user", "data": {"role": "user", "content": "now"}}])

        async def looked_at_all() -> None:
            last = (await js.stream_info(settings.subjects.stream_name)).state.last_seq
            info = await js.consumer_info(settings.subjects.stream_name, RECONCILER)
            assert last == 21 and info.ack_floor is not None and info.ack_floor.stream_seq == last

        await assert_eventually(looked_at_all, timeout=10)
        ids = await _notice_ids(js, work)
        assert ids.count("new:1") == 1 and len(ids) == 21, ids
        assert service.reconciler.republished == 0
    finally:
        await service.shutdown()
        await nc.close()


async def _count(js: nats.js.JetStreamContext, stream: str, n: int) -> None:
    assert (await js.stream_info(stream)).state.messages == n


# The items stream allows one consumer, and someone else holds it: the reconciler can make
# no consumer, so no lost turn notice is ever redone -- and the service said so at INFO,
# every 2 s, where an operator watching warnings saw nothing.
async def test_a_reconciler_that_cannot_make_its_consumer_warns_once(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from nats.js.api import ConsumerConfig, StreamConfig

    caplog.set_level(logging.INFO, logger="convlog.log.notices")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="CONVLOG_ITEMS", subjects=["convlog.items.>"], max_consumers=1))
        await js.add_consumer("CONVLOG_ITEMS", ConsumerConfig(durable_name="someone-else"))
    finally:
        await nc.close()
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "c.db")}, {})
    async with LogService(settings) as service:
        service.reconciler.interval = 0.2

        def said(level: int) -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.levelno >= level and r.getMessage().startswith("notice reconciler:")]

        def failed(times: int) -> None:
            assert len(said(logging.INFO)) >= times

        await assert_eventually(lambda: failed(4), timeout=10)  # it goes on failing ...
        (warning,) = said(logging.WARNING)  # ... said loudly once
        assert "lost turn notices are not redone" in warning and "maximum consumers" in warning, warning
