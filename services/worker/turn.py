"""One agent's part of a turn: read the log, call the model, append, repeat.

A turn answers one user message.  It starts with the session's active agent
and moves to another agent on a handoff; each agent's stretch is a *part*,
started by a trigger item (the user message, or the handoff output naming the
agent) and run by that agent's worker.

Exactly one reply per user message, whatever replicas, crashes and
redeliveries happen, rests on four things:

1. **Derived ids.**  Every item the turn writes is named
   ``<turn>.<agent>.<step>.<role>`` (:mod:`.turn_ids`), so writing it again is
   answered ``duplicate``.  A reply, a failure or a handoff-only step is
   appended in one atomic request.
2. **Read, then decide.**  Each step first reads the visible window (the
   model's input, and the session's ``last_order``), then every item after
   the trigger.  A turn with a ``reply`` or ``fail`` item is finished; a part
   with a handoff is over; a turn that has written nothing yet for a user
   message a ``retract`` or ``clear`` hid since is not played (nothing to answer); a step whose ``function_call`` items lack outputs
   is *pending* (below); otherwise the next step number follows the highest
   one in the log.  A redelivered or resumed turn continues where the log
   says, and never repeats a step.
3. **expected_last.**  What the model answered is appended with
   ``expected_last`` = the ``last_order`` the window was read at.  If anything
   was written since (a new user message, another turn, a replica racing on
   the same turn) the append is refused; the part reads again and asks the
   model again, so a reply is always based on the full history and two
   writers can never both add a terminal item to the same turn.  When all
   that was written since is other writers' items that start and belong to
   no turn (an app's or an operator's notes: no user message, no turn-derived
   id, no ``retract`` or ``clear``), the answer stands: it is appended again
   with ``expected_last`` = the newest order read, without asking the model,
   so a session another writer appends to every few milliseconds still gets
   its turns answered.
4. **Write-ahead tool calls.**  A step with function tools commits its
   ``function_call`` items first (the model's text and the calls, with
   ``expected_last``), then runs each tool and appends its
   ``function_call_output`` as soon as the tool returns (by id, without
   ``expected_last``: the call is already decided).  A handoff's output is
   appended after the step's tool outputs, so the next agent starts with
   every output in the log.  A committed call is never asked of the model
   again: a resumed, redelivered or out-raced part finds the pending step and
   runs the tools still missing an output, then calls the model (a call a
   ``retract`` or ``clear`` has hidden meanwhile is not run).  So a tool
   runs once per call unless a worker dies (or stalls past ``ack_wait``)
   between the tool and its output; then it runs again with the same
   idempotency key, the call item's id (see :mod:`.tools` for the contract
   tools follow for an exactly-once effect).

Model failures (:class:`~.model.ModelUnavailable` once its retries are
exhausted, :class:`~.model.ModelRejected`) end the turn with a ``system``
item naming the agent, so the session stays usable.  A loop guard bounds the
model calls of one turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.logfmt import context
from shared import tracing
from shared.client import LogClient
from shared.errors import BadRequestError, ConflictError, InvalidSessionIdError, TooLargeError
from shared.failures import CONFLICT_BACKOFF
from shared.history import retract_target
from shared.messages import AppendItem, AppendReply, Envelope, ReadReply

from .convert import (
    agent_system_prompt,
    agent_tool_schemas,
    assistant_text_item,
    function_call_item,
    items_to_chat_messages,
)
from .model import ModelClient, ModelError, ModelReply
from .routing import handoff_target
from .spec import AgentSpec
from .tools import (
    Call,
    CallLedger,
    Finished,
    PendingStep,
    finish_calls,
    handoff_outputs,
    output_item,
)
from .turn_ids import parse_turn_item_id, turn_item_id
from .turn_types import Misrouted, Prefetch, TurnBusyError, TurnPart, TurnResult

__all__ = [
    "DEFAULT_MAX_STEPS",
    "Misrouted",
    "Prefetch",
    "TurnBusyError",
    "TurnPart",
    "TurnResult",
    "TurnRunner",
    "read_window",
]

log = logging.getLogger("convlog.worker.turn")

DEFAULT_MAX_STEPS = 10
MAX_CALLS_PER_STEP = 1000


@dataclass(slots=True)
class _State:
    window: list[Envelope]
    last_order: int
    newest: int
    last_step: int
    finished: Envelope | None = None
    handoff: tuple[str, int] | None = None
    pending: PendingStep | None = None
    hidden: bool = False  # a retract or clear after the trigger hides it
    taken: set[int] = field(default_factory=set)  # steps of forged items under this agent's ids
    #: (step, i) whose ``out<i>`` id a forged item holds: that call's output cannot be stored
    blocked: set[tuple[int, int]] = field(default_factory=set)
    after: list[Envelope] = field(default_factory=list)  # every envelope after the trigger


@dataclass(slots=True)
class _Refused:
    """A step its append's ``expected_last`` refused: appended again while only
    bystanders (:func:`_bystander`) were written after ``seen``."""

    step: _Step
    step_no: int
    seen: int  # the last_order the step was decided at


@dataclass(slots=True)
class _Step:
    items: list[AppendItem]
    terminal: str | None = None  # "replied" / "failed" when the step ends the turn
    handoff_to: str | None = None
    handoff_item_id: str | None = None


class TurnRunner:
    """Runs parts of turns for one agent.

    Args:
        client: the log client.
        agent: the agent this runner plays.
        model: the model client.
        max_steps: loop guard: most model calls in one turn (all agents).
        tool_timeout: seconds a function tool may run.
        forged: why an item under a turn-derived id is not its agent's own, or
            ``None`` (:meth:`.trust.EnvelopeGate.forged`); such items are skipped.
        max_conflicts: ``expected_last`` conflicts tolerated in one part before
            giving up with :class:`TurnBusyError` (the delivery is retried later).
        seen: told ``(session_id, order)`` of the newest item each read found
            and each append wrote (:meth:`.parts.PartFinder.saw`).
    """

    def __init__(
        self,
        client: LogClient,
        agent: AgentSpec,
        model: ModelClient,
        *,
        max_steps: int = DEFAULT_MAX_STEPS,
        tool_timeout: float = 30.0,
        max_conflicts: int = 20,
        forged: Callable[[Envelope], str | None] | None = None,
        seen: Callable[[str, int], None] | None = None,
    ) -> None:
        self.client = client
        self.agent = agent
        self.model = model
        self.max_steps = max_steps
        self.tool_timeout = tool_timeout
        self.max_conflicts = max_conflicts
        self.forged = forged
        self.seen = seen
        self._prompt = agent_system_prompt(agent)
        self._tools = agent_tool_schemas(agent)

    async def run(
        self, part: TurnPart, *, fail_reason: str | None = None, first: Prefetch | None = None,
        timings: dict[str, float] | None = None, confirm: Callable[[], Awaitable[None]] | None = None,
    ) -> TurnResult:
        """Play ``part`` until it replies, hands off, fails, or turns out done.

        Args:
            part: the part to play.
            fail_reason: end the turn at once with a ``system`` item saying
                this (unless the log shows it finished already).
            first: reads already made for the first step.
            timings: when given, seconds spent are added under
                ``history_read``, ``model`` and ``reply_append`` (and
                ``routing``: the wait for ``confirm``).
            confirm: awaited before the part's first write (a routing check
                still out when the part started; see :mod:`.parts`).

        Raises:
            Misrouted: ``confirm`` names another agent; nothing was written.
            TurnBusyError: too many conflicting writes; retry later.
            ConvlogError: the log refused or did not answer (``UnavailableError``:
                retry later; the ids make the retry safe).
        """
        model_calls = written = conflicts = 0
        clock = timings if timings is not None else {}
        refused: _Refused | None = None
        while True:
            t0 = time.perf_counter()
            state = await tracing.traced("convlog.history_read", None, self._read(part, first))
            first = None
            _add(clock, "history_read", t0)
            if state.finished is not None:
                return TurnResult("done", model_calls, written)
            if state.handoff is not None:
                return TurnResult("done", model_calls, written, *state.handoff)
            if state.hidden and part.after_step == 0 and state.last_step == 0:
                # The user message was retracted or cleared before its turn wrote anything:
                # it is out of what the agents see, so there is nothing to answer.
                return TurnResult("done", model_calls, written)
            if state.pending is not None and fail_reason is None and (
                    call := _blocked(state.pending, state.blocked)) is not None:
                # A forged item holds the id of its output (a user message written under it
                # while the tool ran): the output can never be stored, so the step cannot be
                # finished -- and asking again would run the tool again and again.
                fail_reason = (f"the output of its call to {call.name} cannot be stored: a forged "
                               f"item holds its id")
            if state.pending is not None and fail_reason is None:
                # Committed calls are never asked of the model again: finish them.
                confirm = await _confirmed(confirm, clock)
                done = await self._finish_calls(part, state.pending)
                written += done.written
                if done.handoff is not None:
                    return TurnResult("handed_off", model_calls, written, *done.handoff)
                if done.raced:
                    conflicts = await self._backoff(part, conflicts)
                continue
            step_no = state.last_step + 1
            while step_no in state.taken:
                step_no += 1
            kept, refused = refused, None
            if kept is not None and kept.step_no == step_no and all(
                    _bystander(e) for e in state.after if e.item_order > kept.seen):
                # Only other writers' notes came since the step was decided: it stands.
                step, seen, expected = kept.step, kept.seen, state.newest
            elif state.newest != state.last_order:
                # Written between our two reads: read a consistent view again.
                conflicts = await self._backoff(part, conflicts)
                continue
            else:
                seen = expected = state.last_order
                if fail_reason is not None:
                    step = self._fail(part, step_no, fail_reason)
                elif state.last_step + 1 > self.max_steps:
                    step = self._fail(
                        part, step_no, f"the turn reached the limit of {self.max_steps} model calls"
                    )
                else:
                    model_calls += 1
                    t0 = time.perf_counter()
                    step = await self._model_step(part, step_no, state)
                    _add(clock, "model", t0)
            confirm = await _confirmed(confirm, clock)
            t0 = time.perf_counter()
            try:
                ack = await self._append(part, step, expected)
            except TooLargeError as e:
                step = self._fail(part, step_no, f"its answer was too large to store ({e.message})")
                try:
                    ack = await self._append(part, step, expected)
                except ConflictError:
                    ack = None
            except ConflictError:
                ack = None
            _add(clock, "reply_append", t0)
            if ack is None:
                refused = _Refused(step, step_no, seen)
                conflicts = await self._backoff(part, conflicts)
                continue
            if self.seen is not None and ack.items:
                self.seen(part.session_id, max(i.item_order for i in ack.items))
            if any(i.duplicate for i in ack.items):
                continue  # this step was already in the log: read where the turn stands
            written += len(step.items)
            if step.handoff_to is not None:  # the log service checkpoints the routing
                order = next(i.item_order for i in ack.items if i.item_id == step.handoff_item_id)
                return TurnResult("handed_off", model_calls, written, step.handoff_to, order)
            if step.terminal is not None:
                return TurnResult(step.terminal, model_calls, written)
            # A tool step: its calls are committed; the next read finds them pending and
            # runs their tools, then the model is called with the outputs in the history.

    async def _backoff(self, part: TurnPart, conflicts: int) -> int:
        conflicts += 1
        if conflicts > self.max_conflicts:
            raise TurnBusyError(
                f"session {part.session_id!r} changed {conflicts} times during one turn"
            )
        await asyncio.sleep(CONFLICT_BACKOFF.delay(conflicts))
        return conflicts

    # -- reading ----------------------------------------------------------------
    async def _after(self, part: TurnPart, first: Prefetch | None) -> list[Envelope]:
        if first is not None and first.complete:
            return first.after_trigger
        items = list(first.after_trigger) if first is not None else []
        after = items[-1].item_order if items else part.start
        items += [env async for env in self.client.iter_items(part.session_id, after=after, raw=True)]
        return items

    async def _read(self, part: TurnPart, first: Prefetch | None = None) -> _State:
        """The model's window and where this turn stands (see the module docstring).

        Both reads go out at once, so they may see the log at two moments: when
        the items after the trigger end elsewhere than the window's
        ``last_order`` (``newest != last_order``), something was written
        between them and the part reads again.
        """
        if first is not None:
            rep, after = first.window, await self._after(part, first)
        else:
            rep, after = await asyncio.gather(
                read_window(self.client, part.session_id, self.agent.history_limit),
                self._after(part, None),
            )
        window = [e for e in rep.items if not self._forged(e, part, in_turn=False)]
        last_order = max([rep.last_order, *(e.item_order for e in window)])
        # newest: how far the items after the trigger reach (read at its own moment)
        state = _State(window=window, last_order=last_order, newest=part.start,
                       last_step=part.after_step)
        ledger = CallLedger(self.agent.name)
        for env in after:
            state.newest = max(state.newest, env.item_order)
            ledger.hide(env)
            if env.kind == "clear" or retract_target(env) == part.start:
                state.hidden = True
            tid = parse_turn_item_id(env.item_id)
            if tid is None or tid.turn != part.turn:
                continue
            if self._forged(env, part, in_turn=True):
                if tid.agent == self.agent.name:
                    state.taken.add(tid.step)  # its ids are taken, but it was no model call of the turn
                    if tid.role.startswith("out"):
                        state.blocked.add((tid.step, int(tid.role[3:])))
                continue
            state.last_step = max(state.last_step, tid.step)
            if tid.terminal:
                state.finished = env
            elif tid.role.startswith("out"):
                target = handoff_target(env)
                if target is not None:
                    state.handoff = (target, env.item_order)
            ledger.add(tid, env)
        state.pending = ledger.pending(state.last_step)
        state.after = after
        if self.seen is not None:
            self.seen(part.session_id, max(state.newest, state.last_order))
        return state

    def _forged(self, env: Envelope, part: TurnPart, *, in_turn: bool) -> bool:
        """Whether ``env`` is a forgery to leave out (logged: loudly when it is in this turn)."""
        why = self.forged(env) if self.forged is not None else None
        if why is None:
            return False
        log.log(logging.ERROR if in_turn else logging.WARNING,
                "worker %s: FORGED item %r at %s #%d (%s): %s; it is not this agent's, the turn "
                "does not count it and the model never sees it", self.agent.name, env.item_id,
                env.session_id, env.item_order, why, "in this turn" if in_turn else "in the history",
                extra=context(part.session_id, env.item_order, self.agent.name, part.turn))
        return True

    async def _append(self, part: TurnPart, step: _Step, expected_last: int) -> AppendReply:
        """Append one step atomically.

        Raises:
            ConflictError: the session moved on since ``expected_last`` (also
                when the log calls the request a partly known retry).
            BadRequestError: the log refused the items themselves.
        """
        try:
            return await self.client.append(
                part.session_id, step.items, expected_last=expected_last
            )
        except InvalidSessionIdError:
            raise
        except BadRequestError as e:
            last = await self.client.last_order(part.session_id)
            if last != expected_last:
                raise ConflictError(f"the session moved on: {e.message}", last_order=last) from e
            raise

    # -- one step ---------------------------------------------------------------
    def _item(self, part: TurnPart, step: int, role: str, data: dict[str, Any],
              *, agent: str | None = None) -> AppendItem:
        return AppendItem(
            agent=agent or self.agent.name,
            data=data,
            item_id=turn_item_id(part.turn, self.agent.name, step, role),
        )

    def _fail(self, part: TurnPart, step: int, reason: str) -> _Step:
        content = f"{self.agent.name} failed to answer: {reason}"
        item = self._item(part, step, "fail", {"role": "system", "content": content}, agent="system")
        return _Step(items=[item], terminal="failed")

    async def _model_step(self, part: TurnPart, step: int, state: _State) -> _Step:
        messages = items_to_chat_messages(self._prompt, [e.data for e in state.window])
        try:
            reply = await self.model.complete(
                model=self.agent.model, messages=messages, tools=self._tools
            )
        except ModelError as e:
            log.warning("%s: model failed in session %s: %s", self.agent.name, part.session_id, e,
                        extra=context(part.session_id, part.start, self.agent.name, part.turn))
            return self._fail(part, step, str(e))
        return self._items_for(part, step, reply, state)

    def _items_for(self, part: TurnPart, step: int, reply: ModelReply, state: _State) -> _Step:
        hint = f"{part.turn}.{self.agent.name}.{step}"
        if not reply.tool_calls:
            if not (reply.text or "").strip():  # a reasoning item alone, an empty answer
                return self._fail(part, step, "the model answered with no text and no tool call")
            item = self._item(part, step, "reply", assistant_text_item(reply.text or "", hint))
            return _Step(items=[item], terminal="replied")
        if len(reply.tool_calls) > MAX_CALLS_PER_STEP:  # call<i> ids stop at call999
            return self._fail(part, step, f"the model asked for {len(reply.tool_calls)} tool calls "
                                          f"in one response (at most {MAX_CALLS_PER_STEP})")
        out = _Step(items=[])
        if reply.text:
            out.items.append(self._item(part, step, "msg", assistant_text_item(reply.text, hint)))
        # The window and the whole turn: a window of a few items may no longer hold its calls.
        used_ids = {str(e.data.get("call_id")) for e in (*state.window, *state.after) if "call_id" in e.data}
        calls: list[Call] = []
        for i, call in enumerate(reply.tool_calls):
            # Some servers reuse call ids across responses; pairing needs them unique.
            call_id = call.id if call.id and call.id not in used_ids else f"call_{hint}.{i}"
            used_ids.add(call_id)
            item = self._item(part, step, f"call{i}", function_call_item(call_id, call.name, call.arguments))
            out.items.append(item)
            calls.append(Call(i, call_id, call.name, call.arguments, item.item_id or ""))
        handoffs, target, at = handoff_outputs(self.agent, calls)
        if len(handoffs) < len(calls):
            return out  # tools run once these calls are committed
        # Only handoffs: nothing runs, so the step is written whole, in one request.
        out.items += [output_item(self.agent.name, part.turn, step, c, handoffs[c.index]) for c in calls]
        out.handoff_to = target
        out.handoff_item_id = turn_item_id(part.turn, self.agent.name, step, f"out{at}")
        return out

    async def _finish_calls(self, part: TurnPart, pending: PendingStep) -> Finished:
        """Run the committed calls' missing tools (:func:`.tools.finish_calls`)."""
        return await finish_calls(self.client, self.agent, part.session_id, part.turn, pending,
                                  time_limit=self.tool_timeout)


