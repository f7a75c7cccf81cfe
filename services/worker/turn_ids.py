"""Turn-derived ``item_id``s: how a turn names the items it writes.

A *turn* is everything written in answer to one user message, by one agent
or, through handoffs, by several.  Its key is the user item's ``item_id``
(hashed when too long to leave room for the suffix).  Every item the turn
writes gets the id ``<turn>.<agent>.<step>.<role>``:

* ``step`` counts the model calls of the whole turn (1, 2, ...), across
  handoffs, so ids never repeat within a turn;
* ``role`` is ``msg`` (assistant text while tool calls are pending),
  ``reply`` (the final answer), ``call<i>`` / ``out<i>`` (the i-th tool call
  of the step and its output, handoffs included) or ``fail`` (a ``system``
  item saying the agent could not answer).

Because the ids are derived, a redelivered turn rewrites nothing (the log
answers a known ``item_id`` with ``duplicate``), and anyone reading the log can
tell whether a turn has ended: it has a ``reply`` or a ``fail`` item.  The
worker, ``convlog send`` and tests all read ids through this module.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["TERMINAL_ROLES", "TurnItemId", "parse_turn_item_id", "tool_key", "turn_item_id", "turn_key"]

#: Roles that end a turn.
TERMINAL_ROLES = frozenset({"reply", "fail"})

# Room for ".<agent (<=64)>.<step>.<role>" inside the 200-character ItemId limit.
_MAX_KEY = 100
_AGENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ROLE = re.compile(r"^(?:msg|reply|fail|call\d{1,3}|out\d{1,3})$")


@dataclass(frozen=True, slots=True)
class TurnItemId:
    """A parsed turn-derived id."""

    turn: str
    agent: str
    step: int
    role: str

    @property
    def terminal(self) -> bool:
        """True for the item that ends the turn (its reply or its failure)."""
        return self.role in TERMINAL_ROLES

    def __str__(self) -> str:
        return f"{self.turn}.{self.agent}.{self.step}.{self.role}"


def turn_key(user_item_id: str) -> str:
    """The turn key of the user item ``user_item_id`` (the id itself when short enough)."""
    if len(user_item_id) <= _MAX_KEY:
        return user_item_id
    return "t-" + hashlib.sha256(user_item_id.encode("utf-8")).hexdigest()[:40]


def turn_item_id(turn: str, agent: str, step: int, role: str) -> str:
    """``<turn>.<agent>.<step>.<role>``; ``turn`` is a :func:`turn_key`.

    Raises:
        ValueError: an agent name, step or role that would not parse back.
    """
    if not _AGENT.match(agent) or step < 1 or not _ROLE.match(role):
        raise ValueError(f"cannot derive an item id from agent={agent!r} step={step} role={role!r}")
    return f"{turn}.{agent}.{step}.{role}"


def parse_turn_item_id(item_id: str) -> TurnItemId | None:
    """Parse a turn-derived id, or return ``None`` for any other id."""
    parts = item_id.rsplit(".", 3)
    if len(parts) != 4:
        return None
    turn, agent, step, role = parts
    if not turn or not _AGENT.match(agent) or not step.isdigit() or not _ROLE.match(role):
        return None
    return TurnItemId(turn=turn, agent=agent, step=int(step), role=role)


def tool_key(session_id: str, call_item_id: str) -> str:
    """A function call's idempotency key: ``<session>:<its function_call item_id>``.

    The same on every run, replica and crash.  An ``item_id`` is unique only
    within its session, and a turn's ids derive from the user message's, which
    the sender may choose: the session id makes the key unique across sessions
    (a session id holds no ``:``)."""
    return f"{session_id}:{call_item_id}"
