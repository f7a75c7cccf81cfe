"""A graceful shutdown waits for the appends in flight, and no longer than they take.

The last appends answered before a shutdown may have no reply subject (a plain
publish) or one the service does not answer on: nothing goes out for them, and
the shutdown still ends as soon as they are committed (it waited out the whole
grace, then cut the outbox's drain and everything after it short under a
process manager's stop timeout).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import nats
import pytest

from services.log.service import LogService
from services.log.store.sqlite import SQLiteStore
from shared.config import load_settings
from shared.messages import AppendItem, AppendRequest
from shared.signing import Signer, sign_item
from tests.support.natsd import NatsServer

GRACE = 6.0
ITEMS = 1500  # one Ed25519 check each, on the verifier's threads: the append stays in flight a while


@pytest.mark.parametrize("reply", ["", "convlog.items.elsewhere"], ids=["no-reply-subject", "unanswerable-reply"])
async def test_a_shutdown_with_unreplied_appends_in_flight_ends_once_they_commit(
    nats_server: NatsServer, tmp_path: Path, keys: Path, reply: str
) -> None:
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db"),
                              "keyring": str(keys / "keyring.json"), "require_signatures": True,
                              "grace": GRACE}, {})
    service = LogService(settings)
    await service.start()
    signer = Signer.load(keys / "Triage.nk")
    items = [sign_item(signer, "s", AppendItem(agent="Triage", item_id=f"i-{n}",
                                               data={"role": "assistant", "content": f"item {n}"}))
             for n in range(ITEMS)]
    body = msgspec.json.encode(AppendRequest(items=items))
    nc = await nats.connect(nats_server.url)
    try:
        await nc.publish("convlog.append.s", body, reply=reply)  # fire and forget
        await nc.flush()
        deadline = time.monotonic() + 10
        while not (service._verifier is not None and service._verifier.busy):  # being checked
            assert time.monotonic() < deadline, "the append never reached the verifier"
            await asyncio.sleep(0.001)
        started = time.monotonic()
        await service.shutdown()
        took = time.monotonic() - started
    finally:
        await nc.close()
        await service.shutdown()
    store = SQLiteStore(tmp_path / "convlog.db")
    async with store:
        assert await store.last_order("s") == ITEMS  # it was in flight: committed, not dropped
    assert took < GRACE / 2, f"the shutdown took {took:.1f} s: it waited out the grace"
