"""A session's first message meets a routing value already in the bucket that this log
service did not write (a ``to`` left by a log service that died before committing its
message, or a checkpoint of the session id's life before the log was restored): every
message of the session is answered as the first one was, by the entry agent.

Real nats-server, the real log service (in-process, SQLite) and ``convlog worker`` processes.
"""

from __future__ import annotations

import pytest

from shared.routing import (
    RoutingCheckpoint,
    encode_checkpoint,
    entry_checkpoint,
    open_routing_bucket,
)
from tests.support.fake_openai import FakeOpenAI, text
from tests.support.workerstack import SEED_SPEC, WorkerStack, agent_of, is_user, terminal_items


@pytest.mark.parametrize("left", [
    entry_checkpoint("L1Billing"),  # a `to` whose message was never committed
    RoutingCheckpoint(active="L1Billing", order=7, entry="L1Billing"),  # ahead of a restored log
], ids=["to-never-committed", "ahead-of-restored-log"])
async def test_a_routing_value_left_in_the_bucket_routes_every_message_of_the_session_alike(
    stack: WorkerStack, fake_openai: FakeOpenAI, left: RoutingCheckpoint
) -> None:
    fake_openai.responder(lambda r: text(f"{agent_of(r)} answers"))
    await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in ("Triage", "L1Billing")))
    kv = await open_routing_bucket(stack.nc, stack.settings.subjects)
    await kv.create("stale-1", encode_checkpoint(left))

    await stack.send("stale-1", "hello")  # no `to`: the spec's entry agent answers it
    await stack.answered("stale-1", users=1)
    await stack.send("stale-1", "again")
    log = await stack.answered("stale-1", users=2)

    users = [e for e in log if is_user(e)]
    # No handoff in between: the agent that answered the first answers the second too
    # (it went to L1Billing, which read the stale value from the bucket).
    assert [terminal_items(log, u)[0].agent for u in users] == ["Triage", "Triage"]
