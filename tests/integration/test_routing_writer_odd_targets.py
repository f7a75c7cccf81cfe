"""A tool output that reads as a handoff to a name no agent can have (``{"assistant": ""}``,
a sentence longer than an agent name) must not cost a session its routing."""

from __future__ import annotations

import json

import pytest

from services.worker.routing import Routing
from services.worker.spec import load_spec
from shared.routing import decode_checkpoint, open_routing_bucket
from tests.support.eventually import assert_eventually
from tests.support.logenv import Env, user
from tests.support.procs import REPO_ROOT


@pytest.mark.parametrize("target", ["", "x" * 129, "line\nbreak"], ids=["empty", "129-chars", "control-char"])
async def test_a_handoff_output_naming_no_possible_agent_keeps_the_sessions_entry_agent(
    env: Env, target: str
) -> None:
    """The routing writer wrote ``{"active": <target>, ...}`` for any string such an
    output named, but a checkpoint whose ``active`` is no agent name (empty, over 128
    characters, a control character) does not decode: workers ignored it and fell back
    to the spec's entry agent, so a session its user started with ``to: L1Billing``
    was answered by Triage from then on.  Workers ignore handoffs to agents they do
    not know; so does the routing writer now for names no agent can have."""
    sid = "odd-target"
    await env.client.send(sid, "billing please", to="L1Billing")  # item 1
    await env.client.append(sid, [  # items 2, 3: a tool's result, no handoff of the spec
        {"agent": "L1Billing", "data": {"type": "function_call", "call_id": "c1", "name": "lookup",
                                        "arguments": "{}"}},
        {"agent": "L1Billing", "data": {"type": "function_call_output", "call_id": "c1",
                                        "output": json.dumps({"assistant": target})}},
    ])
    await env.client.append(sid, [user("and now?")])  # item 4
    await assert_eventually(lambda: _written(env), timeout=5)
    kv = await open_routing_bucket(env.nc, env.settings.subjects)
    routing = Routing(kv, env.client, load_spec(REPO_ROOT / "deploy" / "agents.toml"))
    assert await routing.active_agent(sid, 4) == "L1Billing"
    value = decode_checkpoint((await kv.get(sid)).value or b"")
    assert (value.active, value.order, value.entry) == ("L1Billing", 0, "L1Billing")


def _written(env: Env) -> None:
    """The routing writer's round (20 ms after the commit) is over."""
    writer = env.service.routing_writer
    assert writer is not None and not writer._pending
    assert writer._task is None or writer._task.done()
