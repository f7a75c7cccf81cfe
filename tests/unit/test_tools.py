"""Function tools at run time: the idempotency key, committed calls, the demo refund."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.worker import support_tools
from services.worker.spec import AgentSpec, HandoffSpec, ToolSpec
from services.worker.support_tools import issue_refund
from services.worker.tools import (
    Call,
    CallLedger,
    handoff_outputs,
    run_tool,
    takes_idempotency_key,
)
from services.worker.toolschema import ToolSchemaError, describe_callable
from services.worker.turn_ids import parse_turn_item_id, turn_item_id
from shared.messages import Envelope

KEY = "turn1.Agent.1.call0"


def keyed(order_id: str, idempotency_key: str = "") -> str:
    """Look an order up.

    Args:
        order_id: the order.
        idempotency_key: set by the worker.
    """
    return f"{order_id} key={idempotency_key}"


async def keyed_async(order_id: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
    return {"order": order_id, "key": idempotency_key}


def plain(order_id: str) -> str:
    return f"plain {order_id}"


def badly_keyed(idempotency_key: int = 0) -> str:
    return str(idempotency_key)


def tool(fn: Any) -> ToolSpec:
    name, description, schema = describe_callable(fn)
    return ToolSpec(import_path=f"tests:{name}", name=name, description=description,
                    parameters_json_schema=schema, fn=fn)


def test_the_key_parameter_is_hidden_from_the_model_and_must_be_a_string() -> None:
    _, _, schema = describe_callable(keyed)
    assert schema["properties"] == {"order_id": {"type": "string", "description": "the order."}}
    assert schema["required"] == ["order_id"]
    assert list(describe_callable(keyed_async)[2]["properties"]) == ["order_id"]
    with pytest.raises(ToolSchemaError, match="'idempotency_key' must be annotated str"):
        describe_callable(badly_keyed)
    assert takes_idempotency_key(keyed) and takes_idempotency_key(keyed_async)
    assert not takes_idempotency_key(plain) and not takes_idempotency_key(len)


async def test_run_tool_passes_the_key_to_tools_that_take_it_and_never_lets_the_model_set_it() -> None:
    async def run(fn: Any, arguments: str) -> str:
        return await run_tool("Agent", tool(fn), fn.__name__, arguments, key=KEY, time_limit=5)

    assert await run(keyed, '{"order_id": "o1"}') == f"o1 key={KEY}"
    assert await run(keyed_async, '{"order_id": "o2"}') == f'{{"order": "o2", "key": "{KEY}"}}'
    assert await run(plain, '{"order_id": "o3"}') == "plain o3"
    assert await run(keyed, '{"order_id": "o1", "idempotency_key": "mine"}') == (
        "error: idempotency_key is set by the worker, not in the arguments of keyed"
    )
    assert await run(plain, "[1]") == "error: the arguments of plain must be a JSON object"
    assert await run_tool("Agent", None, "nope", "{}", key=KEY, time_limit=5) == (
        "error: Agent has no tool named 'nope'"
    )


async def test_a_slow_tool_times_out_into_an_error_output() -> None:
    async def sleepy(idempotency_key: str = "") -> str:
        await asyncio.sleep(5)
        return "late"

    out = await run_tool("Agent", tool(sleepy), "sleepy", "{}", key=KEY, time_limit=0.05)
    assert out == "error: sleepy did not finish within 0.05s"


def test_issue_refund_answers_a_repeated_key_with_the_first_refund() -> None:
    issued = support_tools.REFUNDS.issued
    first = issue_refund(29.99, "duplicate charge", idempotency_key="k-refund-1")
    assert first.startswith("Refund RF-") and "$29.99" in first
    assert issue_refund(29.99, " duplicate charge ", idempotency_key="k-refund-1") == first
    assert support_tools.REFUNDS.issued == issued + 1
    with pytest.raises(ValueError, match="already used for a refund of \\$29.99"):
        issue_refund(5.0, "other", idempotency_key="k-refund-1")
    # A new key is a new refund; without a key, every call is one.
    assert issue_refund(29.99, "duplicate charge", idempotency_key="k-refund-2") != first
    assert issue_refund(1.0, "x") != issue_refund(1.0, "x")
    assert support_tools.REFUNDS.issued == issued + 4
    with pytest.raises(ValueError, match="positive number"):
        issue_refund(-1, "x", idempotency_key="k-refund-3")
    assert support_tools.REFUNDS.issued == issued + 4


def envelope(order: int, item_id: str, data: dict[str, Any]) -> Envelope:
    tid = parse_turn_item_id(item_id)
    return Envelope(session_id="s", item_order=order, item_id=item_id,
                    agent=tid.agent if tid else "user", kind="item", data=data,
                    created_at="2026-01-01T00:00:00.000000Z", hash="0" * 64)


def test_the_ledger_finds_calls_without_outputs_and_handoffs_answer_last() -> None:
    agent = AgentSpec(name="Agent", instructions="x", handoffs=(
        HandoffSpec(target="Other", tool_name="to_other", tool_description="d"),
        HandoffSpec(target="Third", tool_name="to_third", tool_description="d"),
    ))
    ids = [turn_item_id("t", "Agent", 2, r) for r in ("call0", "call1", "call2", "out1")]
    items = [
        envelope(5, ids[0], {"type": "function_call", "call_id": "c0", "name": "to_other",
                             "arguments": "{}"}),
        envelope(6, ids[1], {"type": "function_call", "call_id": "c1", "name": "charge",
                             "arguments": '{"amount": 1}'}),
        envelope(7, ids[2], {"type": "function_call", "call_id": "c2", "name": "to_third",
                             "arguments": "{}"}),
        envelope(8, ids[3], {"type": "function_call_output", "call_id": "c1", "output": "ok"}),
        envelope(9, turn_item_id("t", "Else", 2, "call0"), {"type": "function_call"}),
    ]
    ledger = CallLedger("Agent")
    for env in items:
        ledger.add(parse_turn_item_id(env.item_id), env)  # type: ignore[arg-type]
    assert ledger.pending(1) is None
    pending = ledger.pending(2)
    assert pending is not None and pending.done == {1}
    assert pending.calls[1] == Call(1, "c1", "charge", '{"amount": 1}', ids[1])
    assert [c.key for c in pending.calls] == ids[:3]
    outputs, target, at = handoff_outputs(agent, pending.calls)
    assert (target, at) == ("Other", 0)
    assert outputs == {0: '{"assistant": "Other"}',
                       2: "error: to_third ignored: only one handoff per response "
                          "(this response hands off to Other)"}
    # Once every output is in, nothing is pending.
    for i, order in ((0, 10), (2, 11)):
        oid = turn_item_id("t", "Agent", 2, f"out{i}")
        ledger.add(parse_turn_item_id(oid), envelope(order, oid, {"type": "function_call_output"}))  # type: ignore[arg-type]
    assert ledger.pending(2) is None
