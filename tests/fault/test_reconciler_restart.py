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
