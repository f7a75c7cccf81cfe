"""A handoff in the log to an agent this spec lacks (written under an older spec)
is not learnt as a routing fact: routing ignores such handoffs, so the next user
message is still answered by the agent the log makes active (it was forwarded
to the unknown agent's subject, where nobody pulls, and never answered)."""

from __future__ import annotations

from typing import Any

from services.worker.convert import function_call_item, function_call_output_item, handoff_output
from services.worker.turn_ids import turn_item_id, turn_key
from shared.messages import AppendItem
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Entry, FakeOpenAI, text
from tests.support.workerstack import WorkerStack, is_user, solo_spec, terminal_items, user_texts


async def test_a_handoff_to_an_agent_the_spec_lacks_does_not_route_the_next_message_away(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    def respond(request: dict[str, Any]) -> Entry:
        return text(f"Solo answers: {user_texts(request)[-1]}")

    fake_openai.responder(respond)
    sid = "ghost-1"
    user_id = "m-ghost-1"
    turn = turn_key(user_id)
    # An older version of the spec let Solo hand off to "Ghost"; its worker wrote the
    # handoff and died before acking. This spec has no Ghost.
    await stack.client.append(sid, [
        AppendItem(agent="user", data={"role": "user", "content": "hello"}, item_id=user_id),
        AppendItem(agent="Solo", item_id=turn_item_id(turn, "Solo", 1, "call0"),
                   data=function_call_item("call_g", "transfer_to_Ghost", "{}")),
        AppendItem(agent="Solo", item_id=turn_item_id(turn, "Solo", 1, "out0"),
                   data=function_call_output_item("call_g", handoff_output("Ghost"))),
    ])
    spec = solo_spec(stack.tmp / "solo.toml")
    (worker,) = await stack.start_workers(stack.worker("Solo", spec))

    # The worker resumes turn 1: the log shows its part handed off (to Ghost).
    def resumed() -> None:
        assert "-> Ghost" in worker.output()

    await assert_eventually(resumed, timeout=10)

    # Routing (shared by every replica, Routing.active_agent): handoffs to agents the spec
    # does not know are ignored, so Solo is still the active agent and answers this.
    await stack.send(sid, "still there?")

    async def second_answered() -> None:
        items = await stack.log(sid)
        second = [e for e in items if is_user(e)][1]
        assert terminal_items(items, second), (
            "the second message was not answered\n" + worker.output()[-2000:])

    await assert_eventually(second_answered, timeout=10)
