"""The log service: a NATS micro service in front of a :class:`LogStore`.

Lifecycle (the same shape for every long-running convlog process):
``start()`` connects and serves; ``run()`` returns only when shutdown is
complete; ``shutdown()`` is idempotent and safe before start.  Shutdown order:
stop intake (drain the endpoint subscriptions) -> wait for in-flight requests
up to ``grace`` -> publish what is committed -> close the store -> drain the
connection -> log a one-line tally.  Signal handlers belong to the entrypoint.

Committed user messages are announced to the agent that must answer them
(turn notices, :mod:`.notices`), and lost announcements redone by the notice
reconciler.

Background loops (the outbox, the replier, the notice reconciler) follow :mod:`shared.failures`:
transient failures are retried with backoff; a fatal one shuts the service
down and makes ``run()`` raise :class:`~shared.failures.FatalError`, so
``convlog log`` exits non-zero and its process manager restarts it.

This module wires the service up and shuts it down; the request paths are in
:mod:`.endpoints`, the reply queue and its replier task in :mod:`.replies`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from services import metrics
from services.logfmt import context
from shared import __version__, nats_connect, tracing
from shared.client import connect_options
from shared.config import Settings
from shared.errors import UnavailableError
from shared.failures import FatalError, Loops, cancel_and_wait
from shared.nats_seam import NatsSeam, bind, flush
from shared.routing import EntryProof, encode_checkpoint, entry_checkpoint, open_routing_bucket
from shared.startup import require_jetstream, wait_at_start
from shared.subjects import Subjects
from shared.wire import Outgoing
from shared.work import ensure_work_stream, work_stream_name

from .authorize import Authorizer, authorizer_from, head_signer_from
from .endpoints import Endpoints
from .handlers import Handlers
from .heads import HeadWitness
from .notices import Notifier
from .outbox import Outbox, ensure_stream
from .readahead import ReadAhead
from .reconciler import Reconciler
from .replies import EndpointCounters
from .routing_writer import RoutingWriter
from .store.base import LogStore
from .store.factory import make_store, open_store
from .traces import ServiceTraces
from .verifier import Verifier

__all__ = ["LogService", "ensure_routing_bucket"]

log = logging.getLogger("convlog.log")

SERVICE_NAME = "convlog-log"
QUEUE_GROUP = "convlog-log"


async def ensure_routing_bucket(nc: Client, subjects: Subjects, *, replicas: int = 1) -> Any:
    """The KV bucket holding per-session routing metadata (created if missing)."""
    return await open_routing_bucket(nc, subjects, replicas=replicas)


class LogService(Endpoints):
    """Serve ``append``, ``read``, ``sessions`` and user messages over NATS.

    Args:
        settings: configuration (NATS URL, prefix, database, limits).
        store: the store to serve; defaults to the one ``settings.store``
            names (SQLite on ``settings.db_path``, or JetStream).
        outbox_ack_timeout: seconds the outbox waits for the stream's ack of
            a publish window before it resyncs.
        authorize: the signature checks, when the caller built them already
            (``convlog log``, to name its flags in a mistake); by default
            made from ``settings`` at the start.
    """

    def __init__(
        self, settings: Settings, *, store: LogStore | None = None, outbox_ack_timeout: float = 5.0,
        authorize: Authorizer | None = None,
    ) -> None:
        self.settings = settings
        self._authorize = authorize
        self.subjects = settings.subjects
        self._outbox_ack_timeout = outbox_ack_timeout
        self._shutting_down = asyncio.Event()  # a shutdown began: it ends a stalled first connect
        self.store: LogStore = store or make_store(settings, stop=self._shutting_down)
        self.nc: Client | None = None
        self.outbox: Outbox | None = None
        self.witness: HeadWitness | None = None
        self.read_ahead: ReadAhead | None = None
        self.routing_writer: RoutingWriter | None = None
        self.notifier: Notifier | None = None
        self.reconciler: Reconciler | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._verifier: Verifier | None = None
        self._service: Service | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._awaiting = 0  # appends submitted to the store and not yet answered
        self._outgoing: list[Outgoing] = []  # replies for the replier task
        self._responses: list[tuple[Request, bytes, dict[str, str] | None]] = []  # public seam
        self._outgoing_ready = asyncio.Event()
        self._replier: asyncio.Task[None] | None = None
        self._loops = Loops(self.shutdown, log)  # a fatal failure of one stops the service
        self._seam: NatsSeam | None = None
        self.counters = {name: EndpointCounters() for name in ("append", "read", "sessions", "in")}
        self._replying = False
        self._quiet = asyncio.Event()  # nothing submitted, queued or being sent
        self._stopped = asyncio.Event()
        self._shutdown_started = False
        self._started = False
        self._start_ended = asyncio.Event()  # a shutdown waits for a start under way
        self.tally = {"append": 0, "read": 0, "sessions": 0, "in": 0, "errors": 0}
        self.metrics = metrics.log_metrics(settings)
        self.commit_tally = metrics.CommitTally(self.metrics.commit)  # replaced at start
        self.traces: ServiceTraces | None = None

    async def __aenter__(self) -> LogService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Open the store, connect, create the streams, register the endpoints.

        A shutdown begun meanwhile (SIGTERM while it waits for a cluster) ends
        the start quietly; :meth:`run` then returns once the shutdown is done.
        After a shutdown (a signal before it), nothing starts.
        """
        if self._started or self._shutdown_started:
            return
        self._started = True
        try:
            await self._start()
        except Exception:
            if not self._shutdown_started:
                raise
            log.info("log service: stopped while starting")
        finally:
            self._start_ended.set()

    async def _start(self) -> None:
        # A bad keyring or key fails before anything opens.
        authorize = self._authorize or authorizer_from(self.settings)
        head_signer = head_signer_from(self.settings, authorize.keyring)

        def stopping() -> bool:  # a shutdown begun ends each wait below (for a cluster's leaders)
            return self._shutdown_started

        await open_store(self.store, stopping=stopping)
        for task in getattr(self.store, "background_tasks", ()):  # committer, checkpointer
            self._loops.watch(task)

        async def disconnected() -> None:
            if not (self.nc is not None and self.nc.is_closed):  # not its own close at shutdown
                log.info("nats: disconnected; reconnecting")
            if self.outbox is not None:
                self.outbox.on_disconnected()

        async def reconnected() -> None:
            log.info("nats: reconnected")
            if self.outbox is not None:
                self.outbox.on_reconnected()

        self.nc = await nats_connect.connect(
            self.settings,
            {
                **connect_options(self.settings, name=SERVICE_NAME),
                "disconnected_cb": disconnected,
                "reconnected_cb": reconnected,
            },
            stop=self._shutting_down,
        )
        seam = self._seam = bind(self.nc, self.settings.nats_seam)
        log.info("nats-py seam: %s", seam.name)
        js = self.nc.jetstream()
        # On the JetStream store the stream is the log and its fan-out: no outbox.
        outbox_needed = not getattr(self.store, "publishes_items", False)
        replicas = self.settings.stream_replicas

        async def streams_and_buckets() -> Any:
            await require_jetstream(self.nc)  # none at all: a configuration error, not a wait
            if outbox_needed:
                await ensure_stream(js, self.subjects, replicas=replicas)
            kv = await ensure_routing_bucket(self.nc, self.subjects, replicas=replicas)
            # Turn notices: the agent that must answer a user message hears of it, and only it.
            await ensure_work_stream(js, self.subjects, replicas=replicas)
            return kv

        # Each is created if missing, so a try cut short (a cluster that had
        # not yet placed them, a request lost while its routes formed) is safe to repeat.
        kv = await wait_at_start(streams_and_buckets, what="the streams on NATS JetStream", log=log,
                                 stopping=stopping)
        # One process appends to an SQLite store; JetStream-store instances share their sessions.
        sole_writer = not getattr(self.store, "shared_by_instances", False)
        self.notifier = Notifier(self.nc, self.subjects, kv, sole_writer=sole_writer, store=self.store)
        self.store.add_commit_listener(self.notifier.on_commit)

        async def entry_hint(sid: str, agent: str, proof: EntryProof | None) -> None:
            assert self.notifier is not None
            value = encode_checkpoint(entry_checkpoint(agent, proof))
            # Unknown until written: a first message committed meanwhile (one without
            # `to`) waits for the outcome before it is announced (its worker would read
            # a bucket still without it, and answer as the entry agent).
            self.notifier.writing_entry(sid)
            written: str | None = None
            try:
                await kv.create(sid, value)
                written = agent
                self.notifier.note_active(sid, agent)
            except nats.js.errors.KeyWrongLastSequenceError:  # an earlier one stands: workers read it
                # Noted only where this process knows no other: a first message's `to`
                # written just before this one's names the session's agent (noting this
                # one addressed every notice of the session to an agent workers forward
                # from, until a handoff); else it is the best guess (a retry names what
                # its first attempt wrote).
                self.notifier.note_active_unless_known(sid, agent)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                # The bucket unreachable (a cluster without quorum, JetStream slow): not a bug
                # of the service, and the message cannot be appended without its entry (its
                # worker would answer as the entry agent).  Said as such, nothing appended;
                # a retry finds the entry if the write landed after all (create-only).
                log.warning("session %s: the routing bucket did not take the entry agent %s of its "
                            "first message: %r; the message is refused", sid, agent, e,
                            extra=context(session_id=sid))
                raise UnavailableError(
                    f"the routing bucket did not take the session's entry agent {agent!r} "
                    f"({type(e).__name__}); the request was not applied, send it again") from None
            finally:
                self.notifier.note_entry(sid, written)

        self.read_ahead = ReadAhead(self.store)
        nc = self.nc
        handlers = Handlers(
            store=self.store,
            subjects=self.subjects,
            max_item_bytes=self.settings.max_item_bytes,
            max_payload=self.nc.max_payload,
            entry_hint=entry_hint,
            authorize=authorize,
            head_signer=head_signer,
            read_ahead=self.read_ahead,
            current_max_payload=lambda: nc.max_payload,  # the server's now: a reconnect may lower it
        )
        # The only writer of routing checkpoints (see routing_writer.py).
        self.routing_writer = RoutingWriter(kv)
        self.store.add_commit_listener(self.routing_writer.on_commit)
        self.notifier.repair = self.routing_writer.note  # a handoff whose checkpoint is missing
        if head_signer is not None:  # heads signed within head_interval of each commit
            self.witness = HeadWitness(self.nc, self.subjects, head_signer, interval=self.settings.head_interval,
                                       replicas=self.settings.stream_replicas, store=self.store)
            await wait_at_start(self.witness.start, what="the heads bucket on NATS JetStream", log=log,
                                stopping=stopping)
            self.store.add_commit_listener(self.witness.on_commit)
        # Fan-out lag is the outbox's; a store that writes the items stream itself has none.
        self.fanout = metrics.Fanout(lambda: self.outbox.published_position if self.outbox else 0)
        self.commit_tally = metrics.watch_store(self.store, self.metrics)
        if outbox_needed:
            self.outbox = Outbox(self.nc, self.store, self.subjects, ack_timeout=self._outbox_ack_timeout)
            self.store.add_commit_listener(self.outbox.on_commit)
            self.store.add_commit_listener(self.fanout.on_commit)
            await self.outbox.start()
            assert self.outbox.task is not None
            self._loops.watch(self.outbox.task)
        # Traces reach the workers through the outbox's headers, or (a store that
        # writes the items itself) as headers the store stores with the items;
        # a turn notice carries the user message's trace where the outbox has it.
        trace_map: dict[tuple[str, int], bytes] = self.outbox.traces if self.outbox else {}
        self.notifier.traces = trace_map  # the worker's turn continues the user message's trace
        self.notifier.owns_traces = self.outbox is None
        self.traces = ServiceTraces(trace_map) if tracing.enabled() else None
        # The reconciler's consumer takes only what the items stream stores after it is
        # created (on a first start): it must be there before the first commit.
        self.reconciler = Reconciler(self.nc, self.subjects, self.notifier, self.store,
                                     committed_end=self.outbox.committed_end if self.outbox else None)
        await wait_at_start(self.reconciler.bind, what="the notice reconciler's consumer", log=log,
                            stopping=stopping)
        self._service = await add_service(
            self.nc,
            name=SERVICE_NAME,
            version=__version__,
            description="convlog append-only conversation log",
            queue_group=QUEUE_GROUP,
            metadata={"prefix": self.subjects.prefix, "store": type(self.store).__name__},
            stats_handler=self._endpoint_stats,
        )
        self._replier = self._loops.start(self._reply_loop, "replier")
        deliver_append = self._append_endpoint(handlers)
        endpoints: list[tuple[str, str, Callable[[Request], Awaitable[None]]]] = [
            ("append", self.subjects.append_all, self._micro_handler(deliver_append, seam)),
            ("read", self.subjects.read_all, self._dispatcher("read", handlers.read, handlers)),
            ("sessions", self.subjects.sessions, self._dispatcher("sessions", handlers.sessions, handlers)),
            ("in", self.subjects.inbound_all, self._dispatcher("in", handlers.user_message, handlers)),
        ]
        for name, subject, handler in endpoints:
            await self._service.add_endpoint(name=name, subject=subject, handler=handler)
        inline = seam.deliver_inline(
            seam.endpoint_subscription(self._service, "append"),
            lambda msg: deliver_append(msg.subject, msg.data, msg.reply, msg.headers),
        )
        if seam.fast and not inline:
            log.warning("the append endpoint's subscription is out of reach: appends go through micro's queue")
        await flush(self.nc)  # the endpoints' SUBs are in place: 'ready' means it
        # Last: a service that cannot start (an items stream for other subjects) leaves no loop behind.
        self._reconciler = self._loops.start(self.reconciler.run, "notice reconciler")
        self.metrics.start(self, self.fanout)
        await self._note_replicas()
        log.info(
            "log service ready: prefix=%s store=%s nats=%s",
            self.subjects.prefix,
            getattr(self.store, "path", type(self.store).__name__),
            self.nc.connected_url.netloc if self.nc.connected_url else "?",
        )

    async def run(self) -> None:
        """Serve until :meth:`shutdown` completes.

        Raises:
            FatalError: a background loop stopped the service (after shutdown).
        """
        await self.start()
        await self._stopped.wait()
        self._loops.raise_if_failed()

    async def _note_replicas(self) -> None:
        """Say which of this prefix's streams keep another replica count than
        ``CONVLOG_STREAM_REPLICAS``: an existing stream is not rescaled (nor its
        durability changed behind the operator's back), so after moving to a cluster
        with replicas 3, streams made at 1 would otherwise stay single copies, silently."""
        assert self.nc is not None
        js = self.nc.jetstream()
        wanted = self.settings.stream_replicas
        layout = getattr(self.store, "layout", None)
        names = [self.subjects.stream_name, work_stream_name(self.subjects), f"KV_{self.subjects.routing_bucket}",
                 f"KV_{self.subjects.heads_bucket}", *getattr(layout, "log_streams", ())]
        for name in names:
            try:
                info = await js.stream_info(name)
            except (nats.js.errors.Error, nats.errors.Error, TimeoutError):
                continue  # not made here (no heads without a key), or not now: nothing to say
            have = info.config.num_replicas or 1
            if have != wanted:
                log.warning("stream %s has %d replica(s), CONVLOG_STREAM_REPLICAS is %d: left as it is "
                            "(rescale it with a stream update, e.g. nats stream edit %s --replicas %d)",
                            name, have, wanted, name, wanted)

    async def shutdown(self) -> None:
        """Graceful, idempotent shutdown (see module docstring)."""
        if self._shutdown_started:
            await self._stopped.wait()
            return
        self._shutdown_started = True
        self._shutting_down.set()
        try:
            if self._started:
                # A start under way ends first (its waits end once this began): closing
                # the store while it opens left the connection the open then made open
                # (aiosqlite's thread, and the process never exited).
                await self._start_ended.wait()
            if self._service is not None and self._seam is not None:
                with contextlib.suppress(Exception):
                    await self._seam.stop_service(self._service)
            loop = asyncio.get_running_loop()
            until = loop.time() + self.settings.grace
            if self._inflight:
                done, pending = await asyncio.wait(set(self._inflight), timeout=self.settings.grace)
                for t in pending:
                    t.cancel()
            if self._replier is not None and (
                self._awaiting or self._outgoing or self._responses or self._replying
            ):
                # Appends already submitted: let them commit and their replies go out.
                self._quiet.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(until):
                        await self._quiet.wait()
            if self._verifier is not None:
                await asyncio.to_thread(self._verifier.close)
            if self._replier is not None:
                self._replier.cancel()
                with contextlib.suppress(asyncio.CancelledError, FatalError):
                    await self._replier
            if self._reconciler is not None:  # it reads the store
                await cancel_and_wait({self._reconciler}, within=2.0)
            if self.reconciler is not None:  # bound at start, perhaps never run
                await self.reconciler.unbind()
            if self.outbox is not None:
                await self.outbox.stop(drain_timeout=min(self.settings.grace, 5.0))
            if self.read_ahead is not None:
                await self.read_ahead.close()
            if self.witness is not None:  # its last flush may read the store: before it closes
                await self.witness.stop()
            await self.store.close()
            if self.routing_writer is not None:
                await self.routing_writer.stop()
            if self.notifier is not None:  # the notices of the last commits
                await self.notifier.stop()
            self.metrics.stop()
            if self.nc is not None and not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self.nc.drain()
        finally:
            t = self.tally
            log.info(
                "log service stopped: %d appends, %d reads, %d sessions, %d user messages, "
                "%d errors, %d published, %d commits",
                t["append"], t["read"], t["sessions"], t["in"], t["errors"],
                self.outbox.published_count if self.outbox else 0,
                getattr(self.store, "commits", 0),
            )
            self._stopped.set()
