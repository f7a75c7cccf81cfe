"""A user message sent under the id of a committed tool call's output.

Turn-derived ids are predictable, and without required signatures the log service takes
any ``item_id`` on ``convlog.in``.  A user who sends a message under
``<turn>.<agent>.<step>.out<i>`` while the tool of that call runs takes the id the
output must be stored under: the worker sees the item is not the agent's (FORGED) and
skips it, so the call stayed pending, its tool ran again, its output was refused again
(the id holds other content), and so on -- 21 runs of the tool per delivery, then a
retry of the delivery, forever, and the user message never answered.  The worker now
ends such a turn with a ``system`` item.  Real nats-server, the real log service and a
``convlog worker`` process; the model is the fake OpenAI server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.worker.turn_ids import turn_item_id, turn_key
from tests.fault.test_tool_once import Tool, committed_call_without_output, worker
from tests.support.fake_openai import Entry, FakeOpenAI, text, tool_call
from tests.support.workerstack import WorkerStack, terminal_items


async def test_a_user_message_under_a_pending_calls_output_id_ends_the_turn_and_runs_the_tool_once(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    tool = Tool(stack.tmp)
    asked: list[Any] = []

    def respond(request: dict[str, Any]) -> Entry:
        asked.append(request)
        return tool_call("charge", {"amount": 7.5}) if len(asked) == 1 else text("ok")

    fake_openai.responder(respond)
    tool.hold.touch()
    await stack.start_workers(worker(stack, tool))
    await stack.client.send("taken", "pay", item_id="m1")
    call = await committed_call_without_output(stack, "taken")
    await tool.ran(1)

    # While the tool runs, the user sends a message under the id its output will have.
    out_id = turn_item_id(turn_key("m1"), "Cashier", 1, "out0")
    await stack.client.send("taken", "gotcha", item_id=out_id)
    tool.hold.unlink()

    log = await stack.answered("taken", users=2, timeout=15)
    (end,) = terminal_items(log, log[0])
    assert end.agent == "system"
    assert end.data["content"] == ("Cashier failed to answer: the output of its call to charge cannot be "
                                   "stored: a forged item holds its id")
    await asyncio.sleep(1.0)  # nothing more runs
    assert [r["key"] for r in tool.runs()] == [f"taken:{call.item_id}"]
    assert len(tool.ledger()) == 1
