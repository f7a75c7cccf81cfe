"""The log service's routing checkpoints: written a moment after the handoff, one per session.

A real nats-server and its KV bucket; the writer is fed what the store's
commit listener would hand it.
"""

from __future__ import annotations

import asyncio
import json

import nats

from services.log.routing_writer import RoutingWriter
from services.log.store.base import Committed
from shared.routing import decode_checkpoint, open_routing_bucket
from shared.subjects import Subjects
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer

_position = 0


def _handoff(sid: str, order: int, target: str) -> Committed:
    global _position
    _position += 1
    envelope = {"session_id": sid, "item_order": order, "item_id": f"t.Triage.1.out{order}", "agent": "Triage",
                "kind": "item", "data": {"type": "function_call_output", "call_id": f"c{order}",
                                         "output": json.dumps({"assistant": target})}}
    return Committed(position=_position, session_id=sid, item_order=order, envelope=json.dumps(envelope).encode())


async def test_a_checkpoint_is_written_after_the_delay_and_handoffs_meanwhile_are_written_as_one(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        kv = await open_routing_bucket(nc, Subjects())
        writer = RoutingWriter(kv, delay=0.3)
        writer.on_commit([_handoff("s-1", 3, "L1Billing")])
        await asyncio.sleep(0.05)
        writer.on_commit([_handoff("s-1", 6, "L2Support"), _handoff("s-2", 2, "L1Billing")])
        assert writer.writes == 0  # nothing yet: the writes wait out the delay

        async def written() -> None:
            assert writer.writes == 2

        await assert_eventually(written, timeout=5)
        s1 = await kv.get("s-1")
        assert s1.revision is not None
        value = decode_checkpoint(s1.value or b"")
        assert (value.active, value.order) == ("L2Support", 6)  # the newest handoff of s-1 ...
        history = await kv.history("s-1")
        assert len(history) == 1  # ... and only it: the older one, committed meanwhile, was never written
        assert decode_checkpoint((await kv.get("s-2")).value or b"").active == "L1Billing"

        # A later handoff is a new round: written after the delay again, forward only.
        writer.on_commit([_handoff("s-1", 9, "Triage")])
        await assert_eventually(lambda: _is(writer.writes, 3), timeout=5)
        assert decode_checkpoint((await kv.get("s-1")).value or b"").order == 9
        await writer.stop()
    finally:
        await nc.close()


def _is(got: int, want: int) -> None:
    assert got == want
