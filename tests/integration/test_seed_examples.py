"""The seed's examples, run for real with ``agents.Runner`` and ``ConvlogSession``.

The seed (``seeds/000_31f5556a7943e51a.txt``) shows code written against the
SDK's ``SQLiteSession``.  Here the same agents run on a convlog session backed
by a real nats-server, the log service and SQLite; only the model is the fake
OpenAI-compatible server.  Two things in the seed are not the SDK's API and are
written the SDK's way: ``Runner.run(..., session=session, session_id=sid)``
becomes one ``ConvlogSession(sid, ...)`` per conversation, and
``session_settings=`` moves from ``Runner.run`` to the session (or ``RunConfig``).

Last, the support conversation runs from several OS processes at once on one
session id: the log must hold one history, contiguous, with nothing lost or
doubled and each process's items where it put them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, RunConfig, Runner, SessionSettings

from shared import ConvlogSession
from shared.chain import verify
from shared.client import LogClient
from shared.messages import Envelope
from tests.support.fake_openai import FakeOpenAI, text, tool_call
from tests.support.procs import REPO_ROOT
from tests.support.seed_agents import (
    SUPPORT_MESSAGES,
    build_greeter_helper,
    build_support_system,
    build_triage_handoffs,
    support_responder,
)


def texts(request: dict[str, Any]) -> str:
    """Everything a model request carried, as one string to search."""
    return json.dumps(request.get("input"), ensure_ascii=False)


def authored(envelopes: list[Envelope]) -> list[tuple[str, str]]:
    return [(e.agent, e.data.get("type") or e.data.get("role")) for e in envelopes]


async def test_greeter_then_helper_share_one_session_id(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    greeter, helper = build_greeter_helper()
    sid = "user-session-001"
    # Two session objects with their own connections, as two services would have.
    greeter_session = ConvlogSession.from_url(sid, url=log_url)
    helper_session = ConvlogSession.from_url(sid, url=log_url)
    fake_openai.script([
        text("Hello! How can I help you today?"),
        text("Of course, let me get you to someone for billing."),
        text("I can see you need billing help; let's sort it out."),
    ])
    try:
        result = await Runner.run(greeter, "Hi there!", session=greeter_session,
                                  hooks=greeter_session.hooks(), run_config=run_config)
        assert result.final_output == "Hello! How can I help you today?"
        await Runner.run(greeter, "I need help with my billing.", session=greeter_session,
                         hooks=greeter_session.hooks(), run_config=run_config)
        result = await Runner.run(helper, "I was transferred here for billing help.",
                                  session=helper_session, hooks=helper_session.hooks(),
                                  run_config=run_config)
        assert result.final_output == "I can see you need billing help; let's sort it out."
    finally:
        await greeter_session.close()
        await helper_session.close()

    helper_request = fake_openai.requests[-1]
    assert "knowledgeable assistant" in helper_request["instructions"]
    sent = texts(helper_request)
    for said in ("Hi there!", "Hello! How can I help you today?", "I need help with my billing.",
                 "Of course, let me get you to someone for billing.",
                 "I was transferred here for billing help."):
        assert said in sent  # the Helper saw the whole Greeter exchange
    assert authored(await log_client.items(sid)) == [
        ("user", "user"), ("Greeter", "message"),
        ("user", "user"), ("Greeter", "message"),
        ("user", "user"), ("Helper", "message"),
    ]


@pytest.mark.parametrize(("tool", "specialist"), [
    ("transfer_to_billing", "BillingAgent"),
    ("transfer_to_technical", "TechnicalAgent"),
])
async def test_triage_hands_off_with_full_history(
    tool: str, specialist: str, log_url: str, log_client: LogClient, fake_openai: FakeOpenAI,
    run_config: RunConfig,
) -> None:
    agents = build_triage_handoffs()
    sid = f"handoff-{specialist.lower()}"
    session = ConvlogSession.from_url(sid, url=log_url)
    fake_openai.script([text("Could you tell me more?"), tool_call(tool, {}),
                        text(f"{specialist} here: I have the full context.")])
    try:
        await Runner.run(agents["triage"], "Something is wrong with my account.",
                         session=session, hooks=session.hooks(), run_config=run_config)
        result = await Runner.run(agents["triage"], "It is about my plan.", session=session,
                                  hooks=session.hooks(), run_config=run_config)
    finally:
        await session.close()
    # If a handoff occurred, result.last_agent is the target agent (the seed's support_flow).
    assert result.last_agent.name == specialist
    assert result.final_output == f"{specialist} here: I have the full context."
    # The specialist's model call carried the whole conversation, including the handoff.
    sent = texts(fake_openai.requests[-1])
    assert "Something is wrong with my account." in sent and "Could you tell me more?" in sent
    assert tool in sent
    envelopes = await log_client.items(sid)
    assert authored(envelopes) == [
        ("user", "user"), ("TriageAgent", "message"),
        ("user", "user"), ("TriageAgent", "function_call"), ("TriageAgent", "function_call_output"),
        (specialist, "message"),
    ]
    handoff_output = envelopes[4].data
    assert json.loads(handoff_output["output"]) == {"assistant": specialist}
    assert handoff_output["call_id"] == envelopes[3].data["call_id"]


async def test_routing_with_shared_sessions(
    log_url: str, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    # The seed's handle_support_request: the app routes on the triage agent's words.
    triage_agent = Agent(name="TriageAgent", instructions="Categorize: BILLING, TECHNICAL, ACCOUNT.")
    billing_agent = Agent(name="BillingAgent", instructions="Review the full history.")
    technical_agent = Agent(name="TechnicalAgent", instructions="Review the full history.")
    agents = {"triage": triage_agent, "billing": billing_agent, "technical": technical_agent}
    session = ConvlogSession.from_url("routing-001", url=log_url)

    async def handle_support_request(message: str, current_agent: str) -> tuple[str, str]:
        result = await Runner.run(agents[current_agent], message, session=session,
                                  hooks=session.hooks(), run_config=run_config)
        output = result.final_output.upper()
        if current_agent == "triage":
            if "BILLING" in output:
                return result.final_output, "billing"
            if "TECHNICAL" in output:
                return result.final_output, "technical"
        return result.final_output, current_agent

    fake_openai.script([text("Category: BILLING"), text("Refund of $29.99 issued.")])
    try:
        _, current = await handle_support_request("I was charged twice.", "triage")
        assert current == "billing"
        reply, current = await handle_support_request("Please refund one.", current)
        assert (reply, current) == ("Refund of $29.99 issued.", "billing")
    finally:
        await session.close()
    sent = texts(fake_openai.requests[-1])
    assert "I was charged twice." in sent and "Category: BILLING" in sent


async def test_support_system_l1_l2_with_limit_50(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    agents = build_support_system()
    sid = "ticket-2026-0314-001"
    settings = SessionSettings(limit=50)
    session = ConvlogSession.from_url(sid, url=log_url, session_settings=settings)
    fake_openai.responder(support_responder)
    answered: list[str] = []
    try:
        current_agent = agents["triage"]
        for msg in SUPPORT_MESSAGES:
            result = await Runner.run(current_agent, msg, session=session,
                                      hooks=session.hooks(), run_config=run_config)
            current_agent = result.last_agent
            answered.append(current_agent.name)
    finally:
        await session.close()
    assert answered == ["L1Billing", "L1Billing", "L2Support", "L2Support"]
    # L2 never has to ask again: its first call carried everything L1 discussed.
    l2_first = next(r for r in fake_openai.requests if "senior support agent" in r["instructions"])
    sent = texts(l2_first)
    for msg in SUPPORT_MESSAGES[:3]:
        assert msg in sent
    assert "route_to_billing" in sent and "escalate_to_senior" in sent
    envelopes = await log_client.items(sid)
    assert [a for a, _ in authored(envelopes) if a != "user"] == [
        "Triage", "Triage", "L1Billing",  # route_to_billing call + output, L1's reply
        "L1Billing",
        "L1Billing", "L1Billing", "L2Support",  # escalate_to_senior call + output, L2's reply
        "L2Support",
    ]
    assert verify(envelopes, session_id=sid) is None


async def test_support_system_sends_at_most_50_items_of_history(
    log_url: str, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    # SessionSettings(limit=50) "prevents unbounded history growth": with 60 earlier items the
    # model gets the newest 50 plus the new message.
    sid = "ticket-long-history"
    session = ConvlogSession.from_url(sid, url=log_url, session_settings=SessionSettings(limit=50))
    earlier = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"earlier {i}"}
               for i in range(60)]
    fake_openai.responder(support_responder)
    try:
        await session.add_items(earlier)
        await Runner.run(build_support_system()["l2_support"], "Any update on my refund?",
                         session=session, hooks=session.hooks(), run_config=run_config)
    finally:
        await session.close()
    sent = fake_openai.requests[0]["input"]
    assert len(sent) == 51
    assert sent[0]["content"] == "earlier 10"
    assert sent[-1] == {"role": "user", "content": "Any update on my refund?"}


async def test_one_conversation_from_several_processes_is_one_history(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    sid = "ticket-shared-by-processes"
    tags = [f"p{n}" for n in range(1, 5)]
    fake_openai.responder(support_responder)
    procs: list[asyncio.subprocess.Process] = []
    try:
        for tag in tags:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.support.seed_conversation",
                "--nats-url", log_url, "--base-url", fake_openai.base_url,
                "--session-id", sid, "--tag", tag, "--wait-go",
                cwd=REPO_ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            ))
        # Every process is connected and waiting; then all start at once.
        async with asyncio.timeout(60):
            for proc in procs:
                assert proc.stdout is not None
                line = await proc.stdout.readline()
                assert b"ready" in line, (line, await proc.stderr.read() if proc.stderr else b"")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        async with asyncio.timeout(120):
            outputs = [await proc.communicate() for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()[-3000:]
        lines = [json.loads(x) for x in out.decode().splitlines() if x.strip()]
        # Each process played the whole seed conversation, L1 then L2.
        assert [x["agent"] for x in lines] == ["L1Billing", "L1Billing", "L2Support", "L2Support"]

    envelopes = await log_client.items(sid)
    # One history: orders 1..N with no gap, one intact hash chain.
    assert [e.item_order for e in envelopes] == list(range(1, len(envelopes) + 1))
    assert verify(envelopes, session_id=sid) is None
    assert all(e.kind == "item" for e in envelopes)
    # Nothing lost, nothing doubled: 12 items per process (4 user messages, 2 handoffs of
    # call + output, 4 replies), each item_id and each user message exactly once.
    assert len(envelopes) == 12 * len(tags)
    assert len({e.item_id for e in envelopes}) == len(envelopes)
    users = [e.data["content"] for e in envelopes if e.data.get("role") == "user"]
    assert sorted(users) == sorted(f"[{t} m{i}] {m}" for t in tags
                                   for i, m in enumerate(SUPPORT_MESSAGES, start=1))
    # Each add_items call landed as one block: call and output of a handoff are neighbours.
    blocks: dict[str, list[int]] = {}
    for env in envelopes:
        blocks.setdefault(env.item_id.rsplit(".", 1)[0], []).append(env.item_order)
    for orders in blocks.values():
        assert orders == list(range(orders[0], orders[0] + len(orders)))
    for i, env in enumerate(envelopes):
        if env.data.get("type") == "function_call":
            assert envelopes[i + 1].data.get("call_id") == env.data["call_id"]
    # Each process's own items are in the order it wrote them.
    for tag in tags:
        replies = [e.data["content"][0]["text"] for e in envelopes
                   if e.data.get("role") == "assistant" and f"[{tag} " in json.dumps(e.data)]
        assert [r.split("]")[0] + "]" for r in replies] == [f"[{tag} m{i}]" for i in range(1, 5)]
