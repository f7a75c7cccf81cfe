"""Function tools at run time: committed calls, their idempotency keys, their outputs.

The contract for tool authors (also in the README, "Function tools"):

* **When a tool runs.**  The worker first commits the model's
  ``function_call`` item to the log, then runs the tool, then appends its
  ``function_call_output``.  A call in the log is never asked of the model
  again: a turn that is resumed or redelivered to another replica picks up
  the committed call and runs the tool for it, and a user message arriving
  meanwhile changes nothing (one arriving *before* the call is committed makes
  the model decide again, with nothing run yet).  Delivery is therefore
  **at least once**: a worker killed after the
  tool did its work but before the output was committed, or frozen long enough
  for another replica to take the turn over, makes the tool run again *for the
  same call*.
* **The idempotency key.**  Every call has a key that is the same on every
  run of that call, on any replica, after any crash: the session id and the
  ``item_id`` of its ``function_call`` item,
  ``<session>:<turn>.<agent>.<step>.call<i>`` (:func:`.turn_ids.tool_key`;
  an ``item_id`` alone is unique only within its session).  A tool receives it by declaring a keyword parameter
  named ``idempotency_key`` (annotated ``str``, usually ``str = ""`` so the
  function stays callable by hand).  The worker fills it in; it is not part
  of the schema the model sees, and the model cannot choose it.
* **Exactly-once effect** holds when the tool honours the key the way payment
  APIs do (Stripe's ``Idempotency-Key``): the first request with a key does
  the work, every later request with the same key returns the first result
  and does nothing new.  The place that remembers keys must outlive the worker
  (the payment provider, a database row with a unique key), or a crash forgets
  it.  A tool without the parameter gets at-least-once calls.

Every failure of a tool (an exception, a timeout, bad arguments from the
model) becomes the output the model sees, starting with ``error:``.

:func:`finish_calls` is the second half of a write-ahead tool step (the turn
loop in :mod:`.turn` commits the calls): it runs the tools of the calls that
have no output yet and appends each output as soon as its tool returns; a
handoff's output goes last, so the next agent starts with every output in the
log.  :class:`CallLedger` finds such a pending step while the turn reads the log.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services import metrics
from shared import tracing
from shared.client import LogClient
from shared.errors import ConflictError, TooLargeError
from shared.history import retract_target
from shared.messages import AppendItem, AppendReply, Envelope

from .convert import function_call_output_item, handoff_output, parse_handoff_output
from .spec import AgentSpec, ToolSpec
from .toolschema import IDEMPOTENCY_KEY
from .turn_ids import TurnItemId, tool_key, turn_item_id

__all__ = [
    "IDEMPOTENCY_KEY",
    "MAX_TOOL_OUTPUT_CHARS",
    "Call",
    "CallLedger",
    "Finished",
    "PendingStep",
    "finish_calls",
    "handoff_outputs",
    "output_item",
    "run_tool",
    "takes_idempotency_key",
]

MAX_TOOL_OUTPUT_CHARS = 32_000


def takes_idempotency_key(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` declares a keyword-capable ``idempotency_key`` parameter."""
    try:
        param = inspect.signature(fn).parameters.get(IDEMPOTENCY_KEY)
    except (TypeError, ValueError):  # builtins without a signature
        param = None
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


async def run_tool(
    agent: str, tool: ToolSpec | None, name: str, arguments: str, *, key: str, time_limit: float
) -> str:
    """Run the tool ``name`` for one committed call; every failure becomes the output.

    Args:
        agent: the agent making the call (for error texts).
        tool: the agent's tool called ``name``, or ``None`` when it has none.
        name: the function name the model called.
        arguments: the call's JSON arguments, as the model wrote them.
        key: the call's idempotency key (its ``function_call`` item id); passed
            as ``idempotency_key`` when the tool declares that parameter.
        time_limit: seconds the tool may run.

    Returns:
        The output text for the ``function_call_output`` item (at most
        :data:`MAX_TOOL_OUTPUT_CHARS` characters).
    """
    output = await _run(agent, tool, name, arguments, key=key, time_limit=time_limit)
    # A lone surrogate (os.fsdecode of a non-UTF-8 name, in a result or in an error's
    # message) cannot be stored: escape it.
    output = output.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(output) > MAX_TOOL_OUTPUT_CHARS:
        output = output[:MAX_TOOL_OUTPUT_CHARS] + " [truncated]"
    return output


