"""Turn notices with two JetStream log-service instances on one session.

Each instance's notifier remembers the last handoff it committed in a session.
A handoff the other instance committed since is in the log, not in that
memory: the notices of the user messages the first one commits after it must
follow the log (each one misaddressed costs a delivery to the wrong agent and a
forward), yet a run of a session's items one instance committed alone costs no
read to address.

Real nats-server, two real ``convlog log`` processes on one JetStream.  NATS
hands each request to either instance; which one committed it is read from the
instances' own ``$SRV.STATS``, and the test goes on until the case it needs came.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from services.log.service import SERVICE_NAME
from shared.client import LogClient
from tests.support.eventually import assert_eventually
from tests.support.logsvc import LogServiceProc
from tests.support.natsd import NatsServer

pytestmark = pytest.mark.timeout(90)

WORK = "CONVLOG_WORK"
AGENTS = ("Triage", "Billing", "Support")


@pytest.fixture
async def two_instances(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[list[LogServiceProc]]:
    svcs = []
    for i in range(2):
        log_dir = tmp_path / f"svc{i}"
        log_dir.mkdir()
        svcs.append(LogServiceProc(nats_server.url, tmp_path / "unused.db", log_dir=log_dir,
                                   store="jetstream", name=f"log{i}"))
    try:
        for svc in svcs:  # one after the other: the two do not race to create the streams
            await asyncio.to_thread(svc.start, 30)
        yield svcs
    finally:
        for svc in svcs:
            await asyncio.to_thread(svc.stop)


class Instances:
    """Which instance served the last request (each one's request count, from ``$SRV.STATS``)."""

    def __init__(self, nc: Client, ids: list[str]) -> None:
        self.nc = nc
        self.ids = ids
        self.counts: dict[str, int] = {}

    @classmethod
    async def find(cls, nc: Client) -> Instances:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
        ids = [json.loads((await sub.next_msg(timeout=5)).data)["id"] for _ in range(2)]
        await sub.unsubscribe()
        found = cls(nc, ids)
        await found.served()
        return found

    async def served(self) -> str:
        """The instance whose request count grew (by one) since the last call."""
        grew = []
        for i in self.ids:
            stats = json.loads((await self.nc.request(f"$SRV.STATS.{SERVICE_NAME}.{i}", b"", timeout=5)).data)
            n = sum(e["num_requests"] for e in stats["endpoints"])
            if n != self.counts.get(i, 0):
                grew.append((i, n - self.counts.get(i, 0)))
            self.counts[i] = n
        if not grew:
            return ""
        assert len(grew) == 1 and grew[0][1] == 1, grew
        return grew[0][0]


def _handoff(to: str, n: int) -> dict[str, object]:
    return {"agent": "Triage", "item_id": f"handoff-{n}",
            "data": {"type": "function_call_output", "call_id": f"call-{n}", "output": json.dumps({"assistant": to})}}


async def test_a_handoff_committed_by_the_other_instance_readdresses_the_next_notices(
    nats_server: NatsServer, two_instances: list[LogServiceProc]
) -> None:
    # Instance X committed a handoff to one agent, then instance Y one to another.
    # X went on addressing every user message it committed in the session to the
    # first agent (its memory), for good, until it committed a handoff itself:
    # each such turn a delivery to the wrong agent and a forward.
    nc = await nats.connect(nats_server.url)
    client = await LogClient.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for agent in AGENTS:  # what a worker of each agent binds (services.worker.intake)
            await js.add_consumer(WORK, ConsumerConfig(
                durable_name=f"convlog-agent-{agent}", filter_subject=f"convlog.work.agent.{agent}",
                ack_policy=AckPolicy.EXPLICIT))

        async def addressed() -> dict[str, int]:
            return {agent: (await js.consumer_info(WORK, f"convlog-agent-{agent}")).num_pending
                    for agent in AGENTS}

        instances = await Instances.find(nc)
        sid = "two-instances"
        await client.send(sid, "hello", to="Triage")
        await instances.served()
        expected = {"Triage": 1, "Billing": 0, "Support": 0}
        memory: dict[str, str] = {}  # per instance: the last handoff it committed
        n = 0
        # Handoffs, alternating between two agents, until one instance committed one
        # to an agent and the other remembers its own to the other agent.
        while True:
            n += 1
            target = ("Billing", "Support")[n % 2]
            await client.append(sid, [_handoff(target, n)])
            memory[await instances.served()] = target
            if len(memory) == 2 and len(set(memory.values())) == 2:
                break
            assert n < 40, "NATS gave every handoff to the same instance"
        stale = next(i for i, agent in memory.items() if agent != target)
        # User messages until three were committed by the instance whose memory is stale.
        by_stale = 0
        for k in range(40):
            await client.send(sid, f"a question {k}")
            expected[target] += 1
            by_stale += await instances.served() == stale
            if by_stale == 3:
                break
        assert by_stale == 3, "NATS gave no user message to the instance that needs it"

        async def as_the_log_says() -> None:
            assert await addressed() == expected

        await assert_eventually(as_the_log_says, timeout=5)
    finally:
        await client.close()
        await nc.close()
