"""The agent worker: take the turn notices addressed to this agent, run turns.

Every replica of agent ``X`` pulls the notices addressed to ``X`` from the
durable consumer its replicas share on the work stream (:mod:`.intake`): a
user message ``X`` must answer, a handoff to ``X``.  For each, the worker
reads the log and decides (:mod:`.parts`): play the part, forward a notice
whose address went stale to the agent the log says is active, or nothing.
A part that ends with a handoff announces it to the target before its own
notice is acked.

Sessions run concurrently (at most ``concurrency`` turns at once); the
notices of one session are handled one after another, in arrival order.
What a replica takes from the consumer is bounded by sessions: at most
``concurrency * 4`` busy ones (running or waiting for a slot), so the rest are
left to other replicas.  The notices queued behind a session's running turn
count only against a much larger bound (``concurrency * 32``: memory, and the
in-progress acks of held notices): one session sent many messages in a row
does not keep another session's message out of a free slot.
Turn logic and the exactly-once argument live in :mod:`.turn`; the ack policy
is declared in :mod:`.intake`.

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
from collections import deque
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from services import metrics
from shared import nats_connect
from shared.client import LogClient, connect_options
from shared.config import Settings
from shared.failures import Loops, is_transient
from shared.nats_seam import bind, flush
from shared.signing import KeyFile
from shared.startup import require_jetstream, wait_at_start
from shared.work import Notice, decode_notice, work_stream_name

from .handling import NoticeHandler, Tally, term
from .intake import WorkIntake, consumer_name
from .model import ModelClient
from .parts import PartFinder
from .routing import Routing, open_routing_bucket
from .spec import SystemSpec
from .trust import EnvelopeGate
from .turn import DEFAULT_MAX_STEPS, TurnRunner

__all__ = ["Tally", "Worker"]

log = logging.getLogger("convlog.worker")



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
        max_attempts: deliveries of one notice that fail with an unexpected
            error (in this worker; not those handed back on shutdown or retried
            after a transient failure) before the turn is ended with a ``system`` item.
        fetch_timeout: unused (pulls are continuous); kept for callers.
        publish_timings: publish each part's per-phase timings on
            ``<prefix>.timings.turn`` (for ``convlog bench --turns``).

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
        concurrency: int = 64,
        ack_wait: float = 30.0,
        max_steps: int = DEFAULT_MAX_STEPS,
        tool_timeout: float = 30.0,
        max_attempts: int = 8,
        fetch_timeout: float = 1.0,
        publish_timings: bool = False,
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
        self.publish_timings = publish_timings
        self.tally = Tally()
        self.nc: Client | None = None
        self.client: LogClient | None = None
        self.routing: Routing | None = None
        self.runner: TurnRunner | None = None
        self.gate: EnvelopeGate | None = None  # signatures of what the worker acts on
        self.finder: PartFinder | None = None
        self.handler: NoticeHandler | None = None
        self.ready = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        # Held sessions, not notices, bound what the replica takes: notices queued behind
        # one session's running turn used to fill the bound, and a message of another
        # session waited in the stream for all of them though a slot was free.
        self._max_sessions = concurrency * 4
        self._max_held = self._max_sessions * 8  # notices: memory and in-progress acks
        self._held: dict[int, Msg] = {}  # by id(): Msg is not hashable
        self._queues: dict[str, deque[tuple[Msg, Notice]]] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._waiting: set[asyncio.Task[None]] = set()  # session tasks waiting for a slot
        self._background: set[asyncio.Task[None]] = set()
        self.consumer: WorkIntake | None = None
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
        """Connect and start pulling (the consumer is bound as soon as the work stream exists)."""
        if self._started or self._shutdown_started:
            return
        self._started = True

        async def reconnected() -> None:
            if self.consumer is not None:  # pull requests may be lost with the connection
                self.consumer.mark_stale("reconnected to NATS")

        try:
            self.nc = await nats_connect.connect(
                self.settings,
                {
                    **connect_options(self.settings, name=f"convlog-worker-{self.agent.name}"),
                    "reconnected_cb": reconnected,
                    # error_cb: the shared one, which says a repeated failure to reach the server
                    # once (this worker's own logged each reconnect attempt: four lines a second).
                },
                stop=self._stopping,
            )
        except nats.errors.ConnectionClosedError:
            if not self._shutdown_started:
                raise
            return  # a signal arrived while connecting (to a server that never answered)
        bind(self.nc, self.settings.nats_seam)
        if self._shutdown_started:  # a signal arrived while connecting
            await self.nc.close()
            return
        self.client = LogClient(
            self.nc, prefix=self.subjects.prefix, timeout=self.settings.request_timeout,
            signer=KeyFile(self.settings.signing_key) if self.settings.signing_key else None,
        )
        self.gate = EnvelopeGate.from_settings(self.client, self.settings, self.agent.name)

        async def routing_bucket() -> Any:
            assert self.nc is not None
            await require_jetstream(self.nc)  # none at all: a configuration error, not a wait
            return await open_routing_bucket(self.nc, self.subjects, replicas=self.settings.stream_replicas)

        # Created if missing (by the log service, or here): a cluster still placing it is waited for.
        try:
            kv = await wait_at_start(
                routing_bucket, what=f"the routing bucket on NATS JetStream (worker {self.agent.name})", log=log,
                stopping=lambda: self._shutdown_started,
            )
        except Exception:
            if not self._shutdown_started:
                raise
            return  # a signal arrived while waiting: run() returns once the shutdown is done
        self.routing = Routing(kv, self.client, self.spec, keyring=self.gate.keyring, require=self.gate.require)
        # The log service moves the routing checkpoint, from the handoff items it commits.
        # Items a notice carries are taken on the log service's word; a worker that checks
        # signatures reads what it acts on from the log instead.
        self.finder = PartFinder(self.client, self.routing, self.agent,
                                 carried=self.gate.keyring is None and not self.gate.require)
        self.runner = TurnRunner(
            self.client, self.agent, self.model,
            max_steps=self.max_steps, tool_timeout=self.tool_timeout, forged=self.gate.forged,
            seen=self.finder.saw,
        )
        self.handler = NoticeHandler(
            self.nc, self.subjects, self.agent, self.runner, self.finder, self.routing, self.gate,
            max_attempts=self.max_attempts, publish_timings=self.publish_timings, spawn=self._spawn,
            tally=self.tally,
        )
        self.consumer = WorkIntake(
            self.nc, self.subjects, self.agent.name, entry=self.agent.name == self.spec.entry,
            ack_wait=self.ack_wait, room=self._room_left,
            deliver=self._on_notice, stopping=self._stopping,
        )
        name = f"worker {self.agent.name}"
        stopping = self._stopping.is_set
        self._fetch_task = self._loops.start(self._pull_loop, f"{name} pulls", give_up=stopping)
        self._beat_task = self._loops.start(self._heartbeats, f"{name} heartbeats", give_up=stopping)
        self._background.add(metrics.sample_consumer(self.settings, self.nc, work_stream_name(self.subjects),
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
        try:
            # 1. Stop intake: no more pulls, and the pulls still waiting on the server
            #    lose their inbox, so what this worker gives back below goes to a
            #    replica, not to its own pulls again.
            if self._fetch_task is not None and not self._fetch_task.done():
                self._fetch_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._fetch_task
            if self.consumer is not None:
                await self.consumer.close()
                if self.nc is not None:
                    with contextlib.suppress(Exception):
                        await flush(self.nc, timeout=2)
            # 2. Fetched but not started: give it back at once (a notice waiting for a
            #    slot is nak'd by its task, cancelled here).
            handed_back = set(self._waiting)  # waiting for a slot: they start no turn, each naks its notice
            for task in handed_back:
                task.cancel()
            for queue in list(self._queues.values()):
                while queue:
                    msg, _ = queue.popleft()
                    self._release(msg)
                    await self._nak(msg, delay=None)
            # 3. Running turns: up to grace, then cancel (they nak themselves).
            running = [t for t in self._runners.values() if not t.done()]
            if running:
                if turns := sum(t not in handed_back for t in running):
                    log.info("worker %s: waiting up to %gs for %d running turn(s)",
                             self.agent.name, self.settings.grace, turns)
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
    async def _pull_loop(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer

        async def announce_ready() -> None:
            await consumer.bound.wait()
            self.ready.set()
            log.info("worker %s ready: consumer %s on %s, %d concurrent turns, model %s",
                     self.agent.name, consumer.name, consumer.stream, self.concurrency, self.agent.model)

        ready = asyncio.create_task(announce_ready())
        try:
            await consumer.run()
        finally:
            ready.cancel()

    def _on_notice(self, msg: Msg) -> None:
        if self._stopping.is_set():
            self._spawn(self._nak(msg, delay=None))
        else:
            self._dispatch(msg)

    async def _heartbeats(self) -> None:
        """Tell JetStream that fetched messages are still being worked on (every third of
        the consumer's ack_wait, which another replica may have made shorter than ours)."""
        assert self.consumer is not None
        consumer = self.consumer
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(consumer.beat_interval()):
                    await consumer.beat_now.wait()
            consumer.beat_now.clear()
            for msg in list(self._held.values()):
                try:
                    await msg.in_progress()
                except Exception as e:
                    # Missed beats cost at worst a redelivery, which turns survive;
                    # only a failure of this code itself is fatal.
                    if not (is_transient(e) or isinstance(e, nats.errors.Error)):
                        raise

    # -- dispatch --------------------------------------------------------------------
    def _room_left(self) -> int:
        """How many more notices to take now: room for new sessions, within the bound on
        held notices (a notice of a session already held takes no session's room)."""
        return min(self._max_sessions - len(self._runners), self._max_held - len(self._held))

    def _dispatch(self, msg: Msg) -> None:
        try:
            notice = decode_notice(msg.data)
        except msgspec.DecodeError as e:
            log.error("worker %s: not a turn notice on %s: %s", self.agent.name, msg.subject, e)
            self._spawn(term(msg))
            return
        self._held[id(msg)] = msg
        sid = notice.session_id
        self._queues.setdefault(sid, deque()).append((msg, notice))
        if sid not in self._runners:
            task = asyncio.create_task(self._session(sid), name=f"worker {self.agent.name} session {sid}")
            self._runners[sid] = task
            # handle() deals with every failure of a turn; what escapes is a bug here.
            self._loops.watch(task)
        elif self.consumer is not None:
            self.consumer.poke()  # queued behind its session: the room it was pulled for is still free

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _session(self, sid: str) -> None:
        """Handle one session's notices in order (one task per busy session)."""
        queue = self._queues[sid]
        me = asyncio.current_task()
        assert me is not None
        try:
            while queue and not self._stopping.is_set():
                msg, env = queue.popleft()
                try:
                    self._waiting.add(me)
                    try:
                        await self._slots.acquire()
                    except asyncio.CancelledError:
                        await self._nak(msg, delay=None)  # cancelled before it started
                        raise
                    finally:
                        self._waiting.discard(me)
                    if self._stopping.is_set():  # got the slot as shutdown began: not started
                        self._slots.release()
                        await self._nak(msg, delay=None)
                        break
                    try:
                        assert self.handler is not None
                        await self.handler.handle(msg, env)  # acks or naks, also when cancelled
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
        if self.consumer is not None:
            self.consumer.poke()

    async def _nak(self, msg: Msg, *, delay: float | None) -> None:
        self.tally.naks += 1
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)
