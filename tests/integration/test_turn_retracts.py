"""A retract or clear that hides a turn's committed tool call before its tool ran (a
worker killed between the call and the tool, an operator popping the call it made):
README "Visible history": hidden items disappear from what the agents see.  The turn
resumed from the log must not run the tool for the hidden call (it ran it, from the raw
read, and wrote an output nobody's call pairs with); it asks the model again with the
visible history instead.  Against the real log service and the fake model."""

from __future__ import annotations

import pytest

from services.worker.convert import function_call_item
from services.worker.model import make_model_client
from services.worker.spec import parse_spec
from services.worker.turn import TurnPart, TurnRunner
from services.worker.turn_ids import turn_item_id, turn_key
from shared.messages import AppendItem, Envelope
from tests.support import odd_tools
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import FakeOpenAI, text
from tests.support.workerstack import WorkerStack, solo_spec, terminal_items, user_texts

SPEC = """
entry = "Clerk"

[[agents]]
name = "Clerk"
instructions = "Use your tool."
tools = ["tests.support.odd_tools:quick"]
"""


@pytest.mark.parametrize("how", ["retract", "clear"])
async def test_a_hidden_pending_tool_call_is_not_run(
    stack: WorkerStack, fake_openai: FakeOpenAI, how: str
) -> None:
    sid = f"hidden-call-{how}"
    spec = parse_spec(SPEC)
    ack = await stack.send(sid, "refund me")
    user = ack.items[0]
    turn = turn_key(user.item_id)
    # The call the worker committed before it was killed (write-ahead: the tool runs next).
    call = AppendItem(agent="Clerk", item_id=turn_item_id(turn, "Clerk", 1, "call0"),
                      data=function_call_item("call_1", "quick", '{"n": 7}'))
    (call_ack,) = (await stack.client.append(sid, [call])).items
    hide = (AppendItem(agent="user", kind="retract", data={"target": call_ack.item_order})
            if how == "retract" else AppendItem(agent="user", kind="clear", data={}))
    await stack.client.append(sid, [hide])

    fake_openai.script([text("nothing to run")])
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Clerk"), model, tool_timeout=5)
    odd_tools.RUNS.clear()
    try:
        result = await runner.run(TurnPart(sid, turn, user.item_order))
        assert odd_tools.RUNS == []  # the hidden call's tool never ran
        log = await stack.log(sid)
        assert not [e for e in log if e.data.get("type") == "function_call_output"]
        assert result.outcome == "replied"
        (reply,) = terminal_items(log, log[0])
        assert reply.item_id == turn_item_id(turn, "Clerk", 2, "reply")  # step 1 stays taken
        assert len(fake_openai.requests) == 1
    finally:
        await model.client.close()


async def test_only_the_visible_calls_of_a_pending_step_run(stack: WorkerStack, fake_openai: FakeOpenAI) -> None:
    sid = "hidden-call-one-of-two"
    spec = parse_spec(SPEC)
    ack = await stack.send(sid, "two things")
    user = ack.items[0]
    turn = turn_key(user.item_id)
    calls = [AppendItem(agent="Clerk", item_id=turn_item_id(turn, "Clerk", 1, f"call{i}"),
                        data=function_call_item(f"call_{i}", "quick", f'{{"n": {i + 1}}}')) for i in range(2)]
    acked = (await stack.client.append(sid, calls)).items
    await stack.client.append(sid, [AppendItem(agent="user", kind="retract",
                                               data={"target": acked[1].item_order})])

    fake_openai.script([text("one done")])
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Clerk"), model, tool_timeout=5)
    odd_tools.RUNS.clear()
    try:
        result = await runner.run(TurnPart(sid, turn, user.item_order))
        assert odd_tools.RUNS == [1]  # call0 ran; the retracted call1 did not
        log = await stack.log(sid)
        outs = [e for e in log if e.data.get("type") == "function_call_output"]
        assert [e.item_id for e in outs] == [turn_item_id(turn, "Clerk", 1, "out0")]
        assert result.outcome == "replied"
    finally:
        await model.client.close()


@pytest.mark.parametrize("how", ["retract", "clear"])
async def test_a_message_hidden_before_its_worker_picks_it_up_is_not_answered(
    stack: WorkerStack, fake_openai: FakeOpenAI, how: str
) -> None:
    # README "Visible history": a retracted or cleared item is out of what the agents see.
    # The message is hidden while its notice waits for a worker: the worker answered it
    # anyway (a reply to nothing the agent can see), from a window without it.
    fake_openai.responder(lambda r: text(f"re: {(user_texts(r) or ['nothing'])[-1]}"))
    sid = f"hidden-before-pickup-{how}"
    (hidden,) = (await stack.send(sid, "never mind this")).items
    hide = (AppendItem(agent="user", kind="retract", data={"target": hidden.item_order})
            if how == "retract" else AppendItem(agent="user", kind="clear", data={}))
    await stack.client.append(sid, [hide])

    await stack.start_workers(stack.worker("Solo", solo_spec(stack.tmp / "solo.toml")))
    (later,) = (await stack.send(sid, "the real question")).items

    async def later_answered() -> list[Envelope]:
        log = await stack.log(sid)
        (user,) = [e for e in log if e.item_order == later.item_order]
        assert terminal_items(log, user), "not answered yet"
        return log

    log = await assert_eventually(later_answered, timeout=20)
    # One session's notices are handled in order: the hidden message's came first.
    assert not terminal_items(log, log[0]), [e.data for e in log]
    assert [(e.agent, e.kind) for e in log] == [("user", "item"), ("user", how), ("user", "item"), ("Solo", "item")]
    assert log[-1].data["content"][0]["text"] == "re: the real question"
