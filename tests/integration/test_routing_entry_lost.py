"""The entry agent a new session's ``to`` picked is kept only in the routing bucket:
the log does not hold it, so it cannot be rebuilt from the log.  Once the bucket's
value is gone (deleted, purged, a bucket recreated), the session's next messages go
to the spec's entry agent -- and so does a rebuilt checkpoint.

Real nats-server, the real log service (in-process, SQLite) and ``convlog worker`` processes.
"""

from __future__ import annotations

from services.worker.routing import Routing
from services.worker.spec import load_spec
from shared.routing import decode_checkpoint, open_routing_bucket
from tests.support.fake_openai import FakeOpenAI, text
from tests.support.workerstack import SEED_SPEC, WorkerStack, agent_of, is_user, terminal_items


async def test_a_to_lost_from_the_bucket_falls_back_to_the_spec_entry_agent(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(lambda r: text(f"{agent_of(r)} answers"))
    first = await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in ("Triage", "L1Billing")))
    kv = await open_routing_bucket(stack.nc, stack.settings.subjects)

    await stack.send("lost-to", "my invoice", to="L1Billing")
    await stack.answered("lost-to", users=1)
    assert decode_checkpoint((await kv.get("lost-to")).value).entry == "L1Billing"

    await kv.delete("lost-to")  # the value lost: nothing in the log says L1Billing
    for p in first:  # fresh workers: no routing fact learnt from the first turn
        p.terminate()
    await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in ("Triage", "L1Billing")))
    await stack.send("lost-to", "and again")
    log = await stack.answered("lost-to", users=2)

    users = [e for e in log if is_user(e)]
    assert [terminal_items(log, u)[0].agent for u in users] == ["L1Billing", "Triage"]
    assert all("to" not in u.data for u in users)  # the log holds no trace of the `to`

    spec = load_spec(SEED_SPEC)
    rebuilt = await Routing(kv, stack.client, spec).rebuild("lost-to")
    assert rebuilt is not None and (rebuilt.entry, rebuilt.active) == ("Triage", "Triage")
