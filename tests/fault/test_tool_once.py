"""A side-effecting tool has its effect once per call, whatever races and crashes happen.

The worker commits a step's ``function_call`` first, then runs the tool with the
call's idempotency key, then appends the output; a committed call is never
asked of the model again.  The tool here (``tests.support.counting_tools``)
records every run and applies its charge once per key, in files shared by the
worker processes, so each test can count both.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from services.worker.model import make_model_client
from services.worker.spec import parse_spec
from services.worker.turn import TurnPart, TurnRunner
from services.worker.turn_ids import parse_turn_item_id, tool_key, turn_key
from shared.messages import Envelope
from tests.support import counting_tools
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Entry, FakeOpenAI, slow, text, tool_call, tool_calls
from tests.support.procs import Proc
from tests.support.workerstack import (
    WorkerStack,
    is_user,
    terminal_items,
    turn_items,
    user_texts,
    write_spec,
)

ACK_WAIT = 2.0  # seconds: how soon a dead or frozen worker's deliveries come back

SPEC = """
entry = "Cashier"

[[agents]]
name = "Cashier"
instructions = "Charge the customer when asked."
tools = ["tests.support.counting_tools:charge"]
"""


def cashier(request: dict[str, Any]) -> Entry:
    """Charge once per session: a tool call until a tool output is in the history."""
    outputs = [m["content"] for m in request["messages"] if m["role"] == "tool"]
    if outputs:
        return text(f"done ({outputs[-1]}); saw {' | '.join(user_texts(request))}")
    return tool_call("charge", {"amount": 7.5})


def of_type(log: list[Envelope], kind: str) -> list[Envelope]:
    return [e for e in log if e.data.get("type") == kind]


class Tool:
    """The counting tool's files for one test, and the worker environment that uses them."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "tool"
        self.dir.mkdir()
        self.env = {counting_tools.DIR_ENV: str(self.dir)}
        self.hold = self.dir / "hold"

    def runs(self) -> list[dict[str, Any]]:
        return counting_tools.runs(self.dir)

    def ledger(self) -> list[dict[str, Any]]:
        return counting_tools.ledger(self.dir)

    async def ran(self, n: int) -> None:
        def check() -> None:
            assert len(self.runs()) >= n, f"{len(self.runs())} tool runs so far"

        await assert_eventually(check, timeout=15)


def worker(stack: WorkerStack, tool: Tool) -> Proc:
    spec = stack.tmp / "cashier.toml"
    if not spec.exists():
        write_spec(spec, SPEC)
    return stack.worker("Cashier", spec, ack_wait=ACK_WAIT, extra_env=tool.env)


async def committed_call_without_output(stack: WorkerStack, sid: str) -> Envelope:
    """Wait until the session holds the call and no output: the tool is running."""

    async def check() -> Envelope:
        log = await stack.log(sid)
        calls = of_type(log, "function_call")
        assert len(calls) == 1, f"{len(calls)} calls so far"
        assert not of_type(log, "function_call_output")
        return calls[0]

    return await assert_eventually(check, timeout=15)


def assert_one_effect_and_one_reply(log: list[Envelope], tool: Tool, call: Envelope) -> None:
    """The call's output is in the log once, its charge applied once, the turn replied once."""
    (output,) = of_type(log, "function_call_output")
    assert output.data["call_id"] == call.data["call_id"]
    assert tool.ledger() == [{"key": tool_key(call.session_id, call.item_id), "amount": 7.5, "charge_id": "CH-0001"}]
    assert output.data["output"] == "Charge CH-0001 of $7.50 applied"
    assert {r["key"] for r in tool.runs()} == {tool_key(call.session_id, call.item_id)}
    (user,) = [e for e in log if is_user(e)]
    (reply,) = terminal_items(log, user)
    assert reply.item_order == log[-1].item_order