async def _run(
    agent: str, tool: ToolSpec | None, name: str, arguments: str, *, key: str, time_limit: float
) -> str:
    """:func:`run_tool`'s output, before it is made storable."""
    if tool is None:
        return f"error: {agent} has no tool named {name!r}"
    try:
        parsed = json.loads(arguments or "{}")
    except (ValueError, RecursionError) as e:  # RecursionError: nested past the interpreter's limit
        return f"error: the arguments of {name} are not valid JSON: {e}"
    if not isinstance(parsed, Mapping):
        return f"error: the arguments of {name} must be a JSON object"
    kwargs = dict(parsed)
    if IDEMPOTENCY_KEY in kwargs:
        return f"error: {IDEMPOTENCY_KEY} is set by the worker, not in the arguments of {name}"
    if takes_idempotency_key(tool.fn):
        kwargs[IDEMPOTENCY_KEY] = key
    deadline = asyncio.timeout(time_limit)
    try:
        async with deadline:
            if inspect.iscoroutinefunction(tool.fn):
                result = await _in_own_task(tool.fn(**kwargs))
            else:  # a thread, so a slow sync tool never blocks the worker's loop
                result = await _in_own_thread(tool.fn, kwargs, name)
            if inspect.isawaitable(result):
                result = await _in_own_task(result)
    except TimeoutError as e:
        if not deadline.expired():  # the tool's own: a request of its own timed out
            return f"error: {name} failed: {_describe(e)}"
        return f"error: {name} did not finish within {time_limit:g}s"
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise  # the worker is cancelling this turn
        return f"error: {name} failed: CancelledError"  # the tool's own
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # SystemExit: argparse, a sys.exit in
        # a library; KeyboardInterrupt: the tool's own (the worker handles SIGINT itself)
        return f"error: {name} failed: {_describe(e)}"
    try:
        output = result if isinstance(result, str) else json.dumps(result, default=str)
    except Exception as e:  # non-str keys, a circular structure, a failing __str__
        return f"error: {name} returned a value that is not JSON: {type(e).__name__}: {e}"
    if parse_handoff_output(output) is not None:
        output = json.dumps({"result": output})  # a tool's output must not read as a handoff
    return output


def _describe(e: BaseException) -> str:
    """``Type: message`` of a tool's exception, also when its ``__str__`` raises."""
    try:
        return f"{type(e).__name__}: {e}"
    except Exception as broken:
        return f"{type(e).__name__} (its message could not be read: {type(broken).__name__})"


#: async tools still running after the time limit or the turn gave up on them
_ABANDONED: set[asyncio.Future[Any]] = set()


class _Exited(Exception):
    """An async tool's SystemExit or KeyboardInterrupt, carried out of its task."""

    def __init__(self, exit: SystemExit | KeyboardInterrupt) -> None:
        super().__init__()
        self.exit = exit


def _in_own_task(awaitable: Any) -> asyncio.Future[Any]:
    """Run an async tool in a task of its own: the time limit (or the turn's cancellation)
    cancels it without waiting for it, so one that swallows its cancellation (a bare
    ``except`` around a retry) keeps only its task, not the turn."""
    async def guarded() -> Any:
        try:
            return await awaitable
        except (SystemExit, KeyboardInterrupt) as e:  # a task hands them to the loop: the worker would end
            raise _Exited(e) from None

    task = asyncio.ensure_future(guarded())
    _ABANDONED.add(task)
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def settle(t: asyncio.Future[Any]) -> None:
        _ABANDONED.discard(t)
        if t.cancelled():  # the tool's own CancelledError (or ours, passed on below)
            future.cancel()
        elif (e := t.exception()) is not None:  # retrieved even when nobody waits any more
            if not future.done():
                future.set_exception(e.exit if isinstance(e, _Exited) else e)
        elif not future.done():
            future.set_result(t.result())

    def passed_on(f: asyncio.Future[Any]) -> None:
        if f.cancelled():  # timed out, or the turn is cancelled
            task.cancel()
            # Nobody waits for it now, and neither does the exit: asyncio.run waits at
            # its end for every task it cancels, so one that swallows its cancellation
            # (forever) held the process after its shutdown.
            # asyncio's own (private) unregistering, where this Python has it; else the
            # exit waits for such a tool, as before.
            unregister = getattr(asyncio, "_unregister_task", None)
            if unregister is not None:
                unregister(task)

    task.add_done_callback(settle)
    future.add_done_callback(passed_on)
    return future


