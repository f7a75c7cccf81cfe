"""The agent worker: pull envelopes, decide what this agent must do, run turns.

Every replica of agent ``X`` pulls from the durable consumer shared by ``X``'s
replicas (:mod:`.consumer`).  For each envelope the worker decides whether
``X`` must act:

* a user message whose active agent (:mod:`.routing`, computed from the log
  before that message) is ``X``: ``X`` starts the turn;
* a handoff output written by a turn and naming ``X``: ``X`` continues it;
* anything else: ack and move on.

Sessions run concurrently (at most ``concurrency`` turns at once); the
envelopes of one session are handled one after another, in stream order.
Turn logic and the exactly-once argument live in :mod:`.turn`; the ack policy
is declared in :mod:`.consumer`.

Lifecycle (the shape every convlog process has): ``start()`` connects;
``run()`` returns only when shutdown is complete; ``shutdown()`` is idempotent
and safe before start; ``async with`` works.  Shutdown: stop pulling -> nak
what was fetched but not started (another replica takes it now) -> wait for
running turns up to ``settings.grace`` -> cancel the rest (nak; the turn
resumes from the log on redelivery) -> close -> log a one-line tally.
Signal handlers belong to the entrypoint.

Background loops (pulls, heartbeats, one task per busy session) follow
:mod:`shared.failures`: transient failures are retried with backoff; a fatal
one (an items stream for other subjects, a consumer that cannot be
created, a bug) logs one line, shuts the worker
down and makes ``run()`` raise :class:`~shared.failures.FatalError`, so
``convlog worker`` exits non-zero and its process manager restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from services import metrics
from services.logfmt import context
from shared import nats_connect, tracing
from shared.client import LogClient, connect_options
from shared.codec import decode
from shared.config import Settings
from shared.errors import ConvlogError
from shared.failures import Backoff, Loops, is_transient
from shared.messages import Envelope
from shared.nats_seam import bind
from shared.signing import Signer

from .consumer import AgentConsumer, consumer_name
from .model import ModelClient
from .routing import Routing, handoff_target, open_routing_bucket
from .spec import SystemSpec
from .trust import EnvelopeGate
from .turn import DEFAULT_MAX_STEPS, TurnBusyError, TurnPart, TurnResult, TurnRunner
from .turn_ids import parse_turn_item_id, turn_key

__all__ = ["Tally", "Worker"]

log = logging.getLogger("convlog.worker")

_FETCH_BATCH = 16
#: Waits before a failed delivery comes back (jittered, so replicas spread out).
_REDELIVERY = Backoff(initial=1.0, maximum=30.0)


@dataclass
class Tally:
    """Counters for the shutdown line."""

    delivered: int = 0
    skipped: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    naks: int = 0
    errors: int = 0
    resubscribed: int = 0

    def line(self, agent: str) -> str:
        o = self.outcomes
        return (
            f"worker {agent} stopped: {self.delivered} delivered, {self.skipped} skipped, "
            f"{o.get('replied', 0)} replied, {o.get('handed_off', 0)} handed off, "
            f"{o.get('failed', 0)} failed, {o.get('done', 0)} already done, "
            f"{self.naks} nak'd, {self.errors} errors, {self.resubscribed} resubscribes"
        )


class Worker:
    """Serve one agent of ``spec``.

    Args:
        settings: connection and prefix; ``settings.grace`` bounds shutdown.
        spec: the agent system.
        agent_name: the agent this worker plays.
        model: the model client (the entrypoint builds it; the worker does not close it).
        concurrency: most turns running at once.
        ack_wait: seconds JetStream waits for an ack before redelivering (kept
            alive with in-progress acks while a turn runs).
        max_steps: loop guard: most model calls in one turn.
        tool_timeout: seconds a function tool may run.
        max_attempts: deliveries of one envelope that fail with an unexpected
            error before the turn is ended with a ``system`` item.
        fetch_timeout: seconds one pull waits for messages.

    Raises:
        KeyError: ``agent_name`` is not in ``spec``.
    """

    def __init__(
        self,
        settings: Settings,
        spec: SystemSpec,
        agent_name: str,
        model: ModelClient,
        *,
        concurrency: int = 16,
        ack_wait: float = 30.0,
        max_steps: int = DEFAULT_MAX_STEPS,
        tool_timeout: float = 30.0,
        max_attempts: int = 8,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.spec = spec
        self.agent = spec.agent(agent_name)
        self.model = metrics.instrument_model(model, self.agent.name)
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.max_steps = max_steps
        self.tool_timeout = tool_timeout
        self.max_attempts = max_attempts
        self.fetch_timeout = fetch_timeout
        self.tally = Tally()
        self.nc: Client | None = None
        self.client: LogClient | None = None
        self.routing: Routing | None = None
        self.runner: TurnRunner | None = None
        self.gate: EnvelopeGate | None = None  # what the worker acts on must be in the log
        self.ready = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._max_held = concurrency * 4
        self._held: dict[int, Msg] = {}  # by id(): Msg is not hashable
        self._room = asyncio.Event()
        self._queues: dict[str, deque[tuple[Msg, Envelope]]] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.consumer: AgentConsumer | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._loops = Loops(self.shutdown, log)  # a fatal failure of one stops the worker
        self._started = False
        self._shutdown_started = False

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Connect and start pulling (the consumer is bound as soon as the stream exists)."""
        if self._started or self._shutdown_started:
            return
        self._started = True

        async def reconnected() -> None:
            if self.consumer is not None:  # nats-py #504: never trust a pull binding across reconnects
                self.consumer.mark_stale("reconnected to NATS")

        async def connection_error(e: Exception) -> None:
            log.info("worker %s: NATS connection: %r", self.agent.name, e)

        self.nc = await nats_connect.connect(
            self.settings,
            {
                **connect_options(self.settings, name=f"convlog-worker-{self.agent.name}"),
                "reconnected_cb": reconnected,
                "error_cb": connection_error,
            },
        )
        bind(self.nc, self.settings.nats_seam)
        if self._shutdown_started:  # a signal arrived while connecting
            await self.nc.close()
            return
        self.client = LogClient(
            self.nc, prefix=self.subjects.prefix, timeout=self.settings.request_timeout,
            signer=Signer.load(self.settings.signing_key) if self.settings.signing_key else None,
        )
        self.gate = EnvelopeGate.from_settings(self.client, self.settings, self.agent.name)
        kv = await open_routing_bucket(self.nc, self.subjects, replicas=self.settings.stream_replicas)
        self.routing = Routing(kv, self.client, self.spec, keyring=self.gate.keyring, require=self.gate.require)
        self.runner = TurnRunner(
            self.client, self.agent, self.model,
            max_steps=self.max_steps, tool_timeout=self.tool_timeout, forged=self.gate.forged,
        )
        self.consumer = AgentConsumer(
            self.nc, self.subjects, self.agent.name, ack_wait=self.ack_wait,
            fetch_timeout=self.fetch_timeout, stopping=self._stopping,
        )
        name = f"worker {self.agent.name}"
        stopping = self._stopping.is_set
        self._fetch_task = self._loops.start(self._fetch_loop, f"{name} pulls", give_up=stopping)
        self._beat_task = self._loops.start(self._heartbeats, f"{name} heartbeats", give_up=stopping)
        self._background.add(metrics.sample_consumer(self.settings, self.nc, self.subjects.stream_name,
                                                     consumer_name(self.agent.name), self.agent.name))

    async def run(self) -> None:
        """Serve until :meth:`shutdown` completes.

        Raises:
            FatalError: a background loop stopped the worker (after shutdown).
        """
        await self.start()
        await self._stopped.wait()
        self._loops.raise_if_failed()

    async def shutdown(self) -> None:
        """Graceful, idempotent shutdown (see the module docstring)."""
        if self._shutdown_started:
            await self._stopped.wait()
            return
        self._shutdown_started = True
        self._stopping.set()
        self._room.set()
        try:
            # 1. Stop intake: the current pull returns within fetch_timeout.
            if self._fetch_task is not None and not self._fetch_task.done():
                try:
                    async with asyncio.timeout(self.fetch_timeout + 2.0):
                        await asyncio.shield(self._fetch_task)
                except (TimeoutError, Exception):
                    self._fetch_task.cancel()
                    with contextlib.suppress(BaseException):
                        await self._fetch_task
            # 2. Fetched but not started: give it back at once.
            for queue in list(self._queues.values()):
                while queue:
                    msg, _ = queue.popleft()
                    self._release(msg)
                    await self._nak(msg, delay=None)
            # 3. Running turns: up to grace, then cancel (they nak themselves).
            running = [t for t in self._runners.values() if not t.done()]
            if running:
                log.info("worker %s: waiting up to %gs for %d running turn(s)",
                         self.agent.name, self.settings.grace, len(running))
                _, pending = await asyncio.wait(running, timeout=self.settings.grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=5.0)
            if self._beat_task is not None:
                self._beat_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._beat_task
            if self.consumer is not None:
                self.tally.resubscribed = self.consumer.rebinds
                await self.consumer.close()
            if self.nc is not None and not self.nc.is_closed:
                try:
                    async with asyncio.timeout(5.0):
                        await self.nc.drain()  # flushes the last acks
                except Exception:
                    with contextlib.suppress(Exception):
                        await self.nc.close()
        finally:
            log.info("%s", self.tally.line(self.agent.name))
            self._stopped.set()

    # -- intake --------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        assert self.consumer is not None
        while not self._stopping.is_set():
            free = self._max_held - len(self._held)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            if not await self.consumer.ensure_bound():
                continue
            if not self.ready.is_set():
                self.ready.set()
                log.info("worker %s ready: consumer %s on %s, %d concurrent turns, model %s",
                         self.agent.name, consumer_name(self.agent.name),
                         self.subjects.stream_name, self.concurrency, self.agent.model)
            msgs = await self.consumer.fetch(min(free, _FETCH_BATCH))
            for msg in msgs:
                if self._stopping.is_set():
                    await self._nak(msg, delay=None)
                else:
                    self._dispatch(msg)

    async def _heartbeats(self) -> None:
        """Tell JetStream that fetched messages are still being worked on."""
        interval = max(self.ack_wait / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            for msg in list(self._held.values()):
                try:
                    await msg.in_progress()
                except Exception as e:
                    # Missed beats cost at worst a redelivery, which turns survive;
                    # only a failure of this code itself is fatal.
                    if not (is_transient(e) or isinstance(e, nats.errors.Error)):
                        raise

    # -- dispatch --------------------------------------------------------------------
    def _dispatch(self, msg: Msg) -> None:
        try:
            env = decode(msg.data, Envelope)
        except ConvlogError as e:
            log.error("worker %s: not an envelope on %s: %s", self.agent.name, msg.subject, e)
            self._spawn_term(msg)
            return
        self._held[id(msg)] = msg
        sid = env.session_id
        self._queues.setdefault(sid, deque()).append((msg, env))
        if sid not in self._runners:
            task = asyncio.create_task(self._session(sid), name=f"worker {self.agent.name} session {sid}")
            self._runners[sid] = task
            # _handle deals with every failure of a turn; what escapes is a bug here.
            self._loops.watch(task)

    def _spawn_term(self, msg: Msg) -> None:
        async def term() -> None:
            with contextlib.suppress(Exception):
                await msg.term()

        task = asyncio.create_task(term())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _session(self, sid: str) -> None:
        """Handle one session's envelopes in order (one task per busy session)."""
        queue = self._queues[sid]
        try:
            while queue and not self._stopping.is_set():
                msg, env = queue.popleft()
                try:
                    try:
                        await self._slots.acquire()
                    except asyncio.CancelledError:
                        await self._nak(msg, delay=None)  # cancelled before it started
                        raise
                    try:
                        await self._handle(msg, env)  # acks or naks, also when cancelled
                    finally:
                        self._slots.release()
                finally:
                    self._release(msg)
        finally:
            # No await between the last check of the queue and here: nothing is stranded.
            self._runners.pop(sid, None)
            if not queue:
                self._queues.pop(sid, None)

    def _release(self, msg: Msg) -> None:
        self._held.pop(id(msg), None)
        self._room.set()

    async def _handle(self, msg: Msg, env: Envelope) -> None:
        assert self.runner is not None
        self.tally.delivered += 1
        metrics.delivered(self.agent.name, msg)
        part: TurnPart | None = None
        started = time.perf_counter()
        try:
            part = await self._decide(env)
            if part is None:
                self.tally.skipped += 1
                await msg.ack()
                return
            if self.gate is not None and (why := await self.gate.refusal(env)) is not None:
                log.error("worker %s: refusing %s #%d: %s", self.agent.name, env.session_id,
                          env.item_order, why)
                self.tally.skipped += 1
                await msg.term()
                return
            result = await tracing.traced("convlog.turn", msg.headers, self.runner.run(part), kind="CONSUMER",
                                          agent=self.agent.name, session_id=part.session_id, turn=part.turn,
                                          item_order=part.start)
            self._count(result, part)
            metrics.turn_done(self.agent.name, result, started)
            await msg.ack()
        except asyncio.CancelledError:
            await self._nak(msg, delay=None)  # shutdown: the turn resumes from the log elsewhere
            raise
        except Exception as e:
            if is_transient(e) or isinstance(e, TurnBusyError):
                metrics.turn_failed(self.agent.name, "retry")
                log.warning("worker %s: %s #%d will be retried: %s", self.agent.name,
                            env.session_id, env.item_order, e,
                            extra=context(env.session_id, env.item_order, self.agent.name))
                await self._nak(msg, delay=self._retry_delay(msg))
                return
            self.tally.errors += 1
            metrics.turn_failed(self.agent.name, "error")
            log.exception("worker %s: failed on %s #%d", self.agent.name, env.session_id,
                          env.item_order, extra=context(env.session_id, env.item_order, self.agent.name))
            if part is not None and self._attempts(msg) >= self.max_attempts:
                await self._give_up(msg, part, e)
            else:
                await self._nak(msg, delay=self._retry_delay(msg))

    async def _give_up(self, msg: Msg, part: TurnPart, error: Exception) -> None:
        """End a turn that keeps failing with a system item, then ack."""
        assert self.runner is not None
        reason = f"internal error after {self._attempts(msg)} attempts ({type(error).__name__})"
        try:
            result = await self.runner.run(part, fail_reason=reason)
            self._count(result, part)
            metrics.turn_done(self.agent.name, result, time.perf_counter())
            await msg.ack()
        except Exception:
            log.exception("worker %s: could not record the failure", self.agent.name)
            await self._nak(msg, delay=self._retry_delay(msg))

    async def _decide(self, env: Envelope) -> TurnPart | None:
        """The part this agent must play for ``env``, or ``None``."""
        assert self.routing is not None
        if env.kind != "item":
            return None
        data = env.data
        if env.agent == "user" and data.get("role") == "user" and data.get("type", "message") == "message":
            active = await self.routing.active_agent(env.session_id, env.item_order)
            if active != self.agent.name:
                return None
            return TurnPart(env.session_id, turn_key(env.item_id), env.item_order, 0)
        if handoff_target(env) == self.agent.name:
            tid = parse_turn_item_id(env.item_id)
            if tid is None:
                log.debug("handoff to %s in %s #%d was not written by a turn; ignoring",
                          self.agent.name, env.session_id, env.item_order)
                return None
            return TurnPart(env.session_id, tid.turn, env.item_order, tid.step)
        return None

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

    async def _nak(self, msg: Msg, *, delay: float | None) -> None:
        self.tally.naks += 1
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)
