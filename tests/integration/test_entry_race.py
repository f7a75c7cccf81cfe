"""Two first messages of a new session naming different agents (``to``) at once.

The first one's ``to`` is written to the routing bucket as the session's entry;
the second one's write finds it there and loses (create-only), so workers route
the session by the first one's.  The log service noted the loser's ``to`` as the
session's active agent all the same, before its write: every later notice of the
session was addressed to that agent, whose worker forwarded each one to the
bucket's (two deliveries a turn) until a handoff.  The commit is slowed here (a
slow disk) so that the second message is decided before the first is committed,
as it sometimes is (2 sessions in 20 in a plain run).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from services.log.service import LogService
from services.log.store.sqlite import SQLiteStore
from services.worker.intake import consumer_name
from shared.config import load_settings
from shared.work import work_stream_name
from tests.support.natsd import NatsServer

SLOW_COMMIT = 0.05  # seconds


async def test_a_to_that_lost_the_entry_to_another_does_not_address_the_session(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SQLiteStore._commit_batch

    async def slow_commit(self: SQLiteStore, batch: list, **kw: bool) -> object:
        await asyncio.sleep(SLOW_COMMIT)
        return await real(self, batch, **kw)

    monkeypatch.setattr(SQLiteStore, "_commit_batch", slow_commit)
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db")}, {})
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for agent in ("L1Billing", "L1Technical"):  # both have a worker's consumer
            await js.add_consumer(work_stream_name(settings.subjects), ConsumerConfig(
                durable_name=consumer_name(agent), filter_subject=f"convlog.work.agent.{agent}",
                ack_policy=AckPolicy.EXPLICIT))
        notices: list[tuple[int, str]] = []
        three = asyncio.Event()

        async def seen(msg: nats.aio.msg.Msg) -> None:
            notices.append((json.loads(msg.data)["item_order"], msg.subject.rpartition(".")[2]))
            if len(notices) == 3:
                three.set()

        await nc.subscribe("convlog.work.>", cb=seen)
        await nc.flush()
        first = nc.request("convlog.in.s1", json.dumps({"content": "a", "to": "L1Billing"}).encode(), timeout=5)
        second = nc.request("convlog.in.s1", json.dumps({"content": "b", "to": "L1Technical"}).encode(), timeout=5)
        for reply in await asyncio.gather(first, second):
            assert not reply.headers, reply.data
        reply = await nc.request("convlog.in.s1", json.dumps({"content": "c"}).encode(), timeout=5)
        assert not reply.headers, reply.data
        kv = await js.key_value(settings.subjects.routing_bucket)
        entry = json.loads((await kv.get("s1")).value)
        assert entry["active"] == "L1Billing"
        await asyncio.wait_for(three.wait(), 5)
        assert sorted(notices) == [(1, "L1Billing"), (2, "L1Billing"), (3, "L1Billing")]
    finally:
        await nc.close()
        await service.shutdown()
