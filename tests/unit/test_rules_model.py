"""The offline rules model plays the seed scenario through the real openai client.

The turn loop is simulated here the way the worker runs it: convert the visible
history to Chat Completions messages, ask the active agent's model, and on a
handoff tool call append ``function_call`` + ``function_call_output``
(``{"assistant": target}``) and let the target continue the same turn.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from services.worker import convert
from services.worker.model import ModelRejected, OpenAIChatModel, make_model_client
from services.worker.rules_model import (
    RULES_MODEL_NAME,
    RulesTransport,
    rules_completion,
    rules_openai_client,
)
from services.worker.scenario import ESCALATION_CONVERSATION, SEED_CONVERSATION
from services.worker.spec import SystemSpec, load_spec
from services.worker.tools import IDEMPOTENCY_KEY, takes_idempotency_key

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Turn:
    """What one user message produced."""

    user: str
    agents: list[str] = field(default_factory=list)  # every agent that took part, in order
    handoffs: list[tuple[str, str, str]] = field(default_factory=list)  # (from, tool, to)
    tool_calls: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    replies: list[tuple[str, str]] = field(default_factory=list)  # (agent, text)

    @property
    def reply(self) -> str:
        assert len(self.replies) == 1, f"expected exactly one reply, got {self.replies}"
        return self.replies[0][1]

    @property
    def answered_by(self) -> str:
        return self.replies[-1][0]


class RecordingTransport(RulesTransport):
    """The rules transport, keeping every request body the openai client sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.bodies.append(json.loads(await request.aread()))
        return await super().handle_async_request(request)


async def play(
    system: SystemSpec, messages: tuple[str, ...] | list[str], model: OpenAIChatModel
) -> list[Turn]:
    """Play user messages through the simulated turn loop; return one Turn per message."""
    items: list[dict[str, Any]] = []
    active = system.entry
    turns = []
    for n, text in enumerate(messages):
        turn = Turn(user=text)
        items.append(convert.user_message_item(text))
        for step in range(8):  # a loop guard, as the worker has
            agent = system.agent(active)
            if active not in turn.agents:
                turn.agents.append(active)
            reply = await model.complete(
                model=agent.model,
                messages=convert.items_to_chat_messages(
                    convert.agent_system_prompt(agent), items[-agent.history_limit :]
                ),
                tools=convert.agent_tool_schemas(agent),
            )
            assert reply.model == RULES_MODEL_NAME
            if reply.text:
                items.append(convert.assistant_text_item(reply.text, f"t{n}-{step}"))
                turn.replies.append((active, reply.text))
            if not reply.tool_calls:
                break
            for i, call in enumerate(reply.tool_calls):
                items.append(convert.function_call_item(call.id, call.name, call.arguments))
                handoff = agent.handoff_for(call.name)
                if handoff is not None:
                    items.append(
                        convert.function_call_output_item(
                            call.id, convert.handoff_output(handoff.target)
                        )
                    )
                    turn.handoffs.append((active, call.name, handoff.target))
                    active = handoff.target
                    continue
                tool = agent.tool_for(call.name)
                assert tool is not None, f"{active} called an unknown tool {call.name}"
                arguments = json.loads(call.arguments)
                # As the worker does: the call's stable idempotency key, if the tool takes one.
                key = {IDEMPOTENCY_KEY: f"t{n}.{active}.{step}.call{i}"} if takes_idempotency_key(tool.fn) else {}
                output = tool.fn(**arguments, **key)
                if inspect.isawaitable(output):
                    output = await output
                items.append(convert.function_call_output_item(call.id, output))
                turn.tool_calls.append((call.name, arguments, output))
        else:
            pytest.fail(f"turn for {text!r} did not finish")
        turns.append(turn)
    return turns


@pytest.fixture
def support() -> SystemSpec:
    return load_spec(REPO / "deploy" / "agents.toml")


@pytest.fixture
def rules() -> OpenAIChatModel:
    return make_model_client(api_key=None)


def test_scenario_constants() -> None:
    assert SEED_CONVERSATION == (
        "Hi, I was charged twice for my subscription this month.",
        "Yes, I can see two charges of $29.99 on March 1st and March 3rd.",
        "I'd like a refund for the duplicate charge.",
        "The amount is $29.99 — can you process that?",
    )
    assert len(ESCALATION_CONVERSATION) >= 2