def _blocked(pending: PendingStep, blocked: set[tuple[int, int]]) -> Call | None:
    """A call of ``pending`` still missing its output whose ``out<i>`` id a forged item holds."""
    return next((c for c in pending.calls
                 if c.index not in pending.done and (pending.step, c.index) in blocked), None)


def _bystander(env: Envelope) -> bool:
    """Whether ``env``, written while a step was decided, leaves the step standing: an
    item that is no user message and no turn's (an app's or an operator's note).  A user
    message, any turn's item (this one's: a replica racing on it), a ``retract`` or a
    ``clear`` makes the model decide again."""
    return env.kind == "item" and env.data.get("role") != "user" \
        and parse_turn_item_id(env.item_id) is None


async def read_window(client: LogClient, session_id: str, limit: int) -> ReadReply:
    """The model's window: the last ``limit`` visible items of ``session_id``, or, when
    they are over one read's reply limit (``too_large``: a few large items), as many of
    the newest as fit -- the window is cut rather than the session's turns stuck."""
    while True:
        try:
            return await client.read(session_id, tail=limit)
        except TooLargeError:
            if limit <= 1:
                raise
            limit //= 2


async def _confirmed(confirm: Callable[[], Awaitable[None]] | None, clock: dict[str, float]) -> None:
    """Wait for ``confirm`` (raises :class:`Misrouted`); ``None``: there is nothing left to wait for."""
    if confirm is not None:
        t0 = time.perf_counter()
        await confirm()
        _add(clock, "routing", t0)


def _add(clock: dict[str, float], key: str, t0: float) -> None:
    clock[key] = clock.get(key, 0.0) + time.perf_counter() - t0
