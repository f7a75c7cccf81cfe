"""A turn in a session other writers append to while the model thinks (the turn runner
in-process, against the real log service and the fake model): notes that start and belong
to no turn leave the model's answer standing (appended again after them, the model not
asked again), so a busy session's turns end; a user message still makes the model decide
again.  A bug once (found in a review): every append's ``expected_last`` lost to the
writer, the model was asked again each time, and after ``max_conflicts`` the part raised
``TurnBusyError``; the notice was retried the same way, forever: the turn never ended,
21 model calls a delivery."""

from __future__ import annotations

import asyncio
from typing import Any

from services.worker.model import make_model_client
from services.worker.spec import parse_spec
from services.worker.turn import TurnPart, TurnRunner
from services.worker.turn_ids import turn_key
from shared.messages import AppendItem
from tests.support.fake_openai import FakeOpenAI, slow, text
from tests.support.workerstack import WorkerStack, terminal_items

SPEC = """
entry = "Solo"

[[agents]]
name = "Solo"
instructions = "Answer the user."
"""


async def _part(stack: WorkerStack, sid: str, msg: str) -> TurnPart:
    ack = await stack.send(sid, msg)
    return TurnPart(sid, turn_key(ack.items[0].item_id), ack.items[0].item_order)


async def test_a_turn_ends_in_a_session_another_writer_appends_to_every_few_ms(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # The model takes 20 ms; a monitor appends a note every 3 ms: every expected_last
    # the answer is appended with is behind by then.
    fake_openai.responder(lambda r: slow(0.02, text("hello")))
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, parse_spec(SPEC).agent("Solo"), model)
    sid = "busy-notes"
    part = await _part(stack, sid, "hi")
    stop = asyncio.Event()

    async def monitor() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await stack.client.append(sid, [AppendItem(
                agent="monitor", data={"role": "system", "content": f"queue depth {n}"})])
            await asyncio.sleep(0.003)

    task = asyncio.create_task(monitor())
    try:
        result = await asyncio.wait_for(runner.run(part), 30)
    finally:
        stop.set()
        await task
        await model.client.close()
    assert (result.outcome, result.model_calls) == ("replied", 1)
    log = await stack.log(sid)
    (reply,) = terminal_items(log, log[0])
    assert reply.data["content"][0]["text"] == "hello"
    assert reply.item_order > 2  # after notes written while the model was asked


async def test_a_user_message_while_the_model_thinks_still_makes_it_decide_again(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    sid = "busy-user"
    answers = iter(["first answer", "second answer"])

    def answer(request: dict[str, Any]) -> Any:
        return slow(0.3, text(next(answers)))

    fake_openai.responder(answer)
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, parse_spec(SPEC).agent("Solo"), model)
    part = await _part(stack, sid, "hi")

    async def interrupt() -> None:
        await asyncio.sleep(0.1)
        await stack.client.append(sid, [AppendItem(agent="monitor", data={"role": "system", "content": "note"})])
        await stack.client.append(sid, [AppendItem(
            agent="user", data={"role": "user", "content": "and one more thing"}, item_id="noturn:more")])

    task = asyncio.create_task(interrupt())
    try:
        result = await asyncio.wait_for(runner.run(part), 30)
    finally:
        await task
        await model.client.close()
    assert (result.outcome, result.model_calls) == ("replied", 2)
    log = await stack.log(sid)
    (reply,) = terminal_items(log, log[0])
    assert reply.data["content"][0]["text"] == "second answer"
    second = fake_openai.requests[1]["messages"]
    assert second[-1] == {"role": "user", "content": "and one more thing"}
