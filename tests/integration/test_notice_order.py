"""The turn notices of one session's user messages, committed one after another, go
out in that order.

A session whose address names an agent missing from the notifier's list of agents
with a consumer (a ``to`` naming an agent nobody runs yet) has the list read again
before its notice is addressed (at most once a second).  The notice of the next
message, committed while that listing was out, did not wait for it: it went out
first, so the entry agent's worker (which handles a session's notices in arrival
order) answered the second message before the first.  The listing is slowed here
(a server answering ``consumers_info`` late, as a loaded one does) to widen the window.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from services.log.notices import Notifier
from services.log.service import LogService
from shared.config import load_settings
from tests.support.natsd import NatsServer

SLOW_LISTING = 0.3  # seconds: the consumers listing is this late


async def test_notices_of_one_session_go_out_in_commit_order_while_its_agent_is_listed_again(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Notifier._list_agents

    async def slow_listing(self: Notifier) -> None:
        await asyncio.sleep(SLOW_LISTING)
        await real(self)

    monkeypatch.setattr(Notifier, "_list_agents", slow_listing)
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db")}, {})
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(nats_server.url)
    try:
        orders: list[int] = []
        got = asyncio.Event()

        async def seen(msg: nats.aio.msg.Msg) -> None:
            orders.append(json.loads(msg.data)["item_order"])
            got.set()

        await nc.subscribe("convlog.work.>", cb=seen)
        await nc.flush()

        async def send(content: str, **extra: str) -> None:
            body = json.dumps({"content": content, **extra}).encode()
            reply = await nc.request("convlog.in.s1", body, timeout=5)
            assert not reply.headers, reply.data

        await send("one", to="Ghost")  # an agent no worker runs: its notices go to work.entry
        async with asyncio.timeout(5):
            while orders != [1]:
                await got.wait()
                got.clear()
        await send("two")  # its agent is listed again, slowly
        await send("three")  # committed while that listing is out
        async with asyncio.timeout(5):
            while len(orders) < 3:
                await got.wait()
                got.clear()
        assert orders == [1, 2, 3]
    finally:
        await nc.close()
        await service.shutdown()