def _in_own_thread(fn: Callable[..., Any], kwargs: dict[str, Any], name: str) -> asyncio.Future[Any]:
    """Run a sync tool in a thread of its own: one that hangs past its time limit keeps only
    that thread, not one of the loop's default executor (shared by every sync tool and by
    getaddrinfo), so later calls are not queued behind it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    ctx = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if future.done():  # timed out: nobody waits for it any more
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            value = ctx.run(fn, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            ok, value = False, e
        else:
            ok = True
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name=f"tool {name}", daemon=True).start()
    return future


# -- a step's calls ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call of a step (committed, or about to be).

    Attributes:
        index: the ``i`` of its ``call<i>`` / ``out<i>`` item ids.
        call_id: the ``call_id`` pairing the call with its output.
        name: the function the model called.
        arguments: the JSON arguments as the model wrote them.
        key: the ``function_call`` item's id: the call's idempotency key.
    """

    index: int
    call_id: str
    name: str
    arguments: str
    key: str

    @classmethod
    def from_item(cls, index: int, env: Envelope) -> Call:
        """A committed ``function_call`` item (its ``item_id`` is the key)."""
        data = env.data
        arguments = data.get("arguments")
        return cls(
            index=index,
            call_id=str(data.get("call_id") or ""),
            name=str(data.get("name") or ""),
            arguments=arguments if isinstance(arguments, str) else "{}",
            key=env.item_id,
        )


@dataclass(slots=True)
class PendingStep:
    """A step whose calls are in the log and whose outputs are (partly) not.

    Attributes:
        step: the step number.
        calls: every call of the step, by index.
        done: indices whose output is in the log already, or whose call a
            ``retract`` or ``clear`` hid (nothing is run or written for it).
    """

    step: int
    calls: list[Call]
    done: set[int] = field(default_factory=set)


class CallLedger:
    """One agent's calls and outputs in a turn, collected while the log is read.

    A call hidden by a later ``retract`` or ``clear`` (:meth:`hide`) is out of what the
    agents see (README, "Visible history"): its tool is not run, and the step is not
    pending for it."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self._calls: dict[int, dict[int, Envelope]] = {}  # step -> index -> call item
        self._outputs: dict[int, set[int]] = {}  # step -> indices with an output
        self._hidden: set[int] = set()  # orders a retract hides
        self._cleared = 0  # a clear hides every order below it

    def hide(self, env: Envelope) -> None:
        """Note ``env`` if it is a ``retract`` or a ``clear`` (read in order, after the calls)."""
        if env.kind == "clear":
            self._cleared = max(self._cleared, env.item_order)
        elif (target := retract_target(env)) is not None:
            self._hidden.add(target)

    def add(self, tid: TurnItemId, env: Envelope) -> None:
        """Note the turn item ``env`` (id ``tid``) if it is this agent's call or output."""
        if tid.agent != self.agent:
            return
        if tid.role.startswith("call"):
            self._calls.setdefault(tid.step, {})[int(tid.role[4:])] = env
        elif tid.role.startswith("out"):
            self._outputs.setdefault(tid.step, set()).add(int(tid.role[3:]))

    def pending(self, step: int) -> PendingStep | None:
        """Step ``step`` when some of its calls have no output yet, else ``None``
        (a hidden call counts as done: nothing is run or written for it)."""
        calls = self._calls.get(step, {})
        done = self._outputs.get(step, set()) | {
            i for i, env in calls.items() if env.item_order in self._hidden or env.item_order < self._cleared}
        if set(calls) <= done:
            return None
        return PendingStep(step, [Call.from_item(i, env) for i, env in sorted(calls.items())], done)


