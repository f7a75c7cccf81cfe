"""Two workers that disagree about a session's active agent bounced its notice; the
second forward to the same agent has the same ``Nats-Msg-Id`` (``sid:order:target``)
and was dropped by the work stream: the user message was never answered.  A worker
now looks a forwarded notice's agent up afresh (bucket and log), not by what it learnt.

The disagreement: a Triage worker learnt from a session's first notice that its ``to``
made L1Billing active; the bucket's value is lost and L1Billing restarts, so
L1Billing now routes the session by the spec's entry agent (Triage).
"""

from __future__ import annotations

import asyncio

from shared.routing import open_routing_bucket
from tests.support.fake_openai import FakeOpenAI, text
from tests.support.workerstack import SEED_SPEC, WorkerStack, agent_of, is_user, terminal_items


async def test_a_notice_bounced_between_disagreeing_workers_is_still_answered(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(lambda r: text(f"{agent_of(r)} answers"))
    await stack.start_workers(stack.worker("Triage", SEED_SPEC))
    kv = await open_routing_bucket(stack.nc, stack.settings.subjects)

    # L1Billing has no consumer yet: the first notice goes to the entry agent, whose
    # worker forwards it (and learns "before item 1, L1Billing is active").
    await stack.send("bounce", "my invoice", to="L1Billing")
    await asyncio.sleep(1.0)
    billing = await stack.start_workers(stack.worker("L1Billing", SEED_SPEC))
    await stack.answered("bounce", users=1)

    await kv.delete("bounce")
    billing[0].terminate()
    await stack.start_workers(stack.worker("L1Billing", SEED_SPEC))
    await stack.send("bounce", "and again")
    log = await stack.answered("bounce", users=2, timeout=15.0)
    users = [e for e in log if is_user(e)]
    assert len([terminal_items(log, u)[0] for u in users]) == 2
