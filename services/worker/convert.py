"""Conversation items <-> Chat Completions messages, and tool schemas.

The log stores OpenAI Responses input items exactly as the Agents SDK stores
them in a session::

    {"role": "user", "content": "..."}
    {"type": "message", "role": "assistant", "id": "msg_...", "status": "completed",
     "content": [{"type": "output_text", "text": "...", "annotations": []}]}
    {"type": "function_call", "call_id": "call_...", "name": "...", "arguments": "{...}"}
    {"type": "function_call_output", "call_id": "call_...", "output": "..."}

Workers talk to models through Chat Completions, so any OpenAI-compatible
server works.  :func:`items_to_chat_messages` converts a visible-history window
into a valid message list; the ``*_item`` builders produce the items a turn
appends.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from shared.routing import parse_handoff_output

from .spec import AgentSpec, HandoffSpec, ToolSpec

__all__ = [
    "agent_system_prompt",
    "agent_tool_schemas",
    "assistant_text_item",
    "function_call_item",
    "function_call_output_item",
    "function_tool_schema",
    "handoff_output",
    "handoff_tool_schema",
    "items_to_chat_messages",
    "parse_handoff_output",
    "user_message_item",
]


def agent_system_prompt(agent: AgentSpec) -> str:
    """The system prompt for ``agent``: its name and role in the shared session, then its instructions.

    The first line always reads ``You are <name>, ...``: models use it to tell
    their own earlier turns from other agents', and the offline rules model
    uses it to know which agent it is playing.
    """
    return (
        f"You are {agent.name}, one of several agents sharing this conversation with the user. "
        "Earlier messages may come from other agents; continue from the full history "
        "and never ask the user to repeat what is already there.\n\n"
        f"{agent.instructions}"
    )


def items_to_chat_messages(
    instructions: str, items: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Convert SDK-shaped Responses input items into Chat Completions messages.

    The result starts with ``{"role": "system", "content": instructions}``.
    Consecutive ``function_call`` items (and an assistant message right before
    them) become one assistant message with ``tool_calls``; each call's
    ``function_call_output`` becomes a ``tool`` message placed directly after
    it, wherever the output sits in the log (concurrent writers may interleave
    a user message).  Because Chat Completions refuses unpaired tool messages,
    an output whose call is outside the window and a call that has no output
    (yet) are left out.  An output pairs with the earliest call before it under
    its ``call_id`` that has none yet, so a call_id a model server reused in a
    later response is that response's call.  A call's arguments that are not a JSON object
    (the model may write anything there) go as ``{}``.  Item types Chat Completions cannot express
    (reasoning, web search, ...) are skipped.

    Args:
        instructions: the system prompt (see :func:`agent_system_prompt`).
        items: visible history, oldest first.
    """
    items = [i for i in items if isinstance(i, Mapping)]
    # Each output pairs with the earliest call before it with its call_id that has none
    # yet: some model servers reuse ids across responses ("call_0" every time), and a
    # call_id seen before in the window is then a later call, with an output of its own.
    outputs: dict[int, str] = {}  # index of a call in items -> its output's text
    unanswered: dict[str, deque[int]] = {}
    for n, item in enumerate(items):
        if item.get("type") == "function_call":
            unanswered.setdefault(str(item.get("call_id")), deque()).append(n)
        elif item.get("type") == "function_call_output":
            waiting = unanswered.get(str(item.get("call_id")))
            if waiting:
                outputs[waiting.popleft()] = _output_text(item.get("output"))

    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}]
    pending: dict[str, Any] | None = None  # assistant message still collecting tool calls
    pending_outputs: list[str] = []  # the tool messages of its calls, in order

    def flush() -> None:
        nonlocal pending
        if pending is None:
            return
        calls = pending.get("tool_calls", [])
        if pending.get("content") is not None or calls:
            if not calls:
                pending.pop("tool_calls", None)
            messages.append(pending)
            for call, output in zip(calls, pending_outputs, strict=True):
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": output})
        pending = None
        pending_outputs.clear()

    for n, item in enumerate(items):
        kind = item.get("type")
        role = item.get("role")
        if kind == "function_call":
            call_id = str(item.get("call_id"))
            if n not in outputs:
                continue  # an unanswered call would make the request invalid
            if pending is not None and any(c["id"] == call_id for c in pending.get("tool_calls", [])):
                continue  # one response cannot hold an id twice
            if pending is None:
                pending = {"role": "assistant", "content": None, "tool_calls": []}
            pending_outputs.append(outputs[n])
            pending.setdefault("tool_calls", []).append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": str(item.get("name", "")),
                        "arguments": _replayable(item.get("arguments")),
                    },
                }
            )
        elif kind == "function_call_output":
            # Its tool message is emitted right after its call (or dropped when the call is
            # out of the window); a later call belongs to a new model response.
            flush()
        elif role == "assistant" and kind in (None, "message"):
            flush()
            pending = {
                "role": "assistant",
                "content": _content_text(item.get("content")),
                "tool_calls": [],
            }
        elif role in ("user", "system", "developer") and kind in (None, "message"):
            flush()
            messages.append({"role": role, "content": _content_text(item.get("content"))})
        # anything else has no Chat Completions form; skip it
    flush()
    return messages


