"""Human-readable rendering of envelopes, shared by replay, tail, send and demo."""

from __future__ import annotations

import json
import re
from datetime import UTC
from typing import Any

from shared.messages import Envelope

__all__ = ["content_text", "describe", "printable", "render_line"]

# C0 and C1 control characters (and DEL) that whitespace folding leaves in place: ESC and
# CSI start terminal escape sequences, which the log's content must not play on an
# auditor's terminal (erase or overwrite a line, retitle the window, set the clipboard).
# Unicode's bidirectional controls (embeddings, overrides, isolates, marks) reorder what
# follows them on a terminal that does bidi: a message could show its text, or an agent
# name, in an order other than the log's.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: str) -> str:
    """``text`` with every control character (and bidirectional control) shown as its
    ``\\xNN`` (``\\uNNNN``) escape."""
    return _CONTROL.sub(_escape, text)


def content_text(content: Any) -> str:
    """Flatten SDK message content (a string or a list of parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict):
                parts.append(str(p.get("text") or p.get("refusal") or p.get("type", "")))
            else:
                parts.append(str(p))
        return " ".join(x for x in parts if x)
    return json.dumps(content, ensure_ascii=False)


def describe(env: Envelope) -> tuple[str, str]:
    """(role or type, one-line content) of an envelope."""
    d = env.data
    if env.kind == "retract":
        return "retract", f"hides #{d.get('target')}"
    if env.kind == "clear":
        return "clear", "hides every earlier item"
    typ = d.get("type")
    if typ == "function_call":
        return "tool call", f"{d.get('name')}({d.get('arguments', '')})"
    if typ == "function_call_output":
        from shared.routing import parse_handoff_output

        out = d.get("output")
        target = parse_handoff_output(out)
        if target is not None:
            return "handoff", f"-> {target}"
        return "tool result", content_text(out)
    role = d.get("role")
    if role is not None:
        return str(role), content_text(d.get("content"))
    return str(typ or "item"), json.dumps(d, ensure_ascii=False)


def clock(created_at: str) -> str:
    """``HH:MM:SS.mmm`` of an RFC 3339 time, in UTC (as the web console's ``shortTime``);
    the text as it is when it is no such time."""
    from shared.signing import rfc3339_instant

    t = rfc3339_instant(created_at)
    if t is None:
        return created_at
    try:
        return t.astimezone(UTC).strftime("%H:%M:%S.%f")[:12]
    except OverflowError:  # year 1 with an offset east of UTC
        return created_at


def render_line(env: Envelope, *, width: int = 100) -> str:
    """``#order  HH:MM:SS.mmm  agent  role  content`` on one line."""
    role, text = describe(env)
    text = printable(" ".join(text.split()))
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    time_part = printable(clock(env.created_at))
    return f"#{env.item_order:<5} {time_part}  {printable(env.agent):<12} {printable(role):<11} {text}"
