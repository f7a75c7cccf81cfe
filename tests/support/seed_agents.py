"""The seed's agents and a scripted model for them, for Agents SDK tests.

The agent definitions follow ``seeds/000_31f5556a7943e51a.txt`` (the
Greeter/Helper pair, the triage agent handing off to billing/technical, and
the Triage → L1 → L2 support system).  Only the model is not real: every agent
talks to the fake OpenAI-compatible server (``tests/support/fake_openai.py``)
through the SDK's own ``OpenAIResponsesModel`` and the real ``openai`` client.

:func:`support_responder` plays the support scenario from what the model
request holds, so it also answers requests from several OS processes at once
(see ``tests/support/seed_conversation.py``):

* the Triage agent routes a message about a charge to ``route_to_billing``;
* L1Billing escalates a message about a refund with ``escalate_to_senior``;
* every other request gets ``"<tag> <agent>: ..."`` where ``<tag>`` is the
  ``[...]`` prefix of the newest user message, so each reply can be traced back
  to the message (and process) that caused it.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from typing import Any

from agents import Agent, Model, ModelProvider, OpenAIResponsesModel, handoff
from openai import AsyncOpenAI

from tests.support.fake_openai import Entry, text, tool_call

__all__ = [
    "SUPPORT_MESSAGES",
    "FakeServerProvider",
    "build_greeter_helper",
    "build_support_system",
    "build_triage_handoffs",
    "last_user_text",
    "request_agent",
    "support_responder",
]

SUPPORT_MESSAGES = [
    "Hi, I was charged twice for my subscription this month.",
    "Yes, I can see two charges of $29.99 on March 1st and March 3rd.",
    "I'd like a refund for the duplicate charge.",
    "The amount is $29.99 — can you process that?",
]

_TAG = re.compile(r"^\[[^\]]+\]")


class FakeServerProvider(ModelProvider):
    """Every agent gets the SDK's ``OpenAIResponsesModel`` on the fake server.

    An ``AsyncOpenAI`` client (and its HTTP pool) belongs to one event loop, so
    one is made per loop: ``Runner.run_sync`` in a thread gets its own.
    """

    def __init__(self, base_url: str, *, model: str = "gpt-4o-mini") -> None:
        self.base_url = base_url
        self.model = model
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOpenAI] = (
            weakref.WeakKeyDictionary()
        )

    def get_model(self, model_name: str | None) -> Model:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = AsyncOpenAI(base_url=self.base_url, api_key="test-key", max_retries=0)
            self._clients[loop] = client
        return OpenAIResponsesModel(model=model_name or self.model, openai_client=client)


def build_greeter_helper() -> tuple[Agent[Any], Agent[Any]]:
    """The seed's first example: two agents sharing one session id."""
    greeter = Agent(
        name="Greeter",
        instructions="You warmly greet users and ask how you can help today.",
    )
    helper = Agent(
        name="Helper",
        instructions="""You are a knowledgeable assistant. You can see the full
    conversation history including what the Greeter discussed with the user.
    Continue naturally from where the conversation left off.""",
    )
    return greeter, helper


def build_triage_handoffs() -> dict[str, Agent[Any]]:
    """The seed's handoff-aware pattern: a triage agent with two handoffs."""
    billing_agent = Agent(
        name="BillingAgent",
        instructions="Handle billing inquiries. You have full conversation context.",
    )
    technical_agent = Agent(
        name="TechnicalAgent",
        instructions="Handle technical issues. You have full conversation context.",
    )
    triage_agent = Agent(
        name="TriageAgent",
        instructions="""Understand the user's issue and hand off to the right specialist.
    Use the transfer_to_billing or transfer_to_technical tools.""",
        handoffs=[
            handoff(
                billing_agent,
                tool_name_override="transfer_to_billing",
                tool_description_override="Transfer to billing for payment issues",
            ),
            handoff(
                technical_agent,
                tool_name_override="transfer_to_technical",
                tool_description_override="Transfer to technical for product issues",
            ),
        ],
    )
    return {"triage": triage_agent, "billing": billing_agent, "technical": technical_agent}


