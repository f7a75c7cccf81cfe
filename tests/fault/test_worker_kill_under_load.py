"""kill -9 of one of two workers while many sessions have turns in flight.

The notices the killed worker held come back to the survivor after
``ack_wait``; every user message still gets exactly one reply (none lost,
none doubled), and the reply is the agent's answer, not a failure item.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Entry, FakeOpenAI, slow, text
from tests.support.workerstack import WorkerStack, is_user, solo_spec, terminal_items, user_texts

SESSIONS, MESSAGES = 12, 3


async def test_kill9_of_one_of_two_workers_under_load_loses_and_doubles_nothing(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    def respond(request: dict[str, Any]) -> Entry:
        return slow(0.05, text(f"answer to {user_texts(request)[-1]}"))  # turns stay in flight a while

    fake_openai.responder(respond)
    spec = solo_spec(stack.tmp / "solo.toml")
    victim, survivor = await stack.start_workers(
        stack.worker("Solo", spec, ack_wait=2.0, name="solo-1"),
        stack.worker("Solo", spec, ack_wait=2.0, name="solo-2"),
    )

    async def session(i: int) -> None:
        # A conversation: each message after the previous one's reply.
        for k in range(MESSAGES):
            await stack.send(f"load-{i}", f"s{i} m{k}")
            await stack.answered(f"load-{i}", users=k + 1, timeout=30)

    talking = asyncio.gather(*(session(i) for i in range(SESSIONS)))

    def some_answered() -> None:
        assert len(fake_openai.requests) >= SESSIONS // 2

    await assert_eventually(some_answered, timeout=20)
    await asyncio.to_thread(victim.kill9)  # mid-phase: it holds turns in flight
    await talking

    for i in range(SESSIONS):
        log = await stack.log(f"load-{i}")
        users = [e for e in log if is_user(e)]
        assert len(users) == MESSAGES
        for u in users:
            (reply,) = terminal_items(log, u)  # exactly one: nothing lost, nothing doubled
            assert reply.agent == "Solo" and reply.item_id.endswith(".reply"), reply
            assert reply.data["content"][0]["text"] == f"answer to {u.data['content']}"
    assert ": replied (" in survivor.output()