async def test_a_user_message_during_the_model_step_or_the_tool_runs_it_once(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    tool = Tool(stack.tmp)
    first = True

    def respond(request: dict[str, Any]) -> Entry:
        nonlocal first
        if first:  # the first model call is slow: "two" arrives while it thinks
            first = False
            return slow(1.5, cashier(request))
        return cashier(request)

    fake_openai.responder(respond)
    await stack.start_workers(worker(stack, tool))

    # 1. "two" lands while the model decides to charge: the step's append loses the race
    #    (expected_last), the model is asked again, and only the committed call runs.
    await stack.send("race-model", "one")
    await stack.requests_at_least(1)
    await stack.send("race-model", "two")
    log = await stack.answered("race-model", users=2)
    one, two = [e for e in log if is_user(e)]
    (call,) = of_type(log, "function_call")
    assert call.item_order > two.item_order  # decided with the full history
    assert [r["key"] for r in tool.runs()] == [tool_key(call.session_id, call.item_id)]  # ran once, with the call's key
    assert [len(terminal_items(log, u)) for u in (one, two)] == [1, 1]
    assert [e.item_id for e in turn_items(log, two)] == [terminal_items(log, two)[0].item_id]
    assert len(fake_openai.requests) == 4  # slow + redo, after the output, then "two"'s turn

    # 2. "more" lands while the tool runs (its call already committed): the output is
    #    appended after it, nothing runs twice, and the reply sees both messages.
    tool.hold.touch()
    await stack.send("race-tool", "pay")
    call = await committed_call_without_output(stack, "race-tool")
    await tool.ran(2)
    await stack.send("race-tool", "more")
    tool.hold.unlink()
    log = await stack.answered("race-tool", users=2)
    pay, more = [e for e in log if is_user(e)]
    (output,) = of_type(log, "function_call_output")
    assert call.item_order < more.item_order < output.item_order
    assert [r["key"] for r in tool.runs()][1:] == [tool_key(call.session_id, call.item_id)]
    assert [c["key"] for c in tool.ledger()] == [tool.runs()[0]["key"], tool_key(call.session_id, call.item_id)]
    (reply,) = terminal_items(log, pay)
    assert "saw pay | more" in reply.data["content"][0]["text"]
    assert len(terminal_items(log, more)) == 1


async def test_kill9_between_the_tool_and_its_output_reruns_it_with_the_same_key(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    tool = Tool(stack.tmp)
    fake_openai.responder(cashier)
    tool.hold.touch()
    (first,) = await stack.start_workers(worker(stack, tool))

    # 1. The call is committed and the charge applied; the worker dies before the output.
    await stack.send("crash", "pay")
    call = await committed_call_without_output(stack, "crash")
    await tool.ran(1)
    await stack.start_workers(worker(stack, tool))
    await asyncio.to_thread(first.kill9)
    tool.hold.unlink()

    # 2. The replica picks up the committed call: the tool runs again with the same key,
    #    the charge is not applied twice, and the model is never asked for step 1 again.
    log = await stack.answered("crash", users=1, timeout=20)
    assert_one_effect_and_one_reply(log, tool, call)
    runs = tool.runs()
    assert len(runs) == 2 and runs[0]["pid"] == first.pid and runs[1]["pid"] != first.pid
    assert len(fake_openai.requests) == 2  # the call, then the reply after its output


async def test_redelivery_to_another_replica_while_the_first_is_frozen_applies_it_once(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    tool = Tool(stack.tmp)
    fake_openai.responder(cashier)
    tool.hold.touch()
    (first,) = await stack.start_workers(worker(stack, tool))
    await stack.send("frozen", "pay")
    call = await committed_call_without_output(stack, "frozen")
    await tool.ran(1)
    (second,) = await stack.start_workers(worker(stack, tool))

    # 1. Freeze the first worker inside the tool: its in-progress acks stop, so JetStream
    #    redelivers the turn to the replica, which finishes it from the committed call.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        tool.hold.unlink()
        log = await stack.answered("frozen", users=1, timeout=20)
    finally:
        os.kill(first.pid, signal.SIGCONT)

    # 2. Thawed, the first worker's tool returns the first charge; its output is already
    #    in the log, so it writes nothing and ends its delivery as done.
    await asyncio.to_thread(first.wait_for_line, r"turn \S+ in frozen: done", 15)
    assert await stack.log("frozen") == log
    assert_one_effect_and_one_reply(log, tool, call)
    assert sorted(r["pid"] for r in tool.runs()) == sorted([first.pid, second.pid])
    assert len(fake_openai.requests) == 2
    assert first.running and second.running


async def test_a_step_with_a_tool_and_a_handoff_writes_the_handoff_last(
    stack: WorkerStack, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The turn loop in-process against the real log service (the tool runs in this process).
    tool = Tool(stack.tmp)
    monkeypatch.setenv(counting_tools.DIR_ENV, str(tool.dir))
    spec = parse_spec(SPEC + '\n[[agents.handoffs]]\ntarget = "Boss"\ntool_name = "to_boss"\n\n'
                      '[[agents]]\nname = "Boss"\ninstructions = "Decide."\n')
    fake_openai.script([tool_calls(tool_call("to_boss"), tool_call("charge", {"amount": 7.5})),
                        text("Boss here.")])
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    cashier_runner = TurnRunner(stack.client, spec.agent("Cashier"), model)
    ack = await stack.send("mixed", "pay and escalate")
    part = TurnPart("mixed", turn_key(ack.items[0].item_id), ack.items[0].item_order)
    try:
        # 1. Both calls are committed first, then the charge runs and its output is appended,
        #    and the handoff's output comes last: Boss starts with every output in the log.
        result = await cashier_runner.run(part)
        assert (result.outcome, result.handoff_to, result.items_written) == ("handed_off", "Boss", 4)
        log = await stack.log("mixed")
        assert [(e.data["type"], e.data.get("name")) for e in log[1:]] == [
            ("function_call", "to_boss"), ("function_call", "charge"),
            ("function_call_output", None), ("function_call_output", None),
        ]
        assert log[3].data["output"] == "Charge CH-0001 of $7.50 applied"
        assert log[4].data["output"] == '{"assistant": "Boss"}'
        assert [r["key"] for r in tool.runs()] == [tool_key("mixed", log[2].item_id)]

        # 2. A redelivery of the same part finds it over: nothing runs, nothing is written.
        again = await cashier_runner.run(part)
        assert (again.outcome, again.model_calls, again.items_written) == ("done", 0, 0)
        assert len(tool.runs()) == 1

        # 3. Boss continues the turn from the handoff output and replies once.
        boss = TurnRunner(stack.client, spec.agent("Boss"), model)
        tid = parse_turn_item_id(log[4].item_id)
        assert tid is not None
        done = await boss.run(TurnPart("mixed", part.turn, log[4].item_order, tid.step))
        assert done.outcome == "replied"
        log = await stack.log("mixed")
        assert [e.agent for e in terminal_items(log, log[0])] == ["Boss"]
    finally:
        await model.client.close()


async def test_the_same_message_id_in_two_sessions_gives_two_calls_two_keys(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # An app numbering its messages per conversation: both sessions' turns derive the
    # same item ids, but their calls are two calls, so two keys and two charges.
    tool = Tool(stack.tmp)
    fake_openai.responder(cashier)
    await stack.start_workers(worker(stack, tool))
    await stack.client.send("shop-a", "charge me", item_id="m1")
    log_a = await stack.answered("shop-a", users=1)
    await stack.client.send("shop-b", "charge me too", item_id="m1")
    log_b = await stack.answered("shop-b", users=1)
    (call_a,), (call_b,) = of_type(log_a, "function_call"), of_type(log_b, "function_call")
    assert call_a.item_id == call_b.item_id
    assert [c["key"] for c in tool.ledger()] == [tool_key("shop-a", call_a.item_id), tool_key("shop-b", call_b.item_id)]
    outputs = [of_type(log, "function_call_output")[0].data["output"] for log in (log_a, log_b)]
    assert outputs == ["Charge CH-0001 of $7.50 applied", "Charge CH-0002 of $7.50 applied"]