def build_support_system() -> dict[str, Agent[Any]]:
    """The seed's shared-context support system: Triage → L1Billing/L1Technical → L2Support.

    The seed writes ``handoff(agent, tool_name=..., tool_description=...)``; the
    SDK's keywords are ``tool_name_override`` / ``tool_description_override``.
    """
    l1_billing = Agent(
        name="L1Billing",
        instructions="""You handle routine billing questions: checking balances,
    explaining charges, updating payment methods. If the issue requires
    a refund over $50 or involves a disputed charge, escalate to L2.""",
        handoffs=[],
    )
    l1_technical = Agent(
        name="L1Technical",
        instructions="""You handle common technical issues: password resets,
    basic troubleshooting, feature explanations. If the issue requires
    backend investigation or is a confirmed bug, escalate to L2.""",
        handoffs=[],
    )
    l2_support = Agent(
        name="L2Support",
        instructions="""You are a senior support agent. You handle escalated issues
    that L1 agents cannot resolve. Review the FULL conversation history to
    understand what has already been tried. Never ask the user to repeat
    steps that are documented in the history.

    You can issue refunds, file bug reports, and make account changes.
    If you cannot resolve the issue, create a ticket for engineering.""",
    )
    l1_billing.handoffs = [
        handoff(
            l2_support,
            tool_name_override="escalate_to_senior",
            tool_description_override="Escalate to senior support for complex billing issues",
        ),
    ]
    l1_technical.handoffs = [
        handoff(
            l2_support,
            tool_name_override="escalate_to_senior",
            tool_description_override="Escalate to senior support for complex technical issues",
        ),
    ]
    triage = Agent(
        name="Triage",
        instructions="""Greet the user and understand their issue.
    Route to billing for payment/subscription issues.
    Route to technical for product/feature issues.""",
        handoffs=[
            handoff(
                l1_billing,
                tool_name_override="route_to_billing",
                tool_description_override="Route to billing support",
            ),
            handoff(
                l1_technical,
                tool_name_override="route_to_technical",
                tool_description_override="Route to technical support",
            ),
        ],
    )
    return {"triage": triage, "l1_billing": l1_billing, "l1_technical": l1_technical,
            "l2_support": l2_support}


def last_user_text(request: dict[str, Any]) -> str:
    """The text of the newest user message in a Responses (or Chat) request."""
    items = request.get("input") or request.get("messages") or []
    if isinstance(items, str):
        return items
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def request_agent(request: dict[str, Any]) -> str:
    """Which seed agent made a request, read from its instructions."""
    instructions = str(request.get("instructions") or "")
    for marker, name in (
        ("senior support agent", "L2Support"),
        ("routine billing questions", "L1Billing"),
        ("common technical issues", "L1Technical"),
        ("Greet the user and understand", "Triage"),
    ):
        if marker in instructions:
            return name
    return "?"


def _handed_off_this_run(request: dict[str, Any]) -> bool:
    """True when the request's last item is a handoff output (the target's first call)."""
    items = request.get("input")
    return bool(
        isinstance(items, list) and items and isinstance(items[-1], dict)
        and items[-1].get("type") == "function_call_output"
    )


def support_responder(request: dict[str, Any]) -> Entry:
    """The support scenario's model, decided from the request alone (see module docstring)."""
    agent = request_agent(request)
    said = last_user_text(request)
    tag_match = _TAG.match(said)
    tag = tag_match.group(0) if tag_match else "[-]"
    lowered = said.lower()
    if not _handed_off_this_run(request):
        if agent == "Triage" and "charged" in lowered:
            return tool_call("route_to_billing", {})
        if agent == "L1Billing" and "refund" in lowered:
            return tool_call("escalate_to_senior", {})
    return text(f"{tag} {agent}: noted ({said[len(tag):][:40].strip()})")
