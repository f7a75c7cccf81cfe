"""A ``ConvlogSession``'s local copy across a nats-server restart.

Deliveries made while the connection was down are lost to the copy's
consumer (ephemeral, in memory on the server); the copy notices the
reconnect, reads what it missed from the log and follows again on a new
consumer.  Real nats-server (restarted on its port and store), real log service.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shared import ConvlogSession
from shared.client import LogClient
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def _sees(session: ConvlogSession, expected: list[str]) -> None:
    assert [i["content"] for i in await session.get_items()] == expected


async def test_the_copy_catches_up_and_follows_again_after_a_server_restart(
    nats_server: NatsServer, log_url: str
) -> None:
    # No periodic check: catching up must come from noticing the reconnect.
    session = ConvlogSession.from_url("restart", url=log_url, max_staleness=3600)
    other = await LogClient.connect(log_url, name="other-process")
    try:
        await other.append("restart", [{"agent": "x", "data": _user("before")}])
        await assert_eventually(lambda: _sees(session, ["before"]), timeout=10)
        consumer = session.copy_info()["consumer"]  # type: ignore[index]

        # 1. The server restarts; the other process writes as soon as it can.
        await asyncio.to_thread(nats_server.restart)
        await other.append("restart", [{"agent": "x", "data": _user("after restart")}])

        # 2. The copy reads what it missed, then follows on a new consumer.
        await assert_eventually(lambda: _sees(session, ["before", "after restart"]), timeout=30)
        info = session.copy_info()
        assert info is not None and info["following"] and info["consumer"] != consumer
        reads = info["log_reads"]
        await other.append("restart", [{"agent": "x", "data": _user("delivered")}])
        await assert_eventually(
            lambda: _sees(session, ["before", "after restart", "delivered"]), timeout=10)
        assert session.copy_info()["log_reads"] == reads  # type: ignore[index] # by delivery
    finally:
        await other.close()
        await session.close()