async def test_seed_conversation(support: SystemSpec, rules: OpenAIChatModel) -> None:
    t1, t2, t3, t4 = await play(support, SEED_CONVERSATION, rules)

    # 1. Triage routes to billing; L1Billing answers within the same turn.
    assert t1.handoffs == [("Triage", "route_to_billing", "L1Billing")]
    assert t1.answered_by == "L1Billing"
    assert "charged twice" in t1.reply and "subscription" in t1.reply

    # 2-4. L1Billing stays active; each reply carries facts from earlier turns.
    for turn in (t2, t3, t4):
        assert turn.agents == ["L1Billing"] and turn.handoffs == [] and turn.tool_calls == []
    assert "charged twice" in t2.reply  # from message 1
    assert "$29.99" in t2.reply and "March 1st" in t2.reply
    # Message 3 has no amount: the reply takes $29.99 and the dates from message 2.
    assert "$29.99" in t3.reply and "March 3rd" in t3.reply and "confirm" in t3.reply
    # Message 4 ($29.99 <= $50, no dispute): L1 confirms it will process the refund,
    # naming the later charge's date and the subscription from earlier turns.
    assert "I'll process a refund of $29.99" in t4.reply
    assert "March 3rd" in t4.reply and "subscription" in t4.reply


async def test_escalation_conversation(support: SystemSpec, rules: OpenAIChatModel) -> None:
    t1, t2, t3 = await play(support, ESCALATION_CONVERSATION, rules)

    # 1. Triage -> L1Billing -> L2Support in one turn; L2 summarises what it sees.
    assert t1.handoffs == [
        ("Triage", "route_to_billing", "L1Billing"),
        ("L1Billing", "escalate_to_senior", "L2Support"),
    ]
    assert t1.agents == ["Triage", "L1Billing", "L2Support"]
    assert t1.answered_by == "L2Support"
    assert t1.reply.startswith("I can see you reported")
    assert "$120" in t1.reply and "last week" in t1.reply

    # 2. L2Support is still active: it calls issue_refund once, then confirms with the output.
    assert t2.agents == ["L2Support"] and t2.handoffs == []
    ((name, arguments, output),) = t2.tool_calls
    assert name == "issue_refund"
    assert arguments["amount"] == 120.0
    assert "dispute a charge of $120" in arguments["reason"]  # taken from message 1
    assert output in t2.reply
    refund_id = re.search(r"RF-[0-9A-F]{8}", output).group(0)

    # 3. A follow-up is answered from history: the refund id from turn 2, no second refund.
    assert t3.tool_calls == [] and t3.answered_by == "L2Support"
    assert refund_id in t3.reply and "$120" in t3.reply


async def test_technical_path_escalates_and_files_one_bug(
    support: SystemSpec, rules: OpenAIChatModel
) -> None:
    t1, t2, t3 = await play(
        support,
        [
            "The app crashes when I upload a photo.",
            "It still crashes after reinstalling.",
            "Thanks",
        ],
        rules,
    )
    assert t1.handoffs == [("Triage", "route_to_technical", "L1Technical")]
    assert "reinstall" in t1.reply
    assert t2.handoffs == [("L1Technical", "escalate_to_senior", "L2Support")]
    ((name, arguments, output),) = t2.tool_calls
    assert name == "file_bug_report"
    assert "crashes when I upload a photo" in arguments["summary"]
    assert output in t2.reply
    assert t3.tool_calls == []  # once only


async def test_triage_greets_when_it_cannot_route(
    support: SystemSpec, rules: OpenAIChatModel
) -> None:
    (turn,) = await play(support, ["Hello!"], rules)
    assert turn.handoffs == [] and turn.answered_by == "Triage"
    assert "billing" in turn.reply and "technical" in turn.reply


async def test_greeter_example(rules: OpenAIChatModel) -> None:
    system = load_spec(REPO / "deploy" / "greeter.toml")
    t1, t2, t3 = await play(
        system,
        ["Hi there!", "I need help with my billing.", "I was transferred here for billing help."],
        rules,
    )
    assert t1.answered_by == "Greeter" and "help" in t1.reply
    assert t2.handoffs == [("Greeter", "transfer_to_helper", "Helper")]
    assert t2.answered_by == "Helper" and "billing" in t2.reply
    assert t3.answered_by == "Helper" and "you need help with your billing" in t3.reply


