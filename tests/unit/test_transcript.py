"""The demo's transcript: turns rendered with agent names, handoffs and tool calls."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.cli.transcript import SessionFollower, Turn, handoffs, render_turn
from shared.messages import Envelope


def env(order: int, agent: str, data: dict, item_id: str = "") -> Envelope:
    return Envelope(session_id="s", item_order=order, item_id=item_id or f"id{order}", agent=agent,
                    kind="item", data=data, created_at="2026-03-14T09:30:00.000000Z", hash="0" * 64)


def message(text: str) -> dict:
    return {"type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def test_a_handoff_then_a_reply() -> None:
    turn = Turn(user="I was charged twice.", user_order=1, outcome="answered", items=[
        env(2, "Triage", {"type": "function_call", "call_id": "c1", "name": "route_to_billing",
                          "arguments": "{}"}),
        env(3, "Triage", {"type": "function_call_output", "call_id": "c1",
                          "output": json.dumps({"assistant": "L1Billing"})}),
        env(4, "L1Billing", message("Sorry about that.")),
    ])
    assert handoffs(turn) == [("Triage", "L1Billing")]
    assert turn.answered_by == "L1Billing"
    assert render_turn(turn) == [
        "User: I was charged twice.",
        "[Triage -> L1Billing]",
        "L1Billing: Sorry about that.",
    ]


def test_a_function_tool_is_shown_with_its_result() -> None:
    turn = Turn(user="Refund it.", user_order=5, outcome="answered", items=[
        env(6, "L2Support", {"type": "function_call", "call_id": "c2", "name": "issue_refund",
                             "arguments": json.dumps({"amount": 120.0})}),
        env(7, "L2Support", {"type": "function_call_output", "call_id": "c2", "output": "RF-1 done"}),
        env(8, "L2Support", message("Done: RF-1.")),
    ])
    assert handoffs(turn) == []
    lines = render_turn(turn)
    assert lines[1] == "  [L2Support called issue_refund(amount=120.0) -> RF-1 done]"
    assert lines[2] == "L2Support: Done: RF-1."


def test_failed_and_unanswered_turns_say_so() -> None:
    failed = Turn(user="hi", user_order=1, outcome="failed", items=[
        env(2, "system", {"role": "system", "content": "agent Triage failed: model unavailable"}),
    ])
    assert failed.answered_by is None
    assert render_turn(failed)[1] == "system: agent Triage failed: model unavailable"
    silent = Turn(user="hi", user_order=1)
    assert render_turn(silent)[-1] == "(no answer: the turn did not end in time)"


def test_long_replies_wrap_under_the_agent_name() -> None:
    turn = Turn(user="x", user_order=1, outcome="answered",
                items=[env(2, "L1Billing", message("word " * 60))])
    lines = render_turn(turn, width=60)
    assert lines[1].startswith("L1Billing: word")
    assert all(len(line) <= 60 for line in lines)
    assert all(line.startswith(" " * 11) for line in lines[2:])


def test_terminal_escape_sequences_in_the_log_are_shown_not_played() -> None:
    # Anyone who can send a message writes its content: `convlog replay`, `tail`, `send` and
    # the demo printed ESC (and C1 CSI) as they were, so a message could erase its own line on
    # the auditor's terminal and draw another in its place, or set the window title.
    from services.cli.render import render_line

    forged = "hi\x1b[2K\r#2     09:30:00.000  L1Billing    assistant   Refund approved.\x1b]0;t\x07\x9b2J"
    user = env(1, "user", {"role": "user", "content": forged})
    line = render_line(user, width=0)
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in line), repr(line)
    assert "hi\\x1b[2K" in line and "\\x07\\x9b2J" in line
    agent = env(2, "Bot\x9b2J", message("x\x1bc"))
    assert render_line(agent).split()[2:] == ["Bot\\x9b2J", "assistant", "x\\x1bc"]
    lines = render_turn(Turn(user=forged, user_order=1, outcome="answered", items=[agent]))
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in "".join(lines)), lines


def test_bidirectional_controls_in_the_log_are_shown_not_applied() -> None:
    # A right-to-left override (or an isolate) in a message or an agent name reorders what
    # follows it on a terminal that does bidi: "approved" could read as "devorppa" and a
    # line could show text in another order than the log holds. Shown as escapes instead.
    from services.cli.render import render_line

    user = env(1, "user", {"role": "user", "content": "refund \u202edevorppa\u202c ok \u2067x\u2069"})
    line = render_line(user, width=0)
    assert "refund \\u202edevorppa\\u202c ok \\u2067x\\u2069" in line, repr(line)
    agent = env(2, "Bot\u200f", message("y"))
    assert render_line(agent).split()[2] == "Bot\\u200f"


def test_replay_lines_show_the_time_in_utc_whatever_its_offset() -> None:
    # `convlog replay` cut HH:MM:SS.mmm out of created_at's text: an export whose times
    # carry an offset (RFC 3339 allows it, and the hash chain holds it) showed
    # "10:30:00+01:" for 09:30:00 UTC, and a time without a fraction was printed whole.
    from services.cli.render import render_line

    def at(created_at: str) -> str:
        e = env(1, "user", {"role": "user", "content": "hi"})
        return render_line(Envelope(**{**{f: getattr(e, f) for f in e.__struct_fields__},
                                       "created_at": created_at}), width=0).split()[1]

    assert at("2026-03-14T09:30:00.123456Z") == "09:30:00.123"
    assert at("2026-03-14T10:30:00+01:00") == "09:30:00.000"
    assert at("2026-03-14T04:00:00.5-05:30") == "09:30:00.500"
    assert at("2026-03-14T09:30:00Z") == "09:30:00.000"
    assert at("not-a-time") == "not-a-time"


def test_a_tool_call_whose_arguments_are_not_json_text_is_shown_as_it_is() -> None:
    # `convlog send` and the demo print a turn's tool calls; arguments stored as an object
    # (an app's own item) or nested past the parser's limit raised TypeError/RecursionError
    # out of the transcript: a traceback instead of the turn.
    nested = "[" * 5000 + "]" * 5000
    for arguments, shown in (({"amount": 5}, "{'amount': 5}"), (nested, nested[:50])):
        turn = Turn(user="x", user_order=1, outcome="answered", items=[
            env(2, "L1Billing", {"type": "function_call", "call_id": "c1", "name": "refund", "arguments": arguments}),
            env(3, "L1Billing", {"type": "function_call_output", "call_id": "c1", "output": "done"}),
            env(4, "L1Billing", message("ok")),
        ])
        text = " ".join(render_turn(turn, width=100_000))
        assert "[L1Billing called refund(" + shown in text, text[:300]


async def test_a_turn_cancelled_as_an_item_arrives_is_cancelled_and_keeps_the_item() -> None:
    # On Python 3.11 asyncio.wait_for returned an item that arrived in the same loop
    # turn as the cancel and dropped the cancellation: a SIGTERM to `convlog demo`
    # then went unnoticed and the demo played on.
    follower = SessionFollower(None, "s")  # type: ignore[arg-type]  # only its queue is used
    waiting = asyncio.create_task(follower._next(asyncio.get_running_loop().time() + 10))
    await asyncio.sleep(0)  # now waiting on the queue
    item = env(1, "Triage", message("hello"))
    follower._queue.put_nowait(item)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert follower._queue.get_nowait() is item


async def test_a_caller_cancelled_while_the_follower_winds_down_stays_cancelled() -> None:
    follower = SessionFollower(None, "s")  # type: ignore[arg-type]
    winding_down = asyncio.Event()

    async def pump() -> None:  # as a follower that waits for its consumer create when cancelled
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            winding_down.set()
            await asyncio.sleep(0.2)
            raise

    follower._task = asyncio.create_task(pump())
    await asyncio.sleep(0)
    leaving = asyncio.create_task(follower.__aexit__(None, None, None))
    await winding_down.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.wait({follower._task})
