"""Workers under faults: kill -9 mid-turn, SIGTERM mid-turn, racing replicas, NATS restarts.

Whatever happens, every user message gets exactly one reply: deliveries are at
least once, and a redelivered turn resumes from what the log holds
(turn-derived ids, ``expected_last``) instead of starting over.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from services.worker.model import make_model_client
from services.worker.spec import load_spec
from services.worker.turn import TurnPart, TurnRunner
from services.worker.turn_ids import parse_turn_item_id, turn_key
from shared.messages import Envelope
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Entry, FakeOpenAI, slow, text, tool_call
from tests.support.natsd import NatsServer
from tests.support.workerstack import (
    SEED_SPEC,
    WorkerStack,
    is_user,
    solo_spec,
    terminal_items,
    turn_items,
    user_texts,
)

ACK_WAIT = 2.0  # seconds: how soon a dead worker's deliveries come back


def roles(log: list[Envelope], user: Envelope) -> list[tuple[int, str]]:
    """(step, role) of every item the user's turn wrote."""
    out = []
    for e in turn_items(log, user):
        tid = parse_turn_item_id(e.item_id)
        assert tid is not None
        out.append((tid.step, tid.role))
    return out


async def test_kill9_mid_turn_is_resumed_by_a_replica_with_exactly_one_reply(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    crashed = False

    def respond(request: dict[str, Any]) -> Entry:
        last = user_texts(request)[-1]
        if crashed:
            return text(f"answered: {last}")
        if last == "refund please" and not any(m["role"] == "tool" for m in request["messages"]):
            return tool_call("issue_refund", {"amount": 12.5, "reason": "duplicate charge"})
        return slow(60, text("never delivered"))  # the worker dies while waiting for this

    fake_openai.responder(respond)
    (first,) = await stack.start_workers(stack.worker("L2Support", SEED_SPEC, ack_wait=ACK_WAIT))

    # 1. Two sessions mid-turn in the same worker: one before anything was written,
    #    one after its tool step (function_call + output) was appended.
    await stack.send("crash-plain", "hello there", to="L2Support")
    await stack.send("crash-tool", "refund please", to="L2Support")

    async def both_waiting() -> None:
        log = await stack.log("crash-tool")
        assert [e.data.get("type") for e in log[1:]] == ["function_call", "function_call_output"]
        assert len(fake_openai.requests) == 3

    await assert_eventually(both_waiting, timeout=15)

    # 2. A replica joins, the first worker is killed; its deliveries come back after ack_wait.
    (second,) = await stack.start_workers(stack.worker("L2Support", SEED_SPEC, ack_wait=ACK_WAIT))
    crashed = True
    await asyncio.to_thread(first.kill9)

    plain = await stack.answered("crash-plain", users=1, timeout=20)
    tooled = await stack.answered("crash-tool", users=1, timeout=20)

    # 3. Exactly one reply each; the tool step was not repeated: the turn resumed at step 2.
    assert roles(plain, plain[0]) == [(1, "reply")]
    assert roles(tooled, tooled[0]) == [(1, "call0"), (1, "out0"), (2, "reply")]
    assert [e.data["content"][0]["text"] for e in terminal_items(tooled, tooled[0])] == [
        "answered: refund please"
    ]
    (resumed,) = [r for r in fake_openai.requests[3:] if user_texts(r) == ["refund please"]]
    assert any(m["role"] == "tool" and "Refund RF-" in m["content"] for m in resumed["messages"])
    assert len(fake_openai.requests) == 5
    assert second.output().count(": replied") == 2, second.output()


async def test_sigterm_finishes_running_turns_within_grace_and_hands_back_the_rest(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    spec = solo_spec(stack.tmp / "solo.toml")
    stopping = False

    def respond(request: dict[str, Any]) -> Entry:
        last = user_texts(request)[-1]
        if stopping:
            return text(f"answered by the replacement: {last}")
        if last == "quick":
            return slow(1.0, text("quick answer"))
        return slow(60, text("never delivered"))

    fake_openai.responder(respond)
    (worker,) = await stack.start_workers(stack.worker("Solo", spec, args=["--grace", "2.5"]))
    await stack.send("term-quick", "quick")
    await stack.send("term-long", "long")
    await stack.requests_at_least(2)

    # 1. SIGTERM: the quick turn finishes within grace; the long one is cancelled and nak'd.
    os.kill(worker.pid, signal.SIGTERM)
    code = await asyncio.to_thread(worker.wait, 15)
    assert code == 0, worker.output()
    out = worker.output()
    assert "worker Solo stopped:" in out and "1 replied" in out, out
    quick = await stack.answered("term-quick", users=1, timeout=5)
    assert [e.data["content"][0]["text"] for e in terminal_items(quick, quick[0])] == ["quick answer"]
    assert len(await stack.log("term-long")) == 1

    # 2. A new worker picks the handed-back message up at once and answers it, once.
    stopping = True
    await stack.start_workers(stack.worker("Solo", spec))
    long = await stack.answered("term-long", users=1, timeout=10)
    assert roles(long, long[0]) == [(1, "reply")]
    assert len(await stack.log("term-quick")) == 2  # nothing written twice


async def test_racing_and_redelivered_turns_write_one_reply(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # The turn loop in-process, against the real log service: two replicas that got the
    # same delivery race, then a third delivery arrives after the turn ended.
    fake_openai.responder(lambda r: slow(0.3, text(f"reply {len(fake_openai.requests)}")))
    spec = load_spec(SEED_SPEC)
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runners = [TurnRunner(stack.client, spec.agent("L1Billing"), model) for _ in range(2)]
    ack = await stack.send("race", "I have a billing question")
    user_id = ack.items[0].item_id
    part = TurnPart("race", turn_key(user_id), ack.items[0].item_order)

    results = await asyncio.gather(*(r.run(part) for r in runners))
    assert sorted(r.outcome for r in results) == ["done", "replied"]
    log = await stack.log("race")
    assert roles(log, log[0]) == [(1, "reply")]

    again = await runners[0].run(part)
    assert (again.outcome, again.model_calls, again.items_written) == ("done", 0, 0)
    assert len(await stack.log("race")) == 2
    await model.client.close()


async def test_workers_keep_answering_across_a_nats_server_restart(
    stack: WorkerStack, fake_openai: FakeOpenAI, nats_server: NatsServer
) -> None:
    fake_openai.responder(lambda r: text(f"answered: {user_texts(r)[-1]}"))
    spec = solo_spec(stack.tmp / "solo.toml")
    (worker,) = await stack.start_workers(stack.worker("Solo", spec))
    await stack.send("restart", "before")
    await stack.answered("restart", users=1)

    await asyncio.to_thread(nats_server.restart)
    await stack.send("restart", "after")
    log = await stack.answered("restart", users=2, timeout=30)
    users = [e for e in log if is_user(e)]
    assert [len(terminal_items(log, u)) for u in users] == [1, 1]
    assert worker.running