async def test_requests_go_through_the_openai_client(support: SystemSpec) -> None:
    transport = RecordingTransport()
    client = openai.AsyncOpenAI(
        api_key="x",
        base_url="http://rules.invalid/v1",
        http_client=httpx2.AsyncClient(transport=transport),
    )
    await play(support, SEED_CONVERSATION[:1], OpenAIChatModel(client))

    first, second = transport.bodies
    assert first["model"] == "gpt-4o-mini"
    assert first["messages"][0]["content"].startswith("You are Triage, ")
    assert [t["function"]["name"] for t in first["tools"]] == [
        "route_to_billing",
        "route_to_technical",
    ]
    assert second["messages"][0]["content"].startswith("You are L1Billing, ")
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": second["messages"][-2]["tool_calls"][0]["id"],
        "content": '{"assistant": "L1Billing"}',
    }


def test_same_request_same_response() -> None:
    request = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are Triage, one of several agents."},
            {"role": "user", "content": SEED_CONVERSATION[0]},
        ],
        "tools": [
            {"type": "function", "function": {"name": "route_to_billing", "parameters": {}}},
            {"type": "function", "function": {"name": "route_to_technical", "parameters": {}}},
        ],
    }
    first = rules_completion(json.loads(json.dumps(request)))
    assert first == rules_completion(request)
    assert first["model"] == RULES_MODEL_NAME
    assert "not an LLM" in first["model"]
    (call,) = first["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "route_to_billing"
    assert first["choices"][0]["finish_reason"] == "tool_calls"
    # A different request (one more message) gets a different call id.
    request["messages"].append({"role": "user", "content": "hello?"})
    assert rules_completion(request)["id"] != first["id"]


async def test_full_runs_are_deterministic(support: SystemSpec) -> None:
    runs = [await play(support, ESCALATION_CONVERSATION, make_model_client(None)) for _ in range(2)]
    assert runs[0] == runs[1]


async def test_unsupported_requests_get_openai_errors() -> None:
    client = rules_openai_client()
    with pytest.raises(openai.NotFoundError, match="only POST /chat/completions"):
        await client.models.list()
    with pytest.raises(openai.BadRequestError, match="does not support streaming"):
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    # Through OpenAIChatModel a refused request is a permanent ModelRejected.
    with pytest.raises(ModelRejected, match="HTTP 400"):
        await OpenAIChatModel(client).complete(model="m", messages=[], tools=[])


async def test_concurrent_calls_share_one_client(support: SystemSpec) -> None:
    model = make_model_client(None)
    turns = await asyncio.gather(*(play(support, SEED_CONVERSATION[:2], model) for _ in range(5)))
    assert all(t == turns[0] for t in turns)


async def test_refund_over_50_escalates_and_l2_refunds_in_the_same_turn(
    support: SystemSpec, rules: OpenAIChatModel
) -> None:
    t1, t2 = await play(
        support,
        ["I was billed $75 on my invoice for May 2nd.", "Please refund the $75."],
        rules,
    )
    assert t1.answered_by == "L1Billing" and "$75" in t1.reply and "May 2nd" in t1.reply
    # Over $50: L1 escalates, and L2 (asked for a refund, amount known) issues it at once.
    assert t2.handoffs == [("L1Billing", "escalate_to_senior", "L2Support")]
    ((name, arguments, output),) = t2.tool_calls
    assert (name, arguments["amount"]) == ("issue_refund", 75.0)
    assert t2.answered_by == "L2Support" and output in t2.reply


def test_a_handoff_is_not_repeated_within_a_turn() -> None:
    # Loop guard: an agent handed the turn back will answer instead of routing again.
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "route_to_billing", "arguments": "{}"},
    }
    request = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are Triage, ..."},
            {"role": "user", "content": "I was charged twice"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"assistant": "Triage"}'},
        ],
        "tools": [{"type": "function", "function": {"name": "route_to_billing"}}],
    }
    message = rules_completion(request)["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"]


async def test_a_bug_in_the_rules_is_a_server_error_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(_conversation: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("services.worker.rules_model.decide", broken)
    with pytest.raises(openai.InternalServerError, match="rules model failed"):
        await rules_openai_client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