def handoff_outputs(agent: AgentSpec, calls: list[Call]) -> tuple[dict[int, str], str | None, int]:
    """The outputs of the handoff calls among ``calls``, the target, and its call index.

    The first handoff of a response is the one taken; later ones get an error
    output.  ``({}, None, -1)`` when no call is a handoff.
    """
    outputs: dict[int, str] = {}
    target: str | None = None
    at = -1
    for c in calls:
        handoff = agent.handoff_for(c.name)
        if handoff is None:
            continue
        if target is None:
            target, at = handoff.target, c.index
            outputs[c.index] = handoff_output(target)
        else:
            outputs[c.index] = (f"error: {c.name} ignored: only one handoff per response "
                                f"(this response hands off to {target})")
    return outputs, target, at


def output_item(agent: str, turn: str, step: int, call: Call, output: str) -> AppendItem:
    """The ``function_call_output`` item of ``call`` (id ``<turn>.<agent>.<step>.out<i>``)."""
    return AppendItem(
        agent=agent,
        data=function_call_output_item(call.call_id, output),
        item_id=turn_item_id(turn, agent, step, f"out{call.index}"),
    )


@dataclass(frozen=True, slots=True)
class Finished:
    """What :func:`finish_calls` did.

    Attributes:
        written: items appended (duplicates not counted).
        handoff: ``(target, item_order)`` when this call appended the handoff output.
        raced: another writer holds a different output under one of the ids:
            read the log again.
    """

    written: int = 0
    handoff: tuple[str, int] | None = None
    raced: bool = False


async def finish_calls(
    client: LogClient, agent: AgentSpec, session_id: str, turn: str, pending: PendingStep,
    *, time_limit: float,
) -> Finished:
    """Run the tools of ``pending``'s calls that have no output; append each output.

    Outputs are appended by id, without ``expected_last`` (the calls are
    decided; a new user message in between changes nothing), one request per
    tool as soon as it returns; the handoff outputs go last, in one request.

    Raises:
        ConvlogError: the log refused or did not answer (retrying is safe:
            the outputs' ids are derived).
    """
    handoffs, target, at = handoff_outputs(agent, pending.calls)
    written = 0

    async def append(outputs: list[tuple[Call, str]]) -> AppendReply | None:
        items = [output_item(agent.name, turn, pending.step, c, o) for c, o in outputs]
        try:
            try:
                return await client.append(session_id, items)
            except TooLargeError as e:
                items = [output_item(agent.name, turn, pending.step, c,
                                     f"error: the output of {c.name} was too large to store "
                                     f"({e.message})") for c, _ in outputs]
                return await client.append(session_id, items)
        except ConflictError:
            return None

    for call in pending.calls:
        if call.index in pending.done or call.index in handoffs:
            continue
        tool = agent.tool_for(call.name)
        output = await tracing.traced("convlog.tool", None, run_tool(
            agent.name, tool, call.name, call.arguments, key=tool_key(session_id, call.key),
            time_limit=time_limit), tool=call.name)
        # A name the model made up is not a label value: one series per name has no bound.
        metrics.tool_called(agent.name, call.name if tool is not None else metrics.UNKNOWN_TOOL, output)
        ack = await append([(call, output)])
        if ack is None:
            return Finished(written, None, raced=True)
        written += sum(not i.duplicate for i in ack.items)
    rest = [(c, handoffs[c.index]) for c in pending.calls
            if c.index in handoffs and c.index not in pending.done]
    if not rest:
        return Finished(written)
    ack = await append(rest)
    if ack is None:
        return Finished(written, None, raced=True)
    written += sum(not i.duplicate for i in ack.items)
    handoff_id = turn_item_id(turn, agent.name, pending.step, f"out{at}")
    mine = next((i for i in ack.items if i.item_id == handoff_id and not i.duplicate), None)
    if target is None or mine is None:
        return Finished(written)  # a re-read finds the handoff another writer stored
    return Finished(written, (target, mine.item_order))
