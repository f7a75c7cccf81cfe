"""Where a JetStream log-service instance addresses its turn notices, and what it reads
to do so: its memory of the session's handoffs while it committed every item since
(no read), else the routing checkpoint checked against the log.

Real nats-server, two real :class:`JetStreamStore` instances on one JetStream (the
notifier follows the commits of the first), the real :class:`Notifier`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig

from services.log.notices import Notifier
from services.log.store.jetstream import JetStreamStore
from shared.messages import AppendItem, AppendRequest
from shared.routing import open_routing_bucket
from shared.subjects import Subjects
from shared.work import decode_notice, ensure_work_stream, work_stream_name
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer

SUBJECTS = Subjects("convlog")
STREAM = work_stream_name(SUBJECTS)
AGENTS = ("Billing", "Support")


def _user(n: int) -> AppendRequest:
    return AppendRequest(items=[AppendItem(agent="user", data={"role": "user", "content": f"q{n}"}, item_id=f"u{n}")])


def _handoff(to: str, n: int) -> AppendRequest:
    return AppendRequest(items=[AppendItem(agent="Triage", item_id=f"h{n}", data={
        "type": "function_call_output", "call_id": f"c{n}", "output": json.dumps({"assistant": to})})])


def _counting(store: JetStreamStore) -> list[int]:
    """The ``after`` of every read of ``store`` from now on."""
    reads: list[int] = []
    read: Callable[..., Awaitable[Any]] = store.read

    async def counted(session_id: str, **kwargs: Any) -> Any:
        reads.append(kwargs["after"])
        return await read(session_id, **kwargs)

    store.read = counted  # type: ignore[method-assign]
    return reads


async def test_an_instance_addresses_from_memory_unless_another_committed_items_since(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    a = JetStreamStore({"servers": [nats_server.url]}, subjects=SUBJECTS)
    b = JetStreamStore({"servers": [nats_server.url]}, subjects=SUBJECTS)
    notifier: Notifier | None = None
    try:
        await ensure_work_stream(js, SUBJECTS)
        for agent in AGENTS:
            await js.add_consumer(STREAM, ConsumerConfig(
                durable_name=f"convlog-agent-{agent}", filter_subject=f"convlog.work.agent.{agent}",
                ack_policy=AckPolicy.EXPLICIT))
        await a.open()
        await b.open()
        kv = await open_routing_bucket(nc, SUBJECTS)
        notifier = Notifier(nc, SUBJECTS, kv, store=a)
        a.add_commit_listener(notifier.on_commit)
        reads = _counting(a)

        async def addressed(n: int) -> list[tuple[int, str]]:
            """The (order, agent) of the first ``n`` notices stored, by order (two commits'
            notices may be stored in either order)."""
            out: list[tuple[int, str]] = []

            async def stored() -> None:
                out.clear()
                for seq in range(1, n + 1):
                    m = await js.get_msg(STREAM, seq)
                    out.append((decode_notice(m.data).item_order, m.subject.rsplit(".", 1)[-1]))

            await assert_eventually(stored, timeout=5, retry_on=(AssertionError, nats.js.errors.NotFoundError))
            return sorted(out)

        # One instance commits everything: every notice from its memory, no read.
        await a.append("s", _user(1))
        await a.append("s", _handoff("Billing", 2))
        for n in range(3, 6):
            await a.append("s", _user(n))
        assert await addressed(4) == [(1, "entry"), (3, "Billing"), (4, "Billing"), (5, "Billing")]
        assert reads == []

        # The other instance hands the session to Support (and adds a message of its
        # own): this one addressed its next user messages to Billing, its memory, for
        # good.  The first is addressed by the log (one read), the ones after by memory.
        await b.append("s", _handoff("Support", 6))
        await b.append("s", AppendRequest(items=[AppendItem(agent="Support", item_id="r7",
                                                            data={"role": "assistant", "content": "hi"})]))
        for n in range(8, 11):
            await a.append("s", _user(n))
            await addressed(n - 3)  # one at a time: the first one's read is done before the next
        assert (await addressed(7))[4:] == [(8, "Support"), (9, "Support"), (10, "Support")]
        assert reads == [0]  # the log followed from the session's routing checkpoint (none here)
    finally:
        if notifier is not None:
            await notifier.stop()
        await a.close()
        await b.close()
        await nc.close()
