"""``AckedPublisher`` over a real nats-server: each message gets what
``js.publish`` would have given it -- stored, a duplicate dropped, refused, or
no stream at all -- and the messages are stored in the order given."""

from __future__ import annotations

import nats
import nats.errors
import nats.js.errors
from nats.js.api import StreamConfig

from services.log.pubacks import AckedPublisher
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
        await silent.flush()
        outcomes = await pub.publish([("mute.x", b"1", {})], wait=0.2)
        assert len(outcomes) == 1 and isinstance(outcomes[0], TimeoutError)
    finally:
        await pub.close()
        await nc.close()
        await silent.close()
