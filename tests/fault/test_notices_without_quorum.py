"""Turn notices while the work stream has no quorum and core NATS still works:
a 3-node cluster, R3 streams, two of the nodes SIGSTOPped while the SQLite
store goes on committing user messages at full rate.

Each notice waits for its ack (5 s) and the notices of overlapping commits
queue for the next atomic batch, so every notice committed meanwhile was held
in memory until the stream answered again: an outage long enough exhausts the
log service's memory.  The notifier now holds at most ``max_pending``; the
rest are left to the reconciler, and once the stream answers every user
message still gets its notice, once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from services.log.notices import Notifier
from services.log.outbox import Outbox, ensure_stream
from services.log.reconciler import Reconciler
from services.log.service import ensure_routing_bucket
from services.log.store.sqlite import SQLiteStore
from shared.messages import AppendItem, AppendRequest
from shared.subjects import Subjects
from shared.work import ensure_work_stream, notice_msg_id, work_stream_name
from tests.support.eventually import assert_eventually
from tests.support.natscluster import NatsCluster

pytestmark = pytest.mark.timeout(150)

SUBJECTS = Subjects("convlog")
COMMITS, PER_COMMIT = 300, 5  # user messages committed while the stream cannot answer
LIMIT = 200


def _user(item_id: str) -> AppendItem:
    return AppendItem(agent="user", data={"role": "user", "content": item_id}, item_id=item_id)


async def _stored_notice_ids(js: nats.js.JetStreamContext) -> list[str]:
    stream = work_stream_name(SUBJECTS)
    info = await js.stream_info(stream)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        ids.append((msg.headers or {})["Nats-Msg-Id"])
    return ids


async def test_notices_held_while_the_work_stream_has_no_quorum_are_bounded_and_none_is_lost(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    kept, *paused = nats_cluster.servers
    nc = await nats.connect(kept.url)
    js = nc.jetstream()
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    await ensure_stream(js, SUBJECTS, replicas=3)
    await ensure_work_stream(js, SUBJECTS, replicas=3)
    kv = await ensure_routing_bucket(nc, SUBJECTS, replicas=3)
    notifier = Notifier(nc, SUBJECTS, kv, sole_writer=True)
    notifier.max_pending = LIMIT
    outbox = Outbox(nc, store, SUBJECTS, ack_timeout=1.0)
    reconciler = Reconciler(nc, SUBJECTS, notifier, store, interval=0.2)
    store.add_commit_listener(notifier.on_commit)
    store.add_commit_listener(outbox.on_commit)
    await outbox.start()
    await reconciler.bind()
    reconciling = asyncio.create_task(reconciler.run())
    expected = []
    try:
        await store.append("before", AppendRequest(items=[_user("before")]))
        expected.append(notice_msg_id("before", 1))

        async def published_before() -> None:
            assert notifier.published == 1

        await assert_eventually(published_before, timeout=10)

        for server in paused:
            await asyncio.to_thread(server.pause)
        try:
            most = 0
            for i in range(COMMITS):
                sids = [f"s{i}-{j}" for j in range(PER_COMMIT)]
                # At once, so the store commits them together: their notices go in one batch.
                await asyncio.gather(*(store.append(sid, AppendRequest(items=[_user(sid)])) for sid in sids))
                expected += [notice_msg_id(sid, 1) for sid in sids]
                most = max(most, len(notifier._inflight))
            await asyncio.sleep(1.0)  # the first publishes wait out their acks
            most = max(most, len(notifier._inflight))
        finally:
            for server in paused:
                server.resume()
        assert most <= LIMIT, f"{most} notices held in memory while the work stream had no quorum"

        async def every_notice_stored_once() -> None:
            ids = await _stored_notice_ids(js)
            assert sorted(ids) == sorted(expected), (len(ids), len(expected))

        await assert_eventually(every_notice_stored_once, timeout=90, interval=1.0)
    finally:
        reconciling.cancel()
        await asyncio.gather(reconciling, return_exceptions=True)
        await notifier.stop()
        await outbox.stop()
        await store.close()
        await nc.close()
        for server in paused:
            server.resume()