def user_message_item(content: str) -> dict[str, Any]:
    """A user message item, as the Agents SDK stores one."""
    return {"role": "user", "content": content}


def assistant_text_item(text: str, item_id_hint: str) -> dict[str, Any]:
    """An assistant output message item.

    Args:
        text: the reply text.
        item_id_hint: a turn-derived string; the item's ``id`` is ``msg_<hint>``
            (unchanged if it already starts with ``msg_``), so a redelivered
            turn writes an identical item.
    """
    item_id = item_id_hint if item_id_hint.startswith("msg_") else f"msg_{item_id_hint}"
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def function_call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A ``function_call`` item (a tool call or a handoff made by the model)."""
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


def function_call_output_item(call_id: str, output: str) -> dict[str, Any]:
    """A ``function_call_output`` item answering the call ``call_id``."""
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def handoff_output(target: str) -> str:
    """The output the Agents SDK records for a handoff: ``{"assistant": "<target>"}``."""
    return json.dumps({"assistant": target})


def handoff_tool_schema(handoff: HandoffSpec) -> dict[str, Any]:
    """Chat Completions tool schema of a handoff (a function with no parameters)."""
    return {
        "type": "function",
        "function": {
            "name": handoff.tool_name,
            "description": handoff.tool_description,
            "parameters": {
                "type": "object",
                "properties": {},
                "required": [],
                "additionalProperties": False,
            },
        },
    }


def function_tool_schema(tool: ToolSpec) -> dict[str, Any]:
    """Chat Completions tool schema of a function tool."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters_json_schema,
        },
    }


def agent_tool_schemas(agent: AgentSpec) -> list[dict[str, Any]]:
    """Every tool ``agent`` offers the model: handoffs first, then function tools."""
    return [handoff_tool_schema(h) for h in agent.handoffs] + [
        function_tool_schema(t) for t in agent.tools
    ]


def _content_text(content: Any) -> str:
    """Flatten Responses content (a string or a list of parts) into plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                text = part.get("text", part.get("refusal"))
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    return str(content)


def _replayable(arguments: Any) -> str:
    """A call's arguments as a later request carries them: the JSON object the model
    wrote, or ``{}`` for anything else (text that is no JSON, an array, ...; its output
    already tells the model what was wrong).  Servers that parse the arguments of the
    calls in the history (vLLM turns them into the dicts chat templates expect) refuse
    the whole request otherwise -- every later turn of the session, while the call is
    in the window."""
    text = str(arguments or "{}")
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return "{}"
    return text if isinstance(parsed, dict) else "{}"


def _output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return _content_text(output)
    return json.dumps(output)
