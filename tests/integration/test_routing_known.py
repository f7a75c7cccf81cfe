"""A worker's routing check starts reading the log where the worker's own
knowledge of the session ends, not at the session's last handoff.

A worker that has not seen a session for a while (its replica played the
turns meanwhile) checks who is active before it answers.  The routing
checkpoint names the session's last handoff; in a long conversation without
handoffs that is item 0, and reading from there cost every such check the
whole session (hundreds to thousands of items in ``convlog bench --turns``).
With what the worker learnt from the log before — "after item k, agent A is
active" — it reads only the items after k.
"""

from __future__ import annotations

from typing import Any

from services.worker.routing import Routing
from services.worker.spec import load_spec
from shared.client import LogClient
from shared.messages import ReadReply
from shared.routing import open_routing_bucket
from tests.support.logenv import Env, user
from tests.support.procs import REPO_ROOT


class CountedReads:
    """The real client; counts the items its reads return."""

    def __init__(self, client: LogClient) -> None:
        self.client = client
        self.items = 0

    async def read(self, *args: Any, **kwargs: Any) -> ReadReply:
        page = await self.client.read(*args, **kwargs)
        self.items += len(page.items)
        return page


def _said(agent: str, text: str) -> dict[str, Any]:
    return {"agent": agent, "data": {"type": "message", "role": "assistant", "content": text}}


def _handoff(agent: str, target: str) -> list[dict[str, Any]]:
    call = {"type": "function_call", "call_id": f"to-{target}", "name": f"transfer_to_{target}", "arguments": "{}"}
    out = {"type": "function_call_output", "call_id": f"to-{target}", "output": f'{{"assistant": "{target}"}}'}
    return [{"agent": agent, "data": call}, {"agent": agent, "data": out}]


async def test_the_routing_check_reads_from_what_the_worker_knew(env: Env) -> None:
    sid = "long-talk"
    await env.client.send(sid, "billing please", to="L1Billing")  # item 1; L1Billing is active
    for i in range(150):
        await env.client.append(sid, [_said("L1Billing", f"answer {i}")])  # items 2..151
    await env.client.append(sid, [user("one more")])  # item 152
    kv = await open_routing_bucket(env.nc, env.settings.subjects)
    spec = load_spec(REPO_ROOT / "deploy" / "agents.toml")

    # Without what the worker knew: from the checkpoint (the entry, item 0) on.
    reads = CountedReads(env.client)
    assert await Routing(kv, reads, spec).active_agent(sid, 152) == "L1Billing"  # type: ignore[arg-type]
    assert reads.items == 151

    # Knowing who was active after item 140: the 11 items after it.
    reads = CountedReads(env.client)
    assert await Routing(kv, reads, spec).active_agent(sid, 152, known=(140, "L1Billing")) == "L1Billing"  # type: ignore[arg-type]
    assert reads.items == 11

    # A handoff after what the worker knew still counts.
    await env.client.append(sid, _handoff("L1Billing", "L2Support"))  # items 153, 154
    await env.client.append(sid, [user("and now?")])  # item 155
    reads = CountedReads(env.client)
    assert await Routing(kv, reads, spec).active_agent(sid, 155, known=(140, "L1Billing")) == "L2Support"  # type: ignore[arg-type]
    assert reads.items <= 1 + 14  # the checkpoint's handoff item at most, then 141..154


async def test_what_the_worker_knew_is_not_used_where_it_cannot_hold(env: Env) -> None:
    sid = "short-talk"
    await env.client.send(sid, "hello")  # item 1; the spec's entry, Triage, is active
    await env.client.append(sid, _handoff("Triage", "L1Billing"))  # items 2, 3
    await env.client.append(sid, [user("bill?")])  # item 4
    kv = await open_routing_bucket(env.nc, env.settings.subjects)
    routing = Routing(kv, env.client, load_spec(REPO_ROOT / "deploy" / "agents.toml"))
    # Not before the item asked about, not an agent of the spec, not older than the
    # checkpoint's handoff: the log decides.
    assert await routing.active_agent(sid, 4, known=(4, "L2Support")) == "L1Billing"
    assert await routing.active_agent(sid, 4, known=(3, "Nobody")) == "L1Billing"
    assert await routing.active_agent(sid, 2, known=(1, "L2Support")) == "L2Support"  # the caller's own fact
    assert await routing.active_agent(sid, 4, known=(1, "Triage")) == "L1Billing"
