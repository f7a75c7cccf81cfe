"""What each agent does under the offline rules model (see :mod:`.rules_model`).

Decisions are made from the Chat Completions request alone: the system prompt
(``You are <Agent>, ...`` names the agent), the tools offered and the
messages.  Every agent answers the *latest* user message and draws facts
(amounts, dates, what the user reported) from the earlier history, because
showing that context survives handoffs is the point of the demo.

Roles: ``triage`` routes on billing/technical keywords; ``billing`` (L1)
answers routine billing and escalates refunds over $50 or disputes;
``technical`` (L1) troubleshoots and escalates backend issues or confirmed
bugs; ``senior`` (L2) summarises the history and uses its tools once each;
``greeter``/``helper`` play the seed's first example; anything else gets a
generic history-aware answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .rules_text import (
    BILLING,
    DATE,
    DISPUTE,
    GREETING_ONLY,
    TECHNICAL,
    clip,
    facts,
    first_matching,
    issue,
    last_amount,
    second_person,
    strip_greeting,
    unique,
)

__all__ = ["Conversation", "Decision", "decide"]

_ESCALATE_TECH = re.compile(
    r"\b(backend|confirmed bug|still|do(?:es)?n[’']?t work after|does not work after)\b", re.I
)
_AFFIRM = re.compile(r"^\s*(yes|yeah|yep|sure|ok(?:ay)?|please do|go ahead)\b", re.I)
_DUPLICATE = re.compile(r"\b(twice|duplicate[sd]?|double[sd]?|two charges)\b", re.I)
_AGENT_NAME = re.compile(r"\bYou are ([A-Za-z0-9_-]+)\b")
_REF = re.compile(r"\b(?:RF|BUG|TCK)-[0-9A-F]{8}\b")


@dataclass(frozen=True)
class Decision:
    """Either a text reply or one tool call ``(name, arguments)``."""

    text: str | None = None
    tool: tuple[str, dict[str, Any]] | None = None


@dataclass
class Conversation:
    """The facts of a chat request the rules need."""

    agent: str
    system: str
    tools: list[str]
    users: list[str]
    last_tool_output: tuple[str, str] | None  # (tool name, output) if a tool message is last
    calls_this_turn: list[str] = field(default_factory=list)
    calls_ever: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tool_outputs: list[str] = field(default_factory=list)

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> Conversation:
        """Digest a decoded Chat Completions request body."""
        messages = [m for m in request["messages"] if isinstance(m, dict)]
        system = "\n".join(
            _text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")
        )
        tools = [
            str(t["function"]["name"])
            for t in request.get("tools") or []
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
        match = _AGENT_NAME.search(system)
        convo = cls(
            agent=match.group(1) if match else "",
            system=system,
            tools=tools,
            users=[],
            last_tool_output=None,
        )
        names: dict[str, str] = {}
        for m in messages:
            role = m.get("role")
            if role == "user":
                convo.users.append(_text(m.get("content")))
                convo.calls_this_turn = []
            elif role == "assistant":
                for call in m.get("tool_calls") or []:
                    fn = call.get("function") or {}
                    names[str(call.get("id"))] = str(fn.get("name"))
                    convo.calls_this_turn.append(str(fn.get("name")))
                    convo.calls_ever.append((str(fn.get("name")), _json_obj(fn.get("arguments"))))
            elif role == "tool":
                convo.tool_outputs.append(_text(m.get("content")))
        if messages and messages[-1].get("role") == "tool":
            last = messages[-1]
            convo.last_tool_output = (
                names.get(str(last.get("tool_call_id")), ""),
                _text(last.get("content")),
            )
        return convo

    @property
    def latest(self) -> str:
        return self.users[-1] if self.users else ""

    @property
    def earlier(self) -> list[str]:
        return self.users[:-1]

    def tool(self, *needles: str) -> str | None:
        """The first offered tool whose name contains every needle."""
        return next((t for t in self.tools if all(n in t for n in needles)), None)

    def handoff(self, name: str | None) -> Decision | None:
        """Call handoff tool ``name`` unless unavailable or already called this turn (no loops)."""
        if name is None or name in self.calls_this_turn:
            return None
        return Decision(tool=(name, {}))


def decide(c: Conversation) -> Decision:
    """Pick the reply for conversation ``c``; pure and deterministic."""
    if c.last_tool_output is not None and not _is_handoff_output(c.last_tool_output[1]):
        return Decision(text=_after_tool(c))
    role = _role(c)
    return {
        "triage": _triage,
        "billing": _billing,
        "technical": _technical,
        "senior": _senior,
        "greeter": _greeter,
    }.get(role, _generic)(c)


def _role(c: Conversation) -> str:
    name = c.agent.lower()
    for key, role in (
        ("triage", "triage"),
        ("billing", "billing"),
        ("technical", "technical"),
        ("tech", "technical"),
        ("l2", "senior"),
        ("senior", "senior"),
        ("greet", "greeter"),
        ("helper", "helper"),
    ):
        if key in name:
            return role
    if c.tool("billing") and c.tool("technical"):
        return "triage"
    if c.tool("refund"):
        return "senior"
    if c.tool("escalate"):
        return "billing" if "billing" in c.system.lower() else "technical"
    return "generic"


def _triage(c: Conversation) -> Decision:
    billing, technical = len(BILLING.findall(c.latest)), len(TECHNICAL.findall(c.latest))
    if billing and billing >= technical and (d := c.handoff(c.tool("billing"))):
        return d
    if technical and (d := c.handoff(c.tool("technical"))):
        return d
    return Decision(
        text=(
            "Hello, and welcome to support! I'd be glad to help. Could you tell me a little more "
            "about the issue: is it about billing (a charge, refund or subscription) or a technical "
            "problem (an error, logging in, or using the app)?"
        )
    )


def _billing(c: Conversation) -> Decision:
    latest = c.latest
    refund_asked = any("refund" in u.lower() for u in c.users[-3:])
    amount = last_amount([latest]) or (last_amount(c.users) if refund_asked else None)
    if DISPUTE.search(latest) or (refund_asked and amount is not None and amount > 50):
        if d := c.handoff(c.tool("escalate")):
            return d
    seen = facts(c.users)
    said = issue(c.users)
    if refund_asked and "refund" in latest.lower() and last_amount([latest]) is None:
        if amount is None:
            return Decision(
                text=f"I can help with a refund. Earlier you told me {said}. "
                "What is the amount of the charge you'd like refunded?"
            )
        return Decision(
            text=(
                f"Of course. Earlier you told me {said}, and you found {seen}. The duplicate is "
                f"therefore ${amount:.2f}. Can you confirm ${amount:.2f} is the amount you'd like refunded?"
            )
        )
    if refund_asked and amount is not None:
        dates = DATE.findall(" ".join(c.users))
        which = f" (the later charge, on {dates[-1]})" if len(dates) >= 2 else ""
        return Decision(
            text=(
                f"Yes, I'll process a refund of ${amount:.2f} for the duplicate charge{which}. "
                f"To recap the history: {said}, and you found {seen}. The refund goes back to "
                "your original payment method within 5-10 business days, and your subscription "
                "itself stays active."
            )
        )
    if last_amount(c.users) is not None and _DUPLICATE.search(" ".join(c.users)):
        return Decision(
            text=(
                f"Thanks for checking. So {said}, and you can see {seen}. Two identical charges "
                "in one billing period mean one of them is a duplicate. Would you like me to "
                "refund the duplicate charge?"
            )
        )
    if last_amount(c.users) is not None:
        return Decision(
            text=(
                f"I can see {said}. I can explain what that charge covers, update your "
                "payment method, or look into a refund. Which would you like?"
            )
        )
    return Decision(
        text=(
            f"I'm sorry about that. I can see {said}. To look into it, could you tell me the "
            "amounts and dates of the charges as they appear on your statement?"
        )
    )


def _technical(c: Conversation) -> Decision:
    if _ESCALATE_TECH.search(c.latest) and (d := c.handoff(c.tool("escalate"))):
        return d
    lower = " ".join(c.users).lower()
    if "password" in lower or "login" in lower or "log in" in lower:
        steps = (
            "use 'Forgot password' on the sign-in page to get a reset link, check that "
            "caps lock is off, and sign in again with the new password"
        )
    elif "install" in lower:
        steps = (
            "check you have at least 500 MB free, download the latest installer "
            "from the website, and run it again after restarting your device"
        )
    elif "feature" in lower:
        steps = "open Settings > Features to turn it on; it is available on every paid plan"
    else:
        steps = (
            "update the app to the latest version, restart it, clear its cache under "
            "Settings > Storage, and if it keeps happening, reinstall it"
        )
    return Decision(
        text=(
            f"Thanks. I can see {issue(c.users)}. Let's try the basics first: {steps}. "
            "If that doesn't work, tell me what happens and I'll take it further."
        )
    )


def _senior(c: Conversation) -> Decision:
    amount = last_amount(c.users)
    refunded = any(name == c.tool("refund") for name, _ in c.calls_ever)
    wants_refund = "refund" in c.latest.lower() or bool(_AFFIRM.search(c.latest))
    billing_case = any(BILLING.search(u) or DISPUTE.search(u) for u in c.users)
    if billing_case and wants_refund and amount is not None and not refunded and c.tool("refund"):
        reason = f"Customer reported: {strip_greeting(first_matching(c.users, BILLING, DISPUTE))}"
        return Decision(tool=(c.tool("refund"), {"amount": amount, "reason": reason}))
    summary = _summary(c)
    if "ticket" in c.latest.lower() and c.tool("ticket") and not _called(c, "ticket"):
        return Decision(tool=(c.tool("ticket"), {"summary": _case_notes(c)}))
    technical_case = any(TECHNICAL.search(u) for u in c.users)
    if technical_case and not billing_case and c.tool("bug") and not _called(c, "bug"):
        return Decision(tool=(c.tool("bug"), {"summary": _case_notes(c)}))
    refs = unique(_REF.findall(" ".join(c.tool_outputs)))
    if refs:
        extra = (
            " The refund reverses only that charge; your subscription carries on as usual."
            if any(r.startswith("RF-") for r in refs)
            else ""
        )
        return Decision(
            text=(
                f"Following up on what you reported ({issue(c.users)}): that is already in hand "
                f"under {', '.join(refs)}, so there is nothing you need to redo.{extra} "
                "Is there anything else I can help with?"
            )
        )
    offer = (
        (
            f" As senior support I can refund the ${amount:.2f} to your original payment "
            "method right away. Shall I go ahead?"
        )
        if billing_case and amount
        else (" I'll take it from here; tell me if anything has changed since.")
    )
    return Decision(text=f"{summary}{offer}")


def _greeter(c: Conversation) -> Decision:
    if not GREETING_ONLY.match(c.latest) and (
        d := c.handoff(c.tool("helper") or c.tool("transfer"))
    ):
        return d
    return Decision(text="Hello there, and welcome! How can I help you today?")


def _generic(c: Conversation) -> Decision:
    if not c.earlier:
        return Decision(
            text=f'Thanks for your message. You said: "{clip(c.latest)}". How can I help further?'
        )
    latest = (
        ""
        if issue(c.users) == second_person(c.latest)
        else (f' You\'ve now added: "{clip(c.latest.rstrip(".!? "))}".')
    )
    return Decision(
        text=(
            f"I can see the whole conversation so far: {issue(c.users)}.{latest} I'll pick up "
            "from there, so there is no need to repeat anything. What would you like to do first?"
        )
    )


def _after_tool(c: Conversation) -> str:
    _, output = c.last_tool_output or ("", "")
    return (
        f"Done. {output} I went through the full history ({issue(c.users)}), so you don't "
        "need to repeat anything. Is there anything else I can help with?"
    )


def _summary(c: Conversation) -> str:
    reports = [second_person(u) for u in c.users if not GREETING_ONLY.match(u)][-4:]
    reports = reports or ["you need help"]
    escalated = any("escalate" in name for name, _ in c.calls_ever)
    via = " It was escalated to me as senior support, so" if escalated else " So"
    return (
        f"I can see you reported that {'; then that '.join(reports)}.{via} "
        "you won't need to repeat any of it."
    )


def _called(c: Conversation, needle: str) -> bool:
    return any(needle in name for name, _ in c.calls_ever)


def _case_notes(c: Conversation) -> str:
    """Third-person notes for a ticket or bug report: what the user said, in order."""
    said = [f'"{clip(strip_greeting(u))}"' for u in c.users if not GREETING_ONLY.match(u)]
    via = " Escalated by L1 support." if _called(c, "escalate") else ""
    return f"Customer reports: {'; then '.join(said[-4:]) or 'no details'}.{via}"


def _is_handoff_output(output: str) -> bool:
    parsed = _json_obj(output)
    return set(parsed) == {"assistant"}


def _json_obj(raw: Any) -> dict[str, Any]:
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
