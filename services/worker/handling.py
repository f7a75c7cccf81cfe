"""What one turn notice makes a worker do: decide, play the part, announce, ack.

:class:`NoticeHandler` takes one notice at a time for a session (the worker's
intake keeps the order and the concurrency): it asks :mod:`.parts` what the
notice means for this agent, forwards it, plays the part with
:class:`~.turn.TurnRunner`, announces a handoff to its target before acking
(so a crash in between is redone from the log), and acks, naks or terms the
message under the policy declared in :mod:`.intake`.  With
``publish_timings`` it also publishes the part's per-phase timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from services import metrics
from services.logfmt import context
from shared import tracing
from shared.failures import Backoff, is_transient
from shared.messages import Envelope
from shared.subjects import Subjects
from shared.work import Notice, was_forwarded

from .parts import Decision, PartFinder, announce_handoff, forward
from .routing import Routing
from .spec import AgentSpec
from .trust import EnvelopeGate
from .turn import Misrouted, TurnBusyError, TurnPart, TurnResult, TurnRunner

__all__ = ["NoticeHandler", "Tally", "term"]

log = logging.getLogger("convlog.worker")

#: Waits before a failed delivery comes back (jittered, so replicas spread out).
_REDELIVERY = Backoff(initial=1.0, maximum=30.0)
#: Notices whose failed deliveries a worker remembers (the oldest are forgotten first).
_FAILURES = 10_000


@dataclass
class Tally:
    """Counters for the shutdown line."""

    delivered: int = 0
    skipped: int = 0
    forwarded: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    naks: int = 0
    errors: int = 0
    resubscribed: int = 0

    def line(self, agent: str) -> str:
        o = self.outcomes
        return (
            f"worker {agent} stopped: {self.delivered} delivered, {self.skipped} skipped, "
            f"{self.forwarded} forwarded, "
            f"{o.get('replied', 0)} replied, {o.get('handed_off', 0)} handed off, "
            f"{o.get('failed', 0)} failed, {o.get('done', 0)} already done, "
            f"{self.naks} nak'd, {self.errors} errors, {self.resubscribed} resubscribes"
        )


class NoticeHandler:
    """Handles notices for one agent (see the module docstring).

    Args:
        nc: the worker's connection.
        subjects: subject names.
        agent: the agent this worker plays.
        runner: plays parts.
        finder: decides what a notice means.
        routing: checkpoints handoffs.
        gate: signature checks of the trigger, when configured.
        max_attempts: deliveries failed with an unexpected error (as this worker saw
            them) before the turn is ended with a ``system`` item; a delivery handed back
            on shutdown or retried after a transient failure is not one.
        publish_timings: publish per-phase timings on ``<prefix>.timings.turn``.
        spawn: runs a fire-and-forget coroutine (the worker keeps its task).
        tally: the counters to add to (the worker's).
    """

    def __init__(self, nc: Client, subjects: Subjects, agent: AgentSpec, runner: TurnRunner,
                 finder: PartFinder, routing: Routing, gate: EnvelopeGate | None, *, max_attempts: int,
                 publish_timings: bool, spawn: Callable[[Any], None], tally: Tally | None = None) -> None:
        self.nc = nc
        self.subjects = subjects
        self.agent = agent
        self.runner = runner
        self.finder = finder
        self.routing = routing
        self.gate = gate
        self.max_attempts = max_attempts
        self.publish_timings = publish_timings
        self.tally = tally if tally is not None else Tally()
        self._spawn = spawn
        #: per notice (session, order, kind): its deliveries that failed here, unexpectedly
        self._failures: OrderedDict[tuple[str, int, str], int] = OrderedDict()

    async def handle(self, msg: Msg, notice: Notice) -> None:
        """Act on one notice; acks, naks or terms ``msg`` (also when cancelled)."""
        self.tally.delivered += 1
        metrics.delivered(self.agent.name, msg)
        arrived = time.time()
        part: TurnPart | None = None
        decision: Decision | None = None
        started = time.perf_counter()
        sid, order = notice.session_id, notice.item_order
        try:
            decision = await self.finder.decide(notice, fresh=self._attempts(msg) == 1,
                                                forwarded=was_forwarded(msg.headers, notice))
            part = decision.part
            if decision.forward_to is not None:
                await forward(self.nc, self.subjects, notice, decision.forward_to, msg.headers)
                self.tally.forwarded += 1
                await msg.ack()
                return
            if part is None:
                if decision.trigger is None and self._attempts(msg) < 3:
                    # The log may not show a fresh commit yet (another instance): look again soon.
                    await self.nak(msg, delay=self._retry_delay(msg))
                    return
                self.tally.skipped += 1
                await msg.ack()
                return
            assert decision.trigger is not None
            if self.gate is not None and (why := self._refusal(part, decision.trigger)) is not None:
                log.error("worker %s: refusing %s #%d: %s", self.agent.name, sid, order, why)
                self.tally.skipped += 1
                await msg.term()
                return
            timings = dict(decision.timings)
            try:
                result = await tracing.traced("convlog.turn", msg.headers, self._play(part, decision, timings),
                                              kind="CONSUMER", agent=self.agent.name, session_id=sid,
                                              turn=part.turn, item_order=part.start)
            except Misrouted as e:  # started before its routing check, which names another agent
                await forward(self.nc, self.subjects, notice, e.active, msg.headers)
                self.tally.forwarded += 1
                await msg.ack()
                return
            self._count(result, part)
            metrics.turn_done(self.agent.name, result, started)
            await msg.ack()
            self._failures.pop((sid, order, notice.kind), None)
            if self.publish_timings:
                self._timings(notice, part, result, arrived, started, timings)
        except asyncio.CancelledError:
            await self.nak(msg, delay=None)  # shutdown: the turn resumes from the log elsewhere
            raise
        except Exception as e:
            if is_transient(e) or isinstance(e, TurnBusyError | nats.errors.Error):
                metrics.turn_failed(self.agent.name, "retry")
                log.warning("worker %s: %s #%d will be retried: %s", self.agent.name, sid, order, e,
                            extra=context(sid, order, self.agent.name))
                await self.nak(msg, delay=self._retry_delay(msg))
                return
            self.tally.errors += 1
            metrics.turn_failed(self.agent.name, "error")
            log.exception("worker %s: failed on %s #%d", self.agent.name, sid, order,
                          extra=context(sid, order, self.agent.name))
            # Failures, not deliveries: JetStream's count also has the deliveries handed back
            # on shutdown and those retried after a transient failure.
            key = (sid, order, notice.kind)
            failures = self._failures.pop(key, 0) + 1
            self._failures[key] = failures
            if len(self._failures) > _FAILURES:
                self._failures.popitem(last=False)
            if part is not None and decision is not None and failures >= self.max_attempts:
                await self._give_up(msg, part, e, decision, failures, started)
            else:
                await self.nak(msg, delay=self._retry_delay(msg))
        finally:
            if decision is not None:
                decision.drop()

    def _refusal(self, part: TurnPart, trigger: Envelope) -> str | None:
        """Why this part must not be played for ``trigger``: its signature, or, for a
        continuation, a handoff output that is not the handing-off agent's own."""
        assert self.gate is not None
        if (why := self.gate.signature_refusal(trigger)) is not None:
            return why
        if part.after_step and (why := self.gate.forged(trigger)) is not None:
            return f"forged: {why}"
        return None

    async def _play(self, part: TurnPart, decision: Decision, timings: dict[str, float]) -> TurnResult:
        result = await self.runner.run(part, first=decision.first, timings=timings, confirm=decision.confirm)
        await self._announce(part, result)  # inside the turn's span: the next part continues its trace
        return result

    async def _announce(self, part: TurnPart, result: TurnResult) -> None:
        """A part that ended with a handoff (now, or before a crash): tell the target."""
        if result.handoff_to is not None and result.handoff_order:
            if result.handoff_to in self.routing.spec.agents:  # routing ignores other handoffs
                self.finder.learn(part.session_id, result.handoff_order, result.handoff_to)
            await announce_handoff(self.nc, self.subjects, part.session_id, result.handoff_to,
                                   result.handoff_order)

    def _timings(self, notice: Notice, part: TurnPart, result: TurnResult, arrived: float,
                 started: float, timings: dict[str, float]) -> None:
        """The per-phase side channel read by ``convlog bench --turns``."""
        record = {"session_id": part.session_id, "turn": part.turn, "agent": self.agent.name,
                  "outcome": result.outcome, "delivery": max(0.0, arrived - notice.ts) if notice.ts else None,
                  "part": time.perf_counter() - started, **timings}
        self._spawn(self.nc.publish(f"{self.subjects.prefix}.timings.turn", msgspec.json.encode(record)))

    async def _give_up(self, msg: Msg, part: TurnPart, error: Exception, decision: Decision,
                       failures: int, started: float) -> None:
        """End a turn that keeps failing with a system item, then ack."""
        reason = f"internal error after {failures} attempts ({type(error).__name__})"

        async def end() -> TurnResult:
            result = await self.runner.run(part, fail_reason=reason, confirm=decision.confirm)
            await self._announce(part, result)
            return result

        try:  # a turn span of its own, in the notice's trace as each failed attempt was
            result = await tracing.traced("convlog.turn", msg.headers, end(), kind="CONSUMER",
                                          agent=self.agent.name, session_id=part.session_id,
                                          turn=part.turn, item_order=part.start)
            self._count(result, part)
            metrics.turn_done(self.agent.name, result, started)
            await msg.ack()
        except Exception:
            log.exception("worker %s: could not record the failure", self.agent.name)
            await self.nak(msg, delay=self._retry_delay(msg))

    def _count(self, result: TurnResult, part: TurnPart) -> None:
        self.tally.outcomes[result.outcome] = self.tally.outcomes.get(result.outcome, 0) + 1
        log.info("worker %s: %s turn %s in %s: %s (%d model calls, %d items)", self.agent.name,
                 "continued" if part.after_step else "started", part.turn, part.session_id,
                 result.outcome + (f" -> {result.handoff_to}" if result.handoff_to else ""),
                 result.model_calls, result.items_written,
                 extra=context(part.session_id, part.start, self.agent.name, part.turn))

    @staticmethod
    def _attempts(msg: Msg) -> int:
        try:
            return int(msg.metadata.num_delivered or 1)
        except Exception:
            return 1

    def _retry_delay(self, msg: Msg) -> float:
        """How long JetStream holds back the next delivery: 0.5-1 s, doubling to 15-30 s."""
        return _REDELIVERY.delay(self._attempts(msg) - 1)

    async def nak(self, msg: Msg, *, delay: float | None) -> None:
        self.tally.naks += 1
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)


async def term(msg: Msg) -> None:
    """Term ``msg`` (a message that is not a notice), ignoring failures."""
    with contextlib.suppress(Exception):
        await msg.term()

