"""What a turn is made of: the part an agent plays, what playing it did, and
the reads it may start with (the types :mod:`.turn` runs and the worker passes)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.messages import Envelope, ReadReply

__all__ = ["Misrouted", "Prefetch", "TurnBusyError", "TurnPart", "TurnResult"]


class TurnBusyError(RuntimeError):
    """The session kept changing under the turn; try the delivery again later."""


class Misrouted(Exception):
    """A part started before its routing check came back, and the check names another agent.

    Nothing was written (a part confirms its routing before its first write);
    the notice goes on to ``active``.
    """

    def __init__(self, active: str) -> None:
        super().__init__(f"the active agent is {active}")
        self.active = active


@dataclass(frozen=True, slots=True)
class TurnPart:
    """The stretch of a turn one agent plays.

    Attributes:
        session_id: the session.
        turn: the turn key (:func:`.turn_ids.turn_key` of the user item's id).
        start: ``item_order`` of the trigger (user message or handoff output).
        after_step: the last step number used before this part (0 for a user
            message; the handoff's step for a continuation).
    """

    session_id: str
    turn: str
    start: int
    after_step: int = 0


@dataclass(frozen=True, slots=True)
class TurnResult:
    """What running a part did.

    Attributes:
        outcome: ``replied``, ``handed_off``, ``failed`` (a system item was
            written), or ``done`` (the log already held this part's end, or
            the user message was retracted or cleared before its turn wrote
            anything: nothing written).
        model_calls: model calls made.
        items_written: items this call appended (duplicates not counted).
        handoff_to: the target of the handoff: for ``handed_off``, and for
            ``done`` when the log shows this part ended with a handoff (its
            notice is published again: it may be what a crash lost).
        handoff_order: the ``item_order`` of that handoff output.
    """

    outcome: str
    model_calls: int = 0
    items_written: int = 0
    handoff_to: str | None = None
    handoff_order: int = 0


@dataclass(frozen=True, slots=True)
class Prefetch:
    """The reads a part starts with, made by the worker alongside its routing check.

    Attributes:
        window: the visible tail (the model's input) and the session's ``last_order``.
        after_trigger: every envelope after the trigger, as far as read.
        complete: ``after_trigger`` reaches the end of the log as read.
    """

    window: ReadReply
    after_trigger: list[Envelope]
    complete: bool
