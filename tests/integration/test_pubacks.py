"""``AckedPublisher`` over a real nats-server: each message gets what
``js.publish`` would have given it -- stored, a duplicate dropped, refused, or
no stream at all -- and the messages are stored in the order given."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import nats.js.errors
from nats.js.api import StreamConfig

from services.log.pubacks import AckedPublisher
from shared.nats_seam import bind, flush
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer


async def test_outcomes_per_message_in_order(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    pub = AckedPublisher(nc)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="ACKS", subjects=["acks.>"], duplicate_window=60))
        outcomes = await pub.publish([
            ("acks.a", b"1", {"Nats-Msg-Id": "m1"}),
            ("acks.b", b"2", {"Nats-Msg-Id": "m2"}),
            ("acks.a", b"1 again", {"Nats-Msg-Id": "m1"}),  # a duplicate: dropped, not an error
            ("elsewhere.x", b"3", {"Nats-Msg-Id": "m3"}),  # no stream captures it
            ("acks.c", b"4", {"Nats-Msg-Id": "m4", "Nats-Expected-Last-Msg-Id": "wrong"}),  # refused
        ])
        assert outcomes[:3] == [None, None, None]
        assert isinstance(outcomes[3], nats.errors.NoRespondersError)
        assert isinstance(outcomes[4], nats.js.errors.APIError)
        info = await js.stream_info("ACKS")
        assert info.state.messages == 2
        first = await js.get_msg("ACKS", 1)
        second = await js.get_msg("ACKS", 2)
        assert (first.data, second.data) == (b"1", b"2")
        # The subscription is reused; a second batch works the same.
        assert await pub.publish([("acks.d", b"5", {"Nats-Msg-Id": "m5"})]) == [None]
    finally:
        await pub.close()
        await nc.close()


async def test_no_ack_in_time_is_a_timeout(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    pub = AckedPublisher(nc)
    silent = await nats.connect(nats_server.url)
    try:
        async def ignore(msg: object) -> None:
            return None

        await silent.subscribe("mute.>", cb=ignore)  # a responder that never answers
        await flush(silent)
        outcomes = await pub.publish([("mute.x", b"1", {})], wait=0.2)
        assert len(outcomes) == 1 and isinstance(outcomes[0], TimeoutError)
    finally:
        await pub.close()
        await nc.close()
        await silent.close()


async def _stream(nc: nats.NATS, name: str, *, atomic: bool) -> None:
    await nc.jetstream().add_stream(StreamConfig(
        name=name, subjects=[f"{name.lower()}.>"], duplicate_window=60, allow_atomic=atomic))


async def _stored(nc: nats.NATS, stream: str) -> list[tuple[str, str]]:
    js = nc.jetstream()
    n = (await js.stream_info(stream)).state.messages
    msgs = [await js.get_msg(stream, seq) for seq in range(1, n + 1)]
    return [(m.data.decode(), (m.headers or {}).get("Nats-Msg-Id", "")) for m in msgs]


async def test_overlapping_calls_go_in_one_atomic_batch_each_message_once(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    pub = AckedPublisher(nc, atomic_at=3)
    try:
        await _stream(nc, "TOG", atomic=True)
        # One call with enough messages starts a batch; the calls made meanwhile
        # (with one message each, which alone would be published plainly) join it.
        calls = [[(f"tog.{c}", f"{c}.{i}".encode(), {"Nats-Msg-Id": f"{c}.{i}"}) for i in range(3 if c == 0 else 1)]
                 for c in range(5)]
        outcomes = await asyncio.gather(*(pub.publish_together(msgs) for msgs in calls))
        assert outcomes == [[None] * len(msgs) for msgs in calls]
        assert (pub.batches, pub.fallbacks) == (1, 0)
        expected = [(body.decode(), h["Nats-Msg-Id"]) for msgs in calls for _, body, h in msgs]
        assert await _stored(nc, "TOG") == expected  # in call order, each once
        # Alone and small: a plain publish (no batch), the same outcome.
        assert await pub.publish_together([("tog.x", b"x", {"Nats-Msg-Id": "x"})]) == [None]
        assert pub.batches == 1 and len(await _stored(nc, "TOG")) == len(expected) + 1
    finally:
        await pub.close()
        await nc.close()


async def test_a_batch_the_stream_refuses_whole_is_published_message_by_message(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    pub = AckedPublisher(nc, atomic_at=2)
    try:
        await _stream(nc, "DUP", atomic=True)
        # m2 is stored already (a retry, the reconciler): the atomic batch holding it is
        # refused whole; sent again one by one, m2 is dropped as a duplicate, the rest stored.
        assert await pub.publish([("dup.a", b"first m2", {"Nats-Msg-Id": "m2"})]) == [None]
        msgs = [(f"dup.{i}", f"m{i}".encode(), {"Nats-Msg-Id": f"m{i}"}) for i in range(1, 5)]
        assert await pub.publish_together(msgs) == [None] * 4
        assert (pub.batches, pub.fallbacks) == (0, 1)
        assert await _stored(nc, "DUP") == [("first m2", "m2"), ("m1", "m1"), ("m3", "m3"), ("m4", "m4")]

        # A stream without allow_atomic: the same, and the publisher stops trying batches.
        await _stream(nc, "PLAIN", atomic=False)
        msgs = [(f"plain.{i}", f"p{i}".encode(), {"Nats-Msg-Id": f"p{i}"}) for i in range(4)]
        assert await pub.publish_together(msgs) == [None] * 4
        assert pub.atomic is False and pub.fallbacks == 2
        assert [m for m, _ in await _stored(nc, "PLAIN")] == ["p0", "p1", "p2", "p3"]

        # No stream at all: every message gets the error a plain publish gets.
        pub.atomic = True
        lost = await pub.publish_together([(f"nowhere.{i}", b"?", {}) for i in range(3)])
        assert len(lost) == 3 and all(isinstance(e, nats.errors.NoRespondersError) for e in lost)
    finally:
        await pub.close()
        await nc.close()


async def test_closing_ends_a_batch_waiting_for_its_ack(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    silent = await nats.connect(nats_server.url)
    pub = AckedPublisher(nc, atomic_at=2)
    try:
        async def ignore(msg: object) -> None:
            return None

        await silent.subscribe("mute.>", cb=ignore)  # takes the batch, never answers
        await flush(silent)
        waiting = asyncio.create_task(pub.publish_together([("mute.a", b"1", {}), ("mute.b", b"2", {})], wait=60))
        await asyncio.sleep(0.2)
        assert not waiting.done(), waiting.result()  # the outcomes, should it fail
        await asyncio.wait_for(pub.close(), 5)  # shutdown does not wait out the minute
        outcomes = await asyncio.wait_for(waiting, 5)
        assert len(outcomes) == 2 and all(isinstance(e, nats.errors.Error) for e in outcomes)
    finally:
        await pub.close()
        await nc.close()
        await silent.close()


async def test_publish_now_writes_before_returning_and_never_ahead_of_queued_messages(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    bind(nc)  # the fast seam (the probe passes on the tested nats-py)
    pub = AckedPublisher(nc)
    watcher = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="NOW", subjects=["now.>"], duplicate_window=60))
        assert pub.publish_now([("now.a", b"0", {})]) is None  # no ack inbox yet: use publish
        await pub.start()
        seen: list[bytes] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            seen.append(msg.data)

        await watcher.subscribe("now.>", cb=on_msg)
        await flush(watcher)

        await nc.publish("now.queued", b"queued")  # queued for the flusher task, not yet written
        assert pub.publish_now([("now.a", b"1", {"Nats-Msg-Id": "n1"})]) is None  # would overtake it
        await nc.flush()

        acked = pub.publish_now([("now.a", b"2", {"Nats-Msg-Id": "n2"}), ("now.b", b"3", {})])
        assert acked is not None
        await nc.publish("now.later", b"later")  # queued after: the flusher writes it after
        assert await acked == [None, None]
        await nc.flush()

        def arrived() -> None:  # one connection: the watcher gets them in the order written
            assert seen == [b"queued", b"2", b"3", b"later"]

        await assert_eventually(arrived, timeout=5)
        again = pub.publish_now([("now.a", b"2 again", {"Nats-Msg-Id": "n2"}), ("elsewhere.x", b"4", {})])
        assert again is not None
        outcomes = await again  # what publish gives: a duplicate is no error, no stream is
        assert outcomes[0] is None and isinstance(outcomes[1], nats.errors.NoRespondersError)
        assert (await js.stream_info("NOW")).state.messages == 4
        too_big = pub.publish_now([("now.a", b"x" * (nc.max_payload + 1), {})])
        assert too_big is None  # refused before anything is written: publish says why
    finally:
        await pub.close()
        await watcher.close()
        await nc.close()


async def test_publish_now_on_the_public_seam_sends_nothing(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    bind(nc, "public")
    pub = AckedPublisher(nc)
    try:
        await pub.start()
        assert pub.publish_now([("now.a", b"1", {})]) is None
        assert await pub.publish([("nowhere.a", b"1", {})]) != [None]  # publish still works there
    finally:
        await pub.close()
        await nc.close()


async def test_a_message_over_max_payload_only_with_its_headers_is_refused_alone_not_sent(
    nats_server: NatsServer,
) -> None:
    """nats-py's ``publish`` compares the payload alone with the max payload; the
    server counts the headers too and closes the connection over one it sends.
    A notice so sent took the log service's connection down for good."""
    nc = await nats.connect(nats_server.url)
    pub = AckedPublisher(nc, atomic_at=2)
    try:
        await _stream(nc, "BIG", atomic=True)
        fits = b"x" * (nc.max_payload - 10)  # the payload alone fits, not with its headers
        for send in (pub.publish, pub.publish_together):
            outcomes = await send([
                ("big.a", b"1", {"Nats-Msg-Id": f"{send.__name__}-1"}),
                ("big.b", fits, {"Nats-Msg-Id": f"{send.__name__}-2"}),
                ("big.c", b"3", {"Nats-Msg-Id": f"{send.__name__}-3"}),
            ])
            assert outcomes[0] is None and outcomes[2] is None, outcomes
            assert isinstance(outcomes[1], nats.errors.MaxPayloadError), outcomes
            assert nc.is_connected
        assert pub.publish_now([("big.b", fits, {"Nats-Msg-Id": "now-2"})]) is None  # publish says which
        # Every message of a call refused so: each says so (it raised ValueError, an empty
        # asyncio.wait, logged at ERROR by the notices).
        only = await pub.publish([("big.e", fits, {"Nats-Msg-Id": "only-1"})])
        assert len(only) == 1 and isinstance(only[0], nats.errors.MaxPayloadError), only
        assert await pub.publish([("big.d", b"4", {"Nats-Msg-Id": "4"})]) == [None]
        assert nc.is_connected and not nc.is_closed
        assert [body for body, _ in await _stored(nc, "BIG")] == ["1", "3", "1", "3", "4"]
    finally:
        await pub.close()
        await nc.close()
