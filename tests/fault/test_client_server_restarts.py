"""``LogClient`` against a nats-server that goes away and comes back (found in a review).

* a client closed while its nats-server is down (its connection reconnecting)
  closes its connection and ends the requests it has in flight at once, with
  ``unavailable``: before, ``close()`` tried to drain, nats-py refused a drain
  while reconnecting, the refusal was swallowed, and the connection stayed open,
  reconnecting forever, while the request in flight retried to its deadline;
* a request in flight on a client closed while its nats-server is frozen
  (SIGSTOP: the close's drain waits on the server) ends with ``unavailable``, as
  the client documents, not with nats-py's ``ConnectionDrainingError``: its retry
  met the draining connection, an error the retry policy did not know;
* a follower whose client is closed ends (``unavailable``) instead of waiting out,
  forever, a connection that never reopens.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.client import LogClient
from shared.errors import UnavailableError
from tests.support.natsd import NatsServer


async def test_a_client_closed_while_nats_is_down_closes_its_connection_and_ends_its_requests(
    nats_server: NatsServer,
) -> None:
    client = await LogClient.connect(nats_server.url)
    client.timeout, client.deadline = 1.0, 30.0
    try:
        await asyncio.to_thread(nats_server.stop)
        for _ in range(200):
            if client.nc.is_reconnecting:
                break
            await asyncio.sleep(0.05)
        assert client.nc.is_reconnecting
        task = asyncio.create_task(client.append("s", [{"agent": "a", "data": {"x": 1}}]))
        await asyncio.sleep(0.3)  # in flight: retried while the server is away
        assert not task.done()
        started = time.monotonic()
        await asyncio.wait_for(client.close(), 10)
        assert client.nc.is_closed  # not left reconnecting forever
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(task, 20)
        assert time.monotonic() - started < 5  # not retried to the 30 s deadline
    finally:
        if not client.nc.is_closed:
            await client.nc.close()


async def test_a_request_in_flight_when_its_client_closes_on_a_frozen_server_is_unavailable(
    nats_server: NatsServer,
) -> None:
    client = await LogClient.connect(nats_server.url)
    client.timeout, client.deadline = 1.0, 30.0
    try:
        await asyncio.to_thread(nats_server.pause)
        task = asyncio.create_task(client.append("s", [{"agent": "a", "data": {"x": 1}}]))
        await asyncio.sleep(0.3)
        assert not task.done()
        closing = asyncio.create_task(client.close())  # its drain waits on the frozen server
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(task, 20)
        assert time.monotonic() - started < 5  # at its first retry, not at the deadline
        await asyncio.to_thread(nats_server.resume)
        await asyncio.wait_for(closing, 30)
    finally:
        await asyncio.to_thread(nats_server.resume)
        if not client.nc.is_closed:
            await client.nc.close()


async def test_a_follower_ends_when_its_client_is_closed(log_url: str) -> None:
    client = await LogClient.connect(log_url)
    try:
        await client.append("s", [{"agent": "a", "data": {"x": 1}}])
        seen: list[int] = []
        first = asyncio.Event()

        async def consume() -> None:
            async for env in client.follow("s", idle_check=1.0):
                seen.append(env.item_order)
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        await asyncio.sleep(0.5)  # waiting on its consumer
        await client.close()
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            task.cancel()
        assert done, "the follower of a closed client never ended"
        assert isinstance(task.exception(), UnavailableError)
        assert seen == [1]
    finally:
        await client.close()
