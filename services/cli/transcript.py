"""Follow a session and cut it into turns: what ``convlog demo`` prints.

A turn is everything written in answer to one user message.  Workers give
every item of a turn an id derived from the user item's id
(:mod:`services.worker.turn_ids`), and the turn has ended once the log holds
its ``reply`` item (answered) or its ``fail`` item (a ``system`` item saying
which agent could not answer).  Items of other turns are left out.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from dataclasses import dataclass, field
from typing import Any

from shared.client import LogClient, new_item_id
from shared.messages import Envelope
from shared.signing import writes_as

from .render import content_text, printable

__all__ = ["SessionFollower", "Turn", "handoffs", "render_turn"]


@dataclass
class Turn:
    """One user message and everything the agents wrote in answer.

    Attributes:
        user: the user's text.
        user_order: ``item_order`` of the user item.
        items: the envelopes after the user item, up to the end of the turn.
        outcome: ``answered``, ``failed`` (a ``system`` item) or ``timeout``.
    """

    user: str
    user_order: int
    items: list[Envelope] = field(default_factory=list)
    outcome: str = "timeout"

    @property
    def replies(self) -> list[Envelope]:
        """Assistant message items, in order."""
        return [e for e in self.items if _is_assistant_message(e)]

    @property
    def answered_by(self) -> str | None:
        """The agent whose message ended the turn."""
        return self.replies[-1].agent if self.outcome == "answered" and self.replies else None


def _is_assistant_message(env: Envelope) -> bool:
    d = env.data
    return env.kind == "item" and d.get("role") == "assistant" and d.get("type", "message") == "message"


def _handoff_target(env: Envelope) -> str | None:
    from shared.routing import handoff_target_of

    return handoff_target_of(env.kind, env.data)  # what routing counts as a handoff, nothing else


def handoffs(turn: Turn) -> list[tuple[str, str]]:
    """``(from, to)`` of every handoff in the turn, in order."""
    callers = {e.data.get("call_id"): e.agent for e in turn.items if e.data.get("type") == "function_call"}
    out = []
    for e in turn.items:
        target = _handoff_target(e)
        if target is not None:
            out.append((callers.get(e.data.get("call_id"), e.agent), target))
    return out


class SessionFollower:
    """Follows one session from the start in a background task; hands out turns.

    Use as ``async with SessionFollower(client, sid) as f: turn = await f.turn(text)``.
    """

    def __init__(self, client: LogClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id
        self._queue: asyncio.Queue[Envelope | Exception] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._raised = False  # turn() raised the follower's error

    async def __aenter__(self) -> SessionFollower:
        after = await self.client.last_order(self.session_id)
        self._task = asyncio.create_task(self._pump(after), name=f"follow-{self.session_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            # Not `suppress(CancelledError): await task`: that also swallowed a cancel
            # of the caller itself while the follower wound down (it may wait for a
            # consumer create, shared/follow.py), and the caller ran on.
            await asyncio.wait({self._task})
            error = None if self._task.cancelled() else self._task.exception()
            if error is not None and exc[0] is None and not self._raised:
                raise error  # the follower died of it (a refused read, an item that does not decode)

    async def _pump(self, after: int) -> None:
        try:
            async for env in self.client.follow(self.session_id, after=after, idle_check=1.0):
                self._queue.put_nowait(env)
        except Exception as e:
            self._queue.put_nowait(e)  # what turn() raises, at once: nothing more will come
            raise

    async def _next(self, deadline: float) -> Envelope | None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returned an item that
        # arrived as the caller was cancelled and dropped the cancellation (a SIGTERM to
        # `convlog demo` then went unnoticed); here the item stays queued and it raises.
        try:
            async with asyncio.timeout(remaining):
                got = await self._queue.get()
        except TimeoutError:
            return None
        if isinstance(got, Exception):
            self._queue.put_nowait(got)  # every later turn raises it too
            self._raised = True
            raise got
        return got

    async def turn(self, text: str, *, to: str | None = None, timeout: float = 20.0) -> Turn:  # noqa: ASYNC109
        """Send ``text`` as the user and collect the turn it starts.

        Returns a :class:`Turn` whose ``outcome`` says how it ended; a turn
        that does not end within ``timeout`` seconds has outcome ``timeout``.
        Raises what stopped the follower (the log refusing a read, an item
        that does not decode) as soon as it stops, and without sending once
        it has.
        """
        from services.worker.turn_ids import parse_turn_item_id, turn_key

        task = self._task
        if task is not None and task.done() and not task.cancelled() and (error := task.exception()):
            self._raised = True
            raise error  # before sending: the log would keep a message nobody follows
        item_id = new_item_id()
        key = turn_key(item_id)
        ack = await self.client.send(self.session_id, text, to=to, item_id=item_id)
        turn = Turn(user=text, user_order=ack.items[0].item_order)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            env = await self._next(deadline)
            if env is None:
                return turn  # timeout
            tid = parse_turn_item_id(env.item_id)
            if env.item_order <= turn.user_order or tid is None or tid.turn != key:
                continue  # earlier items, or another turn's
            if not writes_as(tid.agent, env.agent):
                continue  # not the agent's: its worker answers under its next step
            turn.items.append(env)
            if tid.terminal:
                turn.outcome = "answered" if tid.role == "reply" else "failed"
                return turn


def _wrap(prefix: str, text: str, width: int) -> list[str]:
    prefix, text = printable(prefix), printable(" ".join(text.split()))
    return textwrap.wrap(text, width=width, initial_indent=prefix,
                         subsequent_indent=" " * min(len(prefix), 12)) or [prefix.rstrip()]


def _tool_line(call: dict[str, Any], output: Any, agent: str) -> str:
    try:
        args = json.loads(call.get("arguments") or "{}")
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items()) if isinstance(args, dict) else str(args)
    except (ValueError, TypeError, RecursionError):  # not JSON text: an object, nested past the limit
        shown = str(call.get("arguments"))
    return f"[{agent} called {call.get('name')}({shown}) -> {content_text(output)}]"


def render_turn(turn: Turn, *, width: int = 100) -> list[str]:
    """The turn as transcript lines: ``User: ...``, ``[Triage -> L1Billing]``, ``L1Billing: ...``."""
    lines = _wrap("User: ", turn.user, width)
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    for env in turn.items:
        d = env.data
        if d.get("type") == "function_call":
            calls[str(d.get("call_id"))] = (env.agent, d)
            continue
        if d.get("type") == "function_call_output":
            caller, call = calls.get(str(d.get("call_id")), (env.agent, {}))
            target = _handoff_target(env)
            if target is not None:
                lines.append(f"[{caller} -> {target}]")
            else:
                lines.extend(_wrap("  ", _tool_line(call, d.get("output"), caller), width))
            continue
        if env.agent == "system":
            lines.extend(_wrap("system: ", content_text(d.get("content", d)), width))
        elif _is_assistant_message(env):
            lines.extend(_wrap(f"{env.agent}: ", content_text(d.get("content")), width))
    if turn.outcome == "timeout":
        lines.append("(no answer: the turn did not end in time)")
    return lines
