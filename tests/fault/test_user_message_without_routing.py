"""A new session's first user message with ``to`` while the routing bucket cannot be written.

The SQLite log service writes the entry agent a ``to`` names to the routing KV
bucket before it appends the message (workers must find it there).  On a
3-node cluster whose R3 bucket has lost its quorum (both followers SIGSTOPped),
that write times out.  The message was answered ``unavailable: internal error;
the request was not applied`` and logged as an unexpected error with a
traceback, as if the service had a bug; it is now answered ``unavailable``
naming the routing bucket, logged as a warning, and nothing is written: once
the quorum is back, the same message is taken.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import nats
import pytest

from services.log.service import LogService
from shared.config import load_settings
from tests.support.natscluster import NatsCluster

pytestmark = pytest.mark.timeout(60)


async def test_a_to_whose_routing_entry_cannot_be_written_is_refused_as_unavailable(
    nats_cluster: NatsCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = nats_cluster.urls[0]
    settings = load_settings({"nats_url": url, "db": str(tmp_path / "convlog.db"), "stream_replicas": 3}, {})
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(url)
    followers = nats_cluster.servers[1:]
    try:
        body = json.dumps({"content": "my invoice", "item_id": "m1", "to": "L1Billing"}).encode()
        for f in followers:
            f.pause()
        try:
            with caplog.at_level(logging.INFO):
                msg = await nc.request("convlog.in.s1", body, timeout=15)
        finally:
            for f in followers:
                f.resume()
        error = json.loads(msg.data)["error"]
        assert error["code"] == "unavailable", error
        assert "routing" in error["message"] and "not applied" in error["message"], error
        assert "internal error" not in error["message"], error
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert await service.store.last_order("s1") == 0  # nothing half applied
        # The quorum back, the same message is taken, and its entry is in the bucket.
        for _ in range(50):
            msg = await nc.request("convlog.in.s1", body, timeout=15)
            if not msg.headers:
                break
            await asyncio.sleep(0.2)
        assert json.loads(msg.data)["first_order"] == 1, msg
        kv = await nc.jetstream().key_value("convlog_routing")
        assert b"L1Billing" in (await kv.get("s1")).value
    finally:
        await nc.close()
        await service.shutdown()
