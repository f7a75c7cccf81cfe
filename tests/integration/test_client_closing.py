"""A client whose connection drains or closes, each a bug once (found in a review):

* while a connection drains its publishes, several appends framed as one write
  are refused on the fast seam as ``publish`` refuses them on the public one
  (the fast seam wrote them, and the caller waited out its deadline for replies
  that could not come);
* a request on a closed connection, or in flight when its client is closed,
  fails at once (``unavailable``) rather than being retried until the deadline:
  a closed connection never reopens; so does a signed append (it raised
  nats-py's ``ConnectionClosedError`` where an unsigned one says ``unavailable``);
* a follower cancelled while its consumer is being made ends only once that
  create has ended and what it made is unsubscribed, so a close right after it
  does not wait out nats-py's 30 s drain (CI: ``convlog demo`` took 30 s to
  stop on a SIGTERM that came as its first conversation started).
"""

from __future__ import annotations

import asyncio
import time

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.client import LogClient
from shared.errors import UnavailableError
from shared.nats_seam import bind, flush
from shared.signing import Signer
from shared.wire import publish_many
from tests.support.natsd import NatsServer


@pytest.mark.parametrize("mode", ["auto", "public"], ids=["fast-seam", "public-seam"])
async def test_publish_many_while_the_connection_drains_its_publishes_is_refused_on_both_seams(
    nats_server: NatsServer, mode: str
) -> None:
    """shared/wire.py says: "whenever the connection is not plainly connected
    (reconnecting, draining, closed), it publishes message by message through
    ``publish``, so the library's own buffering and errors apply there".  nats-py's
    ``is_connected`` is True while draining, so the fast seam writes raw frames
    where ``publish`` (the public seam) raises ConnectionDrainingError."""
    nc = await nats.connect(nats_server.url)
    bind(nc, mode)
    sub = await nc.subscribe("review.slow")
    drain = asyncio.create_task(nc.drain())
    try:
        for _ in range(100_000):
            if nc.is_draining_pubs:
                break
            await asyncio.sleep(0)
        assert nc.is_draining_pubs
        refused = await publish_many(nc, [("review.x", "", b"1", None)])
        assert [type(e) for _, e in refused] == [nats.errors.ConnectionDrainingError]
    finally:
        await drain
        del sub


async def test_a_request_on_a_closed_connection_fails_at_once_not_at_the_deadline(
    nats_server: NatsServer,
) -> None:
    """A closed nats-py connection never reopens (convlog reconnects forever, so
    only close()/drain() closes it), yet ConnectionClosedError is in RETRYABLE:
    a request on a closed client is retried until the deadline (30 s by default)."""
    nc = await nats.connect(nats_server.url)
    client = LogClient(nc, prefix="t", timeout=1, deadline=30)
    await nc.close()
    started = time.monotonic()
    with pytest.raises(UnavailableError):
        await client.last_order("s")
    assert time.monotonic() - started < 10  # not retried to the 30 s deadline


async def test_a_signed_append_on_a_closed_client_is_unavailable_as_an_unsigned_one(
    nats_server: NatsServer,
) -> None:
    client = await LogClient.connect(nats_server.url)
    client.signer, _ = Signer.generate()
    await client.close()
    item = {"agent": "a", "data": {"x": 1}}
    with pytest.raises(UnavailableError):
        await client.append("s", [item])
    client.signer = None
    with pytest.raises(UnavailableError):
        await client.append("s", [item])


async def test_an_in_flight_append_on_a_client_closed_meanwhile_ends_soon(nats_server: NatsServer) -> None:
    """The same from the side of a caller whose append is in flight when its
    LogClient is closed (a process shutting down): it waits out the whole deadline."""
    other = await nats.connect(nats_server.url)
    seen = asyncio.Event()

    async def silent(msg: Msg) -> None:
        seen.set()

    await other.subscribe("t.append.s", cb=silent)
    await flush(other)
    client = await LogClient.connect(nats_server.url)
    client.subjects = type(client.subjects)("t")
    client.timeout, client.deadline = 1.0, 30.0
    try:
        task = asyncio.create_task(client.append("s", [{"agent": "a", "data": {"x": 1}}]))
        await asyncio.wait_for(seen.wait(), 5)
        await client.close()
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await task
        assert time.monotonic() - started < 10  # not retried to the 30 s deadline
    finally:
        await other.close()


async def test_a_follower_cancelled_while_its_consumer_is_made_leaves_no_subscription(log_url: str) -> None:
    client = await LogClient.connect(log_url)
    try:
        await client.append("s", [{"agent": "user", "data": {"role": "user", "content": "hi"}}])
        entered, go, made = asyncio.Event(), asyncio.Event(), asyncio.Event()
        unsubscribed: list[object] = []
        real_jetstream = client.nc.jetstream

        def jetstream(**options: object) -> JetStreamContext:
            # The consumer create is held until the follower has been cancelled.
            js = real_jetstream(**options)
            real_subscribe = js.subscribe

            async def subscribe(*args: object, **kwargs: object) -> object:
                entered.set()
                await go.wait()
                sub = await real_subscribe(*args, **kwargs)  # type: ignore[arg-type]
                real_unsubscribe = sub.unsubscribe

                async def unsubscribe(limit: int = 0) -> None:
                    unsubscribed.append(sub)
                    await real_unsubscribe(limit)

                sub.unsubscribe = unsubscribe  # type: ignore[method-assign]
                made.set()
                return sub

            js.subscribe = subscribe  # type: ignore[method-assign]
            return js

        client.nc.jetstream = jetstream  # type: ignore[method-assign]

        async def consume() -> None:
            async for _ in client.follow("s"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.wait_for(entered.wait(), 10)
        task.cancel()
        go.set()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done and task.cancelled()
        # It ended after the create, and took back the subscription the create made
        # (before, it ended at once and the subscription came later, unread).
        assert made.is_set() and len(unsubscribed) == 1
        started = time.monotonic()
        await client.close()
        assert time.monotonic() - started < 10  # not nats-py's 30 s drain timeout
    finally:
        await client.close()
