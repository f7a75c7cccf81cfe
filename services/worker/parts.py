"""From a turn notice to the part this agent plays (or to the agent that must).

A notice (:mod:`shared.work`) only names an item.  The worker reads, at once
and concurrently: the trigger and everything after it (raw), the model's
window (the visible tail), and -- for a user message -- the session's active
agent (:mod:`.routing`, computed from the log before that message).  Then:

* a user message whose active agent is this one: play the turn;
* a handoff output (written by a turn) naming this agent: continue the turn;
* a user message another agent must answer (the address was a stale hint):
  forward the notice to that agent's subject;
* anything else: nothing to do.

What the worker acts on is what the log holds -- a notice carries no content
-- and, with a keyring, the trigger's signature is checked
(:class:`~.trust.EnvelopeGate`).  The reads feed the first step of the turn
(:class:`~.turn.Prefetch`), so deciding costs no extra round trip.

A routing check that has not come back when the reads have (the KV bucket,
for a session this worker knows nothing about) does not hold up a young
session's turn when the log already says this agent is active unless a
``to`` says otherwise (following its handoffs from the spec's entry agent
ends at this agent): the part starts
-- the model is asked -- while the check is out, and the part awaits the
check before its first write (:attr:`Decision.confirm`).  Should the check
name another agent after all, nothing was written, the model's answer is
dropped and the notice is forwarded (:class:`~.turn_types.Misrouted`).

A young session (its trigger among the first 32 items) is read whole in that
one read, and its window folded from it (:func:`shared.history.visible`).
Beyond that, a worker keeps each busy session's model window (the visible tail) from its
last turn, as of the ``last_order`` it was read at (for the 2,000 sessions it played
last, and at most 128 MiB of their items' text: windows of tool outputs would
otherwise take gigabytes).  The next turn's one raw
read starts at or before that order, so it brings everything written since:
the window is the kept one plus the new items, cut to ``history_limit`` --
unless a ``retract`` or ``clear`` came (or the read did not reach back
contiguously), and then the window is read from the log again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client

from shared import tracing
from shared.client import LogClient
from shared.history import visible
from shared.messages import Envelope, ReadReply
from shared.subjects import Subjects
from shared.work import Notice, notice_msg_id, now, publish_notice, starts_no_turn, work_subject

from .routing import Routing, handoff_target
from .spec import AgentSpec
from .turn import Prefetch, TurnPart, read_window
from .turn_ids import parse_turn_item_id, turn_key
from .turn_types import Misrouted

__all__ = ["Decision", "PartFinder", "announce_handoff"]

#: Items read after the trigger in the first read (a turn writes a few).
_AFTER_PAGE = 64
#: Sessions whose model window a worker keeps between turns.
_WINDOWS = 2_000
#: Most bytes of item text (strings, as counted by :func:`_weight`) in the windows kept
#: between turns: 2,000 windows of 50 items, half of them 32k-char tool outputs, held
#: 1.7 GB.  The least recently played sessions' windows go first; a session whose window
#: went is read from the log at its next turn, as without the copy.
_WINDOW_BYTES = 128 * 1024 * 1024
_envelope = msgspec.json.Decoder(Envelope)


@dataclass
class Decision:
    """What to do with one notice.

    Attributes:
        part: the part to play, or ``None``.
        forward_to: the agent the notice must go to instead.
        trigger: the trigger as the log holds it (``None``: not in the log).
        first: the reads for the part's first step.
        timings: seconds spent, by phase (``routing``, ``history_read``).
        confirm: for a part started before its routing check came back: awaited
            before the part's first write; raises :class:`~.turn_types.Misrouted`
            when the check names another agent.
        route: the routing check ``confirm`` waits for (:meth:`drop` cancels it).
    """

    part: TurnPart | None = None
    forward_to: str | None = None
    trigger: Envelope | None = None
    first: Prefetch | None = None
    timings: dict[str, float] = field(default_factory=dict)
    confirm: Callable[[], Awaitable[None]] | None = None
    route: asyncio.Future[str] | None = None

    def drop(self) -> None:
        """Cancel a routing check nobody awaits any more (its outcome is not needed)."""
        route, self.route = self.route, None
        if route is not None:
            if route.done():
                if not route.cancelled():
                    route.exception()  # retrieved: a failure is the caller's to report, or moot
            else:
                route.cancel()


def is_user_message(env: Envelope) -> bool:
    data = env.data
    return env.kind == "item" and env.agent == "user" and data.get("role") == "user" \
        and data.get("type", "message") == "message"


class PartFinder:
    """Decides what a notice asks of ``agent``.

    The active agent before a user message at order ``n`` is a fact about the
    log prefix before ``n``, which never changes; so what this worker learnt
    ("after item ``k``, ``X`` is active") stays true, and the next turn of the
    session only has to scan the items after ``k``, which the read of the
    trigger fetches anyway (it starts at ``k``).  A session's first notice from
    a log service that is its only writer carries the fact before item 1 (the
    entry its ``to`` left in the routing bucket, :attr:`shared.work.Notice.entry`),
    believed like the items a notice carries.  Without such a fact (another
    replica played the session, or this worker restarted) it asks
    :meth:`.routing.Routing.active_agent`, concurrently with the reads.

    Args:
        client: reads the log.
        routing: computes the active agent.
        agent: the agent this worker plays.
        remember: sessions whose last known routing fact is kept.
        carried: use the items a notice carries (see :meth:`decide`); off for a
            worker that checks signatures, which reads what it acts on from the log.
    """

    def __init__(self, client: LogClient, routing: Routing, agent: AgentSpec, *, remember: int = 10_000,
                 carried: bool = True) -> None:
        self.client = client
        self.carried = carried
        self.routing = routing
        self.agent = agent
        self.remember = remember
        self._known: OrderedDict[str, tuple[int, str]] = OrderedDict()
        #: per session: (last_order, the visible window as of it), from the last turn's reads
        self._windows: OrderedDict[str, tuple[int, list[Envelope]]] = OrderedDict()
        #: per session: the weight of each item of its kept window (:func:`_weight`)
        self._weights: dict[str, list[int]] = {}
        #: the weight of every kept window
        self.window_bytes = 0
        #: per session: the newest order this worker knows the log holds
        self._newest: OrderedDict[str, int] = OrderedDict()

    def saw(self, session_id: str, order: int) -> None:
        """The log holds item ``order`` of ``session_id`` (this worker read or wrote it)."""
        if order > self._newest.get(session_id, 0):
            self._newest[session_id] = order
            self._newest.move_to_end(session_id)
            if len(self._newest) > _WINDOWS:
                self._newest.popitem(last=False)

    def learn(self, session_id: str, after_order: int, active: str) -> None:
        """Record "after item ``after_order``, ``active`` is the active agent"."""
        old = self._known.get(session_id)
        if old is not None and old[0] >= after_order:
            return
        self._known[session_id] = (after_order, active)
        self._known.move_to_end(session_id)
        if len(self._known) > self.remember:
            self._known.popitem(last=False)

    async def decide(self, notice: Notice, *, fresh: bool = True, forwarded: bool = False) -> Decision:
        """What ``notice`` asks of this agent.

        ``fresh``: the notice's first delivery.  Only then do the items it
        carries stand in for the read of the trigger: they end at the trigger,
        so a turn already (partly) played shows only in the log -- a
        redelivery reads it, and a first delivery that finds the session moved
        on learns it from its append's ``expected_last``.

        ``forwarded``: another worker sent it on here.  Its active agent is then
        looked up afresh (the routing bucket, checked against the log), not taken
        from what this worker learnt: two workers that learnt different facts (a
        session's ``to`` lost from the bucket, one of them restarted) would bounce
        the notice between them, and the work stream drops the second forward to
        the same agent (the same ``Nats-Msg-Id``), leaving the message unanswered.

        Raises: ConvlogError: the log could not be read (the caller retries later)."""
        sid, order = notice.session_id, notice.item_order
        out = Decision()
        known = self._known.get(sid) if notice.kind == "user" and not forwarded else None
        if known is None and fresh and self.carried and not forwarded:
            known = self._first_entry(notice)
        learnt = known  # still where the routing check may start reading, if too far back for the first read
        if known is not None and not order - _AFTER_PAGE // 2 <= known[0] < order:
            known = None  # too far back to scan in the first read
        start = known[0] if known is not None else order - 1
        cached = self._windows.get(sid)
        if cached is not None and not order - _AFTER_PAGE // 2 <= cached[0] < order:
            cached = None
        if cached is not None:
            start = min(start, cached[0])
        young = order <= _AFTER_PAGE // 2
        if young:
            start = 0  # a young session is read whole: the window is folded from it
        routing: asyncio.Future[str] | None = None
        if notice.kind == "user" and known is None:
            routing = asyncio.ensure_future(
                self._timed(out, "routing", self.routing.active_agent(sid, order, known=learnt)))
        if routing is not None:
            out.route = routing
        try:
            await self._decide(notice, out, fresh, known, start, cached, young, routing)
        except BaseException:
            out.drop()
            raise
        if out.confirm is None:
            out.drop()  # decided without the check, or after it
        return out

    async def _decide(self, notice: Notice, out: Decision, fresh: bool, known: tuple[int, str] | None,
                      start: int, cached: tuple[int, list[Envelope]] | None, young: bool,
                      routing: asyncio.Future[str] | None) -> Decision:
        sid, order = notice.session_id, notice.item_order
        t0 = time.perf_counter()
        # Carried items end at the trigger: not enough once the session is known to go further.
        fresh = fresh and self.carried and self._newest.get(sid, 0) <= order
        carried = _carried(notice, start) if fresh else None
        page, window = await asyncio.gather(
            self.client.read(sid, after=start, limit=_AFTER_PAGE, raw=True) if carried is None else _be(carried),
            read_window(self.client, sid, self.agent.history_limit) if cached is None and not young else _none(),
        )
        if window is None and young and not page.more:  # the whole session: fold it here
            window = ReadReply(session_id=sid, items=visible(page.items)[-self.agent.history_limit:],
                               last_order=max([page.last_order, *(e.item_order for e in page.items)]),
                               more=False)
        if window is None:  # the copy kept from the last turn, plus what came since
            window = self._extend(sid, cached, page, start) if cached is not None else None
            if window is None:
                window = await read_window(self.client, sid, self.agent.history_limit)
        self._keep(sid, window, page)
        out.timings["history_read"] = time.perf_counter() - t0
        before = [e for e in page.items if e.item_order < order]
        rest = [e for e in page.items if e.item_order >= order]
        more = page.more
        if more and not rest:  # large items: the page stopped short of the trigger
            after = await self.client.read(sid, after=order - 1, limit=_AFTER_PAGE, raw=True)
            rest, more = list(after.items), after.more
        trigger = rest[0] if rest and rest[0].item_order == order else None
        out.trigger = trigger
        if trigger is None or trigger.kind != "item" or starts_no_turn(trigger.item_id):
            return out  # nothing to answer; a no-turn item's writer answers it (shared.work)
        out.first = Prefetch(window=window, after_trigger=rest[1:], complete=not more)
        if is_user_message(trigger):
            active: str | None = None
            since = [e for e in before if e.item_order > known[0]] if known is not None else []
            if known is not None and len(since) == order - 1 - known[0]:
                active = self.routing.after_handoffs(known[1], since)
            else:
                if routing is None:
                    routing = out.route = asyncio.ensure_future(
                        self._timed(out, "routing", self.routing.active_agent(sid, order, known=known)))
                if not routing.done() and self._mine_unless_routed(before, order):
                    out.part = TurnPart(sid, turn_key(trigger.item_id), order, 0)
                    out.confirm = self._confirmer(sid, order, routing)
                    return out
                active = await routing
            self.learn(sid, order - 1, active)
            if active != self.agent.name:
                out.forward_to = active
                return out
            out.part = TurnPart(sid, turn_key(trigger.item_id), order, 0)
            return out
        target = handoff_target(trigger)
        if target is None:
            return out
        tid = parse_turn_item_id(trigger.item_id)
        if tid is None or tid.step < 1:  # a handoff output not written by a turn (steps count from 1)
            return out
        if target in self.routing.spec.agents:
            self.learn(sid, order, target)
        if target != self.agent.name:
            if target in self.routing.spec.agents:
                out.forward_to = target
            return out
        out.part = TurnPart(sid, tid.turn, order, tid.step)
        return out

    def _first_entry(self, notice: Notice) -> tuple[int, str] | None:
        """The routing fact a session's first notice carries ("before item 1, the
        agent its ``to`` named -- or the spec's entry agent -- is active"), checked as
        :meth:`.routing.Routing.active_agent` checks a checkpoint; ``None``: none."""
        if notice.kind != "user" or notice.item_order != 1 or notice.entry is None:
            return None
        return 0, self.routing.spec_entry(notice.entry)

    def _mine_unless_routed(self, before: list[Envelope], order: int) -> bool:
        """Whether the whole log before ``order`` (``before``) makes this agent the active
        one, the session's entry being the spec's (only a ``to`` can say otherwise)."""
        if [e.item_order for e in before] != list(range(1, order)):
            return False
        return self.routing.after_handoffs(self.routing.spec.entry, before) == self.agent.name

    def _confirmer(self, sid: str, order: int, routing: asyncio.Future[str]) -> Callable[[], Awaitable[None]]:
        async def confirm() -> None:
            active = await routing
            self.learn(sid, order - 1, active)
            if active != self.agent.name:
                raise Misrouted(active)

        return confirm

    def _extend(self, sid: str, cached: tuple[int, list[Envelope]], page: ReadReply,
                start: int) -> ReadReply | None:
        """The window as of ``page``: the kept one plus the visible items read since,
        or ``None`` when only the log can say (a retract or clear, a gap, a long page)."""
        last, items = cached
        orders = [e.item_order for e in page.items]
        if page.more or orders != list(range(start + 1, start + 1 + len(orders))):
            return None
        new = [e for e in page.items if e.item_order > last]
        if any(e.kind != "item" for e in new):
            return None
        window = (items + new)[-self.agent.history_limit:]
        return ReadReply(session_id=sid, items=window, last_order=max([page.last_order, last, *orders]),
                         more=False)

    def _keep(self, sid: str, window: ReadReply, page: ReadReply) -> None:
        """Keep the window for the session's next turn, if both reads saw the same log."""
        newest = max([page.last_order, *(e.item_order for e in page.items)])
        self.saw(sid, newest)
        # Items kept from the last turn are weighed once: only the new ones are weighed here.
        old = self._windows.get(sid)
        weighed = dict(zip(map(id, old[1]), self._weights[sid], strict=True)) if old is not None else {}
        self._forget(sid)
        if window.last_order != newest or page.more:
            return
        weights = [weighed.get(id(e)) or _weight(e.data) for e in window.items]
        size = sum(weights)
        if size > _WINDOW_BYTES:
            return  # alone over the bound (a huge history_limit): read at each turn
        self._windows[sid] = (newest, list(window.items))
        self._weights[sid] = weights
        self.window_bytes += size
        while len(self._windows) > _WINDOWS or self.window_bytes > _WINDOW_BYTES:
            self._forget(next(iter(self._windows)))

    def _forget(self, sid: str) -> None:
        """Drop the window kept for ``sid``, if any."""
        if self._windows.pop(sid, None) is not None:
            self.window_bytes -= sum(self._weights.pop(sid))

    @staticmethod
    async def _timed(out: Decision, key: str, coro: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await coro
        finally:
            out.timings[key] = out.timings.get(key, 0.0) + time.perf_counter() - t0


def _weight(value: Any) -> int:
    """About the bytes ``value`` (an item's ``data``) holds: the length of its strings,
    plus a little per value (its JSON size, within a few bytes per value; Python holds
    about as much for long texts).  Counting lengths, not encoding: a window of 32k-char
    outputs encodes in milliseconds."""
    if isinstance(value, str):
        return len(value) + 8
    if isinstance(value, dict):
        return sum(len(k) + _weight(v) for k, v in value.items()) + 8
    if isinstance(value, list):
        return sum(_weight(v) for v in value) + 8
    return 8


async def _none() -> None:
    return None


async def _be(value: Any) -> Any:
    return value


def _carried(notice: Notice, start: int) -> ReadReply | None:
    """The items ``notice`` carries after ``start``, as a read would page them, or
    ``None`` when they do not reach back to ``start`` contiguously (then: read)."""
    if not notice.items:
        return None
    try:
        items = [_envelope.decode(raw) for raw in notice.items]
    except msgspec.DecodeError:
        return None
    orders = [e.item_order for e in items]
    if (items[0].item_order > start + 1 or orders[-1] != notice.item_order
            or orders != list(range(orders[0], orders[0] + len(orders)))
            or any(e.session_id != notice.session_id for e in items)):
        return None
    return ReadReply(session_id=notice.session_id, items=[e for e in items if e.item_order > start],
                     last_order=notice.item_order, more=False)


async def announce_handoff(
    nc: Client, subjects: Subjects, session_id: str, target: str, order: int
) -> None:
    """Tell ``target`` that the handoff output at ``order`` is its part to play.

    Published (and stored) before the handing-off worker acks its own notice,
    so a crash in between redelivers that notice, the log shows the handoff
    done, and this runs again (the same ``Nats-Msg-Id``: the stream keeps one).
    """
    notice = Notice(session_id=session_id, item_order=order, kind="handoff", ts=now())
    await publish_notice(nc, work_subject(subjects, target), notice, notice_msg_id(session_id, order),
                         headers=tracing.headers())  # the target's turn continues this trace


async def forward(nc: Client, subjects: Subjects, notice: Notice, target: str,
                  headers: dict[str, str] | None = None) -> None:
    """Send a notice on to the agent that must act on it; the trace context of the
    delivered notice (its ``headers``) goes along: the target's turn continues that trace."""
    trace = {k: v for k, v in (headers or {}).items() if k in ("traceparent", "tracestate")}
    await publish_notice(nc, work_subject(subjects, target), notice,
                         notice_msg_id(notice.session_id, notice.item_order, target), headers=trace)
