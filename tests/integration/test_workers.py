"""Agent workers as real processes: routing, handoffs, history, replicas, model errors, CLI.

Every test runs a real nats-server, the real log service and real
``convlog worker`` subprocesses; models are the fake OpenAI-compatible server
on loopback (answers keyed on the agent named in the system prompt) or, in the
last test, the offline rules model.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from services.worker.convert import agent_system_prompt, items_to_chat_messages
from services.worker.model import make_model_client
from services.worker.routing import Routing, open_routing_bucket
from services.worker.scenario import ESCALATION_CONVERSATION, SEED_CONVERSATION
from services.worker.spec import load_spec
from services.worker.turn import TurnPart, TurnRunner
from services.worker.turn_ids import parse_turn_item_id, turn_key
from shared.messages import Envelope
from shared.nats_seam import PUBLIC
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Entry, FakeOpenAI, error, slow, text, tool_call
from tests.support.logsvc import service_env
from tests.support.natsd import NatsServer
from tests.support.workerstack import (
    SEED_SPEC,
    WorkerStack,
    agent_of,
    is_user,
    run_cli,
    solo_spec,
    support_responder,
    terminal_items,
    turn_items,
    user_texts,
    worker_stack,
    write_spec,
)


def assistant_text(env: Envelope) -> str:
    return "".join(p.get("text", "") for p in env.data.get("content", []))


# -- routing and handoffs ------------------------------------------------------------


async def test_seed_conversation_routes_triage_l1_l2_and_l2_sees_everything(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(support_responder)
    await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in ("Triage", "L1Billing", "L2Support")))
    sid = "seed-1"

    # 1. Play the seed's four messages, one turn at a time.
    for n, message in enumerate(SEED_CONVERSATION, 1):
        await stack.send(sid, message)
        log = await stack.answered(sid, users=n)

    # 2. Who answered: Triage routes, L1Billing answers, the refund escalates to L2Support.
    users = [e for e in log if is_user(e)]
    answered_by = [terminal_items(log, u)[0].agent for u in users]
    assert answered_by == ["L1Billing", "L1Billing", "L2Support", "L2Support"]
    handoffs = [(e.agent, e.data["output"]) for e in log if e.data.get("type") == "function_call_output"]
    assert handoffs == [("Triage", '{"assistant": "L1Billing"}'), ("L1Billing", '{"assistant": "L2Support"}')]
    # Every item a turn wrote carries the author's name and a turn-derived id.
    for u in users:
        for item in turn_items(log, u):
            assert item.agent == parse_turn_item_id(item.item_id).agent  # type: ignore[union-attr]
    assert sum(len(turn_items(log, u)) for u in users) + len(users) == len(log)

    # 3. L2Support's first model request holds every earlier item of the session.
    l2 = next(r for r in fake_openai.requests if agent_of(r) == "L2Support")
    handoff_at = next(i for i, e in enumerate(log) if e.data.get("output") == '{"assistant": "L2Support"}')
    spec = load_spec(SEED_SPEC)
    expected = items_to_chat_messages(
        agent_system_prompt(spec.agent("L2Support")), [e.data for e in log[: handoff_at + 1]]
    )
    assert l2["messages"] == expected
    assert user_texts(l2) == list(SEED_CONVERSATION[:3])
    assert {t["function"]["name"] for t in l2["tools"]} == {"issue_refund", "file_bug_report", "create_ticket"}

    # 4. Routing metadata: the KV checkpoint says L2Support, and rebuilding it from the log agrees.
    kv = await open_routing_bucket(stack.nc, stack.settings.subjects)
    routing = Routing(kv, stack.client, spec)
    assert (await routing.checkpoint(sid)).active == "L2Support"  # type: ignore[union-attr]
    await kv.delete(sid)
    assert await routing.checkpoint(sid) is None
    rebuilt = await routing.rebuild(sid)
    # (It names the last handoff, so workers can check it against the log.)
    assert rebuilt is not None and (rebuilt.active, rebuilt.order) == ("L2Support", log[handoff_at].item_order)
    assert await routing.active_agent(sid, users[1].item_order) == "L1Billing"

    # 5. `convlog tail` shows the handoffs.
    code, out, err = await run_cli(
        "tail", sid, "--after", "0", "--count", str(len(log)), "--nats-url", stack.server.url,
        "--no-embedded", env=service_env(stack.tmp / "cli"),
    )
    assert code == 0, err
    lines = out.splitlines()
    assert any("Triage" in ln and "handoff" in ln and "-> L1Billing" in ln for ln in lines), lines
    assert any("L1Billing" in ln and "handoff" in ln and "-> L2Support" in ln for ln in lines), lines


async def test_history_limit_bounds_what_the_model_sees(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    spec = solo_spec(stack.tmp / "solo.toml", history_limit=3)
    fake_openai.responder(lambda r: text(f"reply to {user_texts(r)[-1]}"))
    await stack.start_workers(stack.worker("Solo", spec))
    for n in range(1, 5):
        await stack.send("limited", f"message {n}")
        log = await stack.answered("limited", users=n)
    requests = fake_openai.requests
    assert len(requests) == 4
    for r in requests:
        assert r["messages"][0]["role"] == "system"
        assert len(r["messages"]) - 1 <= 3
    # The 4th call saw exactly the last three visible items before it: m3, r3, m4.
    assert requests[-1]["messages"][1:] == items_to_chat_messages("", [e.data for e in log[4:7]])[1:]
    assert user_texts(requests[-1]) == ["message 3", "message 4"]


# -- replicas ----------------------------------------------------------------------------


async def test_two_replicas_per_agent_give_exactly_one_reply_per_message(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    def respond(request: dict[str, Any]) -> Entry:
        time.sleep(0.02)  # widen the window in which replicas could race
        return support_responder(request)

    fake_openai.responder(respond)
    await stack.start_workers(
        *(stack.worker(agent, SEED_SPEC, name=f"{agent}-{i}")
          for agent in ("Triage", "L1Billing") for i in (1, 2))
    )
    sessions = [f"rep-{i}" for i in range(8)]
    # Two messages per session back to back, all sessions at once.
    await asyncio.gather(*(stack.send(sid, f"{sid} charged twice #{k}") for sid in sessions for k in (1, 2)))

    logs = await asyncio.gather(*(stack.answered(sid, users=2, timeout=30) for sid in sessions))
    handoffs_total = 0
    for sid, log in zip(sessions, logs, strict=True):
        users = [e for e in log if is_user(e)]
        assert len(users) == 2
        for u in users:
            items = turn_items(log, u)
            replies = [e for e in items if parse_turn_item_id(e.item_id).role == "reply"]  # type: ignore[union-attr]
            assert len(replies) == 1, (sid, u.item_order, [(e.item_order, e.item_id) for e in items])
            assert not [e for e in items if e.agent == "system"], items
        handoffs = [e for e in log if e.data.get("output") == '{"assistant": "L1Billing"}']
        assert len(handoffs) in (1, 2), log  # the second message may reach Triage before the handoff
        handoffs_total += len(handoffs)
    # Each part that wrote something was played once, by one replica (worker logs).
    def counted() -> None:
        outputs = "".join(p.output() for p in stack.procs)
        assert outputs.count(": replied (") == 2 * len(sessions)
        assert outputs.count(": handed_off -> L1Billing (") == handoffs_total

    await assert_eventually(counted, timeout=5)


# -- concurrency within a session ------------------------------------------------------------


async def test_a_message_arriving_mid_turn_is_answered_with_the_full_history(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    spec = solo_spec(stack.tmp / "solo.toml", history_limit=50)
    first = True

    def respond(request: dict[str, Any]) -> Entry:
        nonlocal first
        seen = " | ".join(user_texts(request))
        if first:
            first = False
            return slow(1.5, text(f"saw {seen}"))
        return text(f"saw {seen}")

    fake_openai.responder(respond)
    await stack.start_workers(stack.worker("Solo", spec))
    await stack.send("busy", "one")
    await stack.requests_at_least(1)  # the first turn is waiting for its (slow) model
    await stack.send("busy", "two")
    log = await stack.answered("busy", users=2)

    users = [e for e in log if is_user(e)]
    r1, r2 = (terminal_items(log, u) for u in users)
    assert len(r1) == 1 and len(r2) == 1
    # The first turn's slow answer lost the race with "two" (expected_last); it was redone
    # with the full history, so it answers having seen both messages.
    assert assistant_text(r1[0]) == "saw one | two"
    assert assistant_text(r2[0]) == "saw one | two"
    assert [e.item_order for e in log] == [1, 2, 3, 4]
    assert r1[0].item_order < r2[0].item_order
    assert len(fake_openai.requests) == 3
    # The second turn saw the first turn's reply after both messages.
    assert fake_openai.requests[2]["messages"][-1]["content"] == "saw one | two"


# -- model errors ------------------------------------------------------------------------------


async def test_model_errors_429_is_retried_500s_end_the_turn_and_the_session_goes_on(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    spec = solo_spec(stack.tmp / "solo.toml", history_limit=50)
    await stack.start_workers(stack.worker("Solo", spec, args=["--model-retries", "1"]))

    # 1. 429 with Retry-After 1 s, then success: the reply arrives, after the wait.
    fake_openai.script([error(429, retry_after=1), text("after the rate limit")])
    started = time.monotonic()
    await stack.send("errors", "first")
    log = await stack.answered("errors", users=1)
    assert time.monotonic() - started >= 1.0
    assert [assistant_text(e) for e in terminal_items(log, log[0])] == ["after the rate limit"]

    # 2. 500 on every attempt: a system item names the failing agent.
    fake_openai.script([error(500), error(500)])
    await stack.send("errors", "second")
    log = await stack.answered("errors", users=2)
    (failure,) = terminal_items(log, log[2])
    assert failure.agent == "system" and failure.data["role"] == "system"
    assert failure.data["content"].startswith("Solo failed to answer: ")
    assert "HTTP 500" in failure.data["content"]

    # 3. The session stays usable: the next message is answered normally.
    fake_openai.script([text("back to normal")])
    await stack.send("errors", "third")
    log = await stack.answered("errors", users=3)
    (reply,) = terminal_items(log, log[-2])
    assert reply.agent == "Solo" and assistant_text(reply) == "back to normal"
    assert len(fake_openai.requests) == 5


# -- CLI -----------------------------------------------------------------------------------


BAD_SPECS = {
    "unknown-target": (
        'entry = "A"\n[[agents]]\nname = "A"\ninstructions = "x"\n'
        '[[agents.handoffs]]\ntarget = "Ghost"\n',
        "targets unknown agent 'Ghost'",
    ),
    "duplicate": (
        'entry = "A"\n[[agents]]\nname = "A"\ninstructions = "x"\n'
        '[[agents]]\nname = "A"\ninstructions = "y"\n',
        "duplicate agent name",
    ),
    "unimportable-tool": (
        'entry = "A"\n[[agents]]\nname = "A"\ninstructions = "x"\n'
        'tools = ["no_such_module_xyz:fn"]\n',
        "no_such_module_xyz",
    ),
}


async def test_bad_specs_and_unknown_agents_fail_at_start(tmp_path: Path) -> None:
    async def run(*args: str) -> tuple[int, str]:
        code, _, err = await run_cli(
            "worker", *args, "--nats-url", "nats://127.0.0.1:1", "--no-embedded",
            env=service_env(tmp_path / "data"),
        )
        return code, err

    cases = []
    for name, (body, _) in BAD_SPECS.items():
        cases.append(run("A", "--agents", str(write_spec(tmp_path / f"{name}.toml", body))))
    cases.append(run("Nobody", "--agents", str(SEED_SPEC)))
    cases.append(run("A", "--agents", str(tmp_path / "missing.toml")))
    results = await asyncio.gather(*cases)
    for (code, err), (name, (_, message)) in zip(results, BAD_SPECS.items(), strict=False):
        assert code == 2, (name, err)
        assert message in err and f"{name}.toml" in err, (name, err)
        assert "Traceback" not in err
    code, err = results[3]
    assert code == 2 and "unknown agent 'Nobody'" in err and "Triage" in err
    code, err = results[4]
    assert code == 2 and "cannot read spec file" in err


async def test_convlog_send_prints_the_turn_with_agent_names_and_times_out(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(support_responder)
    await stack.start_workers(stack.worker("Triage", SEED_SPEC), stack.worker("L1Billing", SEED_SPEC))

    async def send(*args: str) -> tuple[int, str, str]:
        return await run_cli("send", *args, "--nats-url", stack.server.url, "--no-embedded",
                             env=service_env(stack.tmp / "cli"))

    code, out, err = await send("cli-1", "Hi, I was charged twice for my subscription.")
    assert code == 0, (out, err)
    lines = out.splitlines()
    assert len(lines) == 3, lines
    assert "Triage" in lines[0] and "tool call" in lines[0] and "route_to_billing" in lines[0]
    assert "Triage" in lines[1] and "handoff" in lines[1] and "-> L1Billing" in lines[1]
    assert "L1Billing" in lines[2] and "assistant" in lines[2]
    assert "L1Billing answers: Hi, I was charged twice for my subscription." in lines[2]

    # A second message goes straight to L1Billing, the session's active agent now.
    code, out, _ = await send("cli-1", "Thanks")
    assert code == 0 and len(out.splitlines()) == 1 and "L1Billing answers: Thanks" in out

    # No worker plays L2Support: the turn never ends, send gives up with 124.
    started = time.monotonic()
    code, out, err = await send("cli-2", "hello", "--to", "L2Support", "--timeout", "1.5")
    assert code == 124, (out, err)
    assert "did not end within 1.5s" in err
    assert time.monotonic() - started < 15


# -- the offline rules model -------------------------------------------------------------------


async def test_rules_model_plays_the_seed_conversation_through_real_workers(
    stack: WorkerStack,
) -> None:
    procs = await stack.start_workers(
        *(stack.worker(a, SEED_SPEC, openai=False) for a in ("Triage", "L1Billing", "L1Technical", "L2Support"))
    )
    assert all("NOT an LLM" in p.output() and "convlog-rules-model" in p.output() for p in procs)

    async def play(sid: str, messages: tuple[str, ...]) -> list[Envelope]:
        for n, message in enumerate(messages, 1):
            await stack.send(sid, message)
            log = await stack.answered(sid, users=n)
        return log

    seed, escalation = await asyncio.gather(
        play("rules-seed", SEED_CONVERSATION), play("rules-escalation", ESCALATION_CONVERSATION)
    )

    # The seed: Triage routes to billing, L1Billing answers all four, the last confirms $29.99.
    users = [e for e in seed if is_user(e)]
    replies = [terminal_items(seed, u)[0] for u in users]
    assert [r.agent for r in replies] == ["L1Billing"] * 4
    calls = [(e.agent, e.data["name"]) for e in seed if e.data.get("type") == "function_call"]
    assert calls == [("Triage", "route_to_billing")]
    assert "$29.99" in assistant_text(replies[3]) and "refund" in assistant_text(replies[3]).lower()

    # The escalation: Triage -> L1Billing -> L2Support in one turn, then issue_refund once.
    calls = [(e.agent, e.data["name"]) for e in escalation if e.data.get("type") == "function_call"]
    assert calls == [("Triage", "route_to_billing"), ("L1Billing", "escalate_to_senior"),
                     ("L2Support", "issue_refund")]
    refund = next(e for e in escalation if e.data.get("type") == "function_call_output"
                  and "Refund RF-" in e.data["output"])
    assert json.loads(next(e for e in escalation if e.data.get("name") == "issue_refund")
                      .data["arguments"])["amount"] == 120.0
    users = [e for e in escalation if is_user(e)]
    assert [terminal_items(escalation, u)[0].agent for u in users] == ["L2Support"] * 3
    assert refund.agent == "L2Support"


async def test_workers_and_the_log_service_serve_turns_on_the_public_nats_seam(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # CONVLOG_NATS_SEAM=public: every convlog process on nats-py's public API only.
    async with worker_stack(nats_server, tmp_path, None, nats_seam="public") as stack:
        assert stack.service._seam is PUBLIC
        public = {"CONVLOG_NATS_SEAM": "public"}
        await stack.start_workers(
            *(stack.worker(a, SEED_SPEC, openai=False, extra_env=public) for a in ("Triage", "L1Billing"))
        )
        await stack.send("public-seam", SEED_CONVERSATION[0])
        log = await stack.answered("public-seam", users=1)
    reply = terminal_items(log, next(e for e in log if is_user(e)))[0]
    assert reply.agent == "L1Billing", stack.outputs()
    assert [(e.agent, e.data["name"]) for e in log if e.data.get("type") == "function_call"] == [
        ("Triage", "route_to_billing")
    ]


# -- tools and the loop guard (the turn loop in-process, real log service) ------------------------


async def test_tool_errors_become_outputs_and_the_loop_guard_ends_the_turn(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script([
        tool_call("no_such_tool", {}),
        tool_call("issue_refund", {"amount": -1, "reason": "x"}),
        tool_call("issue_refund", "not json"),
    ])
    fake_openai.responder(lambda r: tool_call("file_bug_report", {"summary": "again"}))
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, load_spec(SEED_SPEC).agent("L2Support"), model, max_steps=5)
    ack = await stack.send("guard", "please loop")
    part = TurnPart("guard", turn_key(ack.items[0].item_id), ack.items[0].item_order)
    try:
        result = await runner.run(part)
    finally:
        await model.client.close()

    assert (result.outcome, result.model_calls) == ("failed", 5)
    log = await stack.log("guard")
    outputs = [e.data["output"] for e in log if e.data.get("type") == "function_call_output"]
    assert outputs[0] == "error: L2Support has no tool named 'no_such_tool'"
    assert outputs[1] == ("error: issue_refund failed: ValueError: refund amount must be a "
                          "positive number of dollars, got -1")
    assert outputs[2].startswith("error: the arguments of issue_refund are not valid JSON")
    assert outputs[3].startswith("Bug report BUG-") and len(outputs) == 5
    (failure,) = terminal_items(log, log[0])
    assert failure.agent == "system"
    assert failure.data["content"] == "L2Support failed to answer: the turn reached the limit of 5 model calls"
    assert parse_turn_item_id(failure.item_id).step == 6  # type: ignore[union-attr]
