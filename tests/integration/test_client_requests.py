"""``LogClient``'s request multiplexer over a real nats-server.

The far side is a plain NATS subscriber standing in for the log service (it
answers, stays silent, or answers late), so each test controls exactly when a
reply arrives: timeouts, "no responders", cancellation of a request in flight,
a reply that arrives after a server restart, and a client sharing a connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import tracing
from shared.client import LogClient
from shared.codec import encode
from shared.errors import BadRequestError, TooLargeError, UnavailableError
from shared.messages import AppendItem, AppendRequest
from shared.nats_seam import FAST, bind, flush
from shared.signing import Signer, sign_batch
from tests.support.natsd import NatsServer

PREFIX = "t"
READ_REPLY = b'{"session_id":"s","items":[],"last_order":7,"more":false}'
#: the client's connection on either nats-py seam (shared.nats_seam)
both_seams = pytest.mark.parametrize("conns", ["auto", "public"], ids=["fast-seam", "public-seam"], indirect=True)


def append_reply(sid: str, item_ids: list[str]) -> bytes:
    items = [{"item_order": i + 1, "item_id": iid, "hash": "h"} for i, iid in enumerate(item_ids)]
    return msgspec.json.encode(
        {"session_id": sid, "first_order": 1, "last_order": len(items), "items": items}
    )


class Responder:
    """A subscriber on ``subject`` that records requests and answers while ``answer`` is set."""

    def __init__(self, nc: Client, subject: str, *, answer: bool = True) -> None:
        self.nc = nc
        self.subject = subject
        self.answer = answer
        self.requests: list[Msg] = []
        self.arrived = asyncio.Event()

    async def start(self) -> Responder:
        await self.nc.subscribe(self.subject, cb=self._cb)
        await flush(self.nc)
        return self

    async def _cb(self, msg: Msg) -> None:
        self.requests.append(msg)
        self.arrived.set()
        if self.answer:
            await self.nc.publish(msg.reply, self.body(msg))

    def body(self, msg: Msg) -> bytes:
        if ".append." in msg.subject:
            req = msgspec.json.decode(msg.data)
            return append_reply(msg.subject.rsplit(".", 1)[1], [it["item_id"] for it in req["items"]])
        return READ_REPLY


@pytest.fixture
async def conns(nats_server: NatsServer, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Client, Client]]:
    """Two connections (client side, responder side) that reconnect fast; the
    client side on the nats-py seam given by indirect parametrization."""
    opts: dict[str, Any] = {"reconnect_time_wait": 0.1, "max_reconnect_attempts": -1}
    a = await nats.connect(nats_server.url, name="t-client", **opts)
    bind(a, getattr(request, "param", "auto"))
    b = await nats.connect(nats_server.url, name="t-responder", **opts)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def read_in_flight(
    conns: tuple[Client, Client], sid: str, *, listen: str | None = None
) -> tuple[LogClient, Responder, asyncio.Task[int]]:
    """A read of ``sid`` that reached a silent responder (on the read subject
    of ``listen``, default ``sid``) and waits for its reply."""
    nc, other = conns
    silent = await Responder(other, f"{PREFIX}.read.{listen or sid}", answer=False).start()
    client = LogClient(nc, prefix=PREFIX, timeout=10, deadline=10)
    task = asyncio.create_task(client.last_order(sid))
    await asyncio.wait_for(silent.arrived.wait(), 5)
    assert len(client._pending) == 1
    return client, silent, task


def user(content: str, **extra: Any) -> dict[str, Any]:
    return {"agent": "user", "data": {"role": "user", "content": content}, **extra}


@both_seams
async def test_a_silent_responder_times_out_into_unavailable_retrying_the_same_ids(
    conns: tuple[Client, Client],
) -> None:
    nc, other = conns
    silent = await Responder(other, f"{PREFIX}.append.s", answer=False).start()
    client = LogClient(nc, prefix=PREFIX, timeout=0.2, deadline=0.8)
    started = time.monotonic()
    with pytest.raises(UnavailableError) as exc:
        await client.append("s", [user("x")])
    elapsed = time.monotonic() - started
    assert "TimeoutError" in exc.value.message
    # Every attempt waited its full timeout; the loop gave up at the deadline.
    attempts = len(silent.requests)
    assert attempts >= 3
    assert attempts * 0.2 <= elapsed < 2.0, (attempts, elapsed)
    # Retries resend the very same body: the item id was minted once.
    assert len({m.data for m in silent.requests}) == 1
    assert client._pending == {}


async def test_a_short_request_times_out_while_a_longer_one_is_in_flight(
    conns: tuple[Client, Client],
) -> None:
    # The responder hears every read and answers none: "quick" must time out.
    client, silent, slow = await read_in_flight(conns, "slow", listen="*")
    client.timeout, client.deadline = 0.1, 0.3
    started = time.monotonic()
    with pytest.raises(UnavailableError) as exc:
        await client.last_order("quick")
    assert time.monotonic() - started < 2.0
    assert "TimeoutError" in exc.value.message
    assert any(m.subject.endswith(".quick") for m in silent.requests)
    assert not slow.done()
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert client._pending == {}


async def test_no_responders_is_retried_until_a_responder_appears(conns: tuple[Client, Client]) -> None:
    nc, other = conns
    client = LogClient(nc, prefix=PREFIX, timeout=5, deadline=0.5)
    started = time.monotonic()
    with pytest.raises(UnavailableError) as exc:
        await client.append("s", [user("nobody")])
    assert "NoRespondersError" in exc.value.message and "is the log service running?" in exc.value.message
    assert time.monotonic() - started < 2.0  # no-responders answers at once; no 5 s timeout

    client.deadline = 10
    pending = asyncio.create_task(client.append("s", [user("later")]))
    await asyncio.sleep(0.3)
    assert not pending.done()
    responder = await Responder(other, f"{PREFIX}.append.s").start()
    reply = await asyncio.wait_for(pending, 5)
    assert [m.data for m in responder.requests][:1] and reply.last_order == 1
    assert client._pending == {}


@both_seams
async def test_cancelling_a_request_in_flight_removes_its_token_and_ignores_the_late_reply(
    conns: tuple[Client, Client],
) -> None:
    client, responder, task = await read_in_flight(conns, "s")
    other = conns[1]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client._pending == {}

    # The reply to the cancelled request arrives after all: dropped quietly.
    late = responder.requests[0]
    await other.publish(late.reply, READ_REPLY)
    await other.flush()
    responder.answer = True
    assert await client.last_order("s") == 7
    assert client._pending == {}


@both_seams
async def test_concurrent_first_requests_share_one_reply_subscription(
    conns: tuple[Client, Client], request: pytest.FixtureRequest
) -> None:
    # On the fast seam replies are resolved as nats-py parses them; on the
    # public one the subscription's callback resolves them alike.
    inline = request.node.callspec.params["conns"] == "auto"
    nc, other = conns
    responder = await Responder(other, f"{PREFIX}.read.s").start()
    client = LogClient(nc, prefix=PREFIX, timeout=5, deadline=5)
    assert await asyncio.gather(*(client.last_order("s") for _ in range(50))) == [7] * 50
    assert FAST.delivers_inline(client._reply_sub) is inline
    inboxes = {m.reply.rsplit(".", 1)[0] for m in responder.requests}
    tokens = {m.reply.rsplit(".", 1)[1] for m in responder.requests}
    assert len(inboxes) == 1 and len(tokens) == 50
    assert client._pending == {}


@pytest.mark.parametrize("mode", ["auto", "public"], ids=["fast-seam", "public-seam"])
async def test_a_reply_arriving_after_a_reconnect_completes_the_same_attempt(
    nats_server: NatsServer, mode: str
) -> None:
    reconnected = {"client": asyncio.Event(), "responder": asyncio.Event()}

    async def connect(name: str) -> Client:
        async def on_reconnect() -> None:
            reconnected[name].set()

        return await nats.connect(
            nats_server.url, name=name, reconnect_time_wait=0.1, max_reconnect_attempts=-1,
            reconnected_cb=on_reconnect,
        )

    nc, other = await connect("client"), await connect("responder")
    bind(nc, mode)
    try:
        responder = await Responder(other, f"{PREFIX}.read.s", answer=False).start()
        client = LogClient(nc, prefix=PREFIX, timeout=20, deadline=30)
        task = asyncio.create_task(client.last_order("s"))
        await asyncio.wait_for(responder.arrived.wait(), 5)

        await asyncio.to_thread(nats_server.restart)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in reconnected.values())), 10)
        await flush(nc)  # the replayed reply subscription is in place on the server
        assert not task.done()

        # Answer the request that was sent before the restart.
        await other.publish(responder.requests[0].reply, READ_REPLY)
        assert await asyncio.wait_for(task, 5) == 7
        assert len(responder.requests) == 1  # the first attempt got it; no retry was needed

        # New requests after the reconnect work too.
        responder.answer = True
        assert await asyncio.wait_for(client.last_order("s"), 5) == 7
        assert client._pending == {}
    finally:
        await nc.close()
        await other.close()


async def test_close_on_a_shared_connection_drops_only_its_own_reply_subscription(
    conns: tuple[Client, Client],
) -> None:
    nc, other = conns
    await Responder(other, f"{PREFIX}.read.s").start()
    one = LogClient(nc, prefix=PREFIX, timeout=5, deadline=5)
    two = LogClient(nc, prefix=PREFIX, timeout=5, deadline=5)
    assert await one.last_order("s") == await two.last_order("s") == 7
    sub = one._reply_sub
    assert sub is not None
    await one.close()
    assert nc.is_connected
    with pytest.raises(nats.errors.BadSubscriptionError):
        await sub.unsubscribe()  # already unsubscribed by close()
    assert await two.last_order("s") == 7
    # As before, closing a client on someone else's connection does not break it.
    assert await one.last_order("s") == 7
    await one.close()
    await two.close()
    assert nc.is_connected


async def test_bad_items_are_refused_before_anything_is_sent(conns: tuple[Client, Client]) -> None:
    nc, other = conns
    responder = await Responder(other, f"{PREFIX}.append.s").start()
    client = LogClient(nc, prefix=PREFIX, timeout=5, deadline=5)
    bad_items: list[Any] = [
        {"data": {"a": 1}},  # no agent
        {"agent": "a", "dat": {}},  # unknown field
        {"agent": "a", "kind": "nope"},
        {"agent": "a", "item_id": "has space"},
        {"agent": "a", "data": []},
        {"agent": ""},
    ]
    for bad in bad_items:
        with pytest.raises(BadRequestError, match="invalid item"):
            await client.append("s", [user("fine"), bad])
    with pytest.raises(BadRequestError, match="at least one item"):
        await client.append("s", [])
    await other.flush()
    assert responder.requests == []


async def test_text_with_a_lone_surrogate_is_bad_request_not_a_unicode_error(conns: tuple[Client, Client]) -> None:
    """A lone surrogate (``json.loads`` makes one of a model's ``"\\ud83d"``)
    has no UTF-8: append and send raised msgspec's UnicodeEncodeError, not the
    BadRequestError they promise (a signed append was already bad_request)."""
    nc, other = conns
    responder = await Responder(other, f"{PREFIX}.*.s").start()
    client = LogClient(nc, prefix=PREFIX, timeout=5, deadline=5)
    with pytest.raises(BadRequestError, match="surrogate"):
        await client.append("s", [user("fine"), user("half an emoji \ud83d")])
    with pytest.raises(BadRequestError, match="surrogate"):
        await client.send("s", "half an emoji \ud83d")
    assert client._pending == {}
    await flush(other)
    assert responder.requests == []


async def test_append_mints_missing_ids_and_keeps_given_ones(conns: tuple[Client, Client]) -> None:
    nc, other = conns
    responder = await Responder(other, f"{PREFIX}.append.s").start()
    client = LogClient(nc, prefix=PREFIX, timeout=5, deadline=5)
    given = user("given", item_id="mine-1")
    plain = user("plain")
    proxy = MappingProxyType(user("proxy", item_id=None))
    items: list[Any] = [given, plain, proxy, AppendItem(agent="a"), AppendItem(agent="b", item_id="mine-2")]
    reply = await client.append("s", items)
    sent = msgspec.json.decode(responder.requests[0].data)["items"]
    ids = [it["item_id"] for it in sent]
    assert ids[0] == "mine-1" and ids[4] == "mine-2"
    assert all(len(i) == 32 and i[12] == "7" for i in ids[1:4]), ids
    assert len(set(ids)) == 5
    assert [it.item_id for it in reply.items] == ids
    assert [it["agent"] for it in sent] == ["user", "user", "user", "a", "b"]
    # The caller's dicts are left as they were.
    assert "item_id" not in plain and given["item_id"] == "mine-1"


@both_seams
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
async def test_a_request_over_max_payload_only_with_its_trace_headers_is_refused_not_sent(
    conns: tuple[Client, Client], signed: bool
) -> None:
    """The server counts a message's headers in its max payload; nats-py's
    ``publish`` (and ``shared.wire.frame``) compared the body alone.  With
    tracing on, an append a few bytes under the limit went out with its
    ``traceparent`` header, the server answered ``Maximum Payload Violation``
    and nats-py closed the connection for good: the caller got ``unavailable``
    and every later request on that connection failed too."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    nc, other = conns
    responder = await Responder(other, f"{PREFIX}.append.s").start()
    signer = Signer.generate()[0] if signed else None
    client = LogClient(nc, prefix=PREFIX, timeout=1, deadline=5, signer=signer)

    def body(pad: int) -> bytes:
        item = AppendItem(agent="a", item_id="i" * 32, data={"x": "y" * pad})
        items = sign_batch(signer, [("s", item)]) if signer is not None else [item]
        return encode(AppendRequest(items=items))

    pad = nc.max_payload - 10 - len(body(0))
    assert len(body(pad)) == nc.max_payload - 10  # the body alone fits
    provider = sdk.TracerProvider()
    previous = tracing.use_provider(provider)
    try:
        with tracing.span("caller"):
            assert tracing.headers() is not None
            started = time.monotonic()
            with pytest.raises(TooLargeError):
                await client.append("s", [{"agent": "a", "item_id": "i" * 32, "data": {"x": "y" * pad}}])
            assert time.monotonic() - started < 1.0
            assert not nc.is_closed
            reply = await client.append("s", [user("next")])
    finally:
        tracing.use_provider(previous)
        provider.shutdown()
    assert reply.last_order == 1
    assert [msgspec.json.decode(m.data)["items"][0]["data"] for m in responder.requests] == [user("next")["data"]]
    assert client._pending == {}
