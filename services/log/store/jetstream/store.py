"""The JetStream store: the log lives in JetStream streams (see :mod:`.layout`).

Any number of log-service instances may serve the same sessions at once:
each keeps only caches (:class:`~.index.SessionIndex`), and every append is
checked by the server against the head it was decided on (see
:mod:`.commit`): ``Nats-Expected-Last-Subject-Sequence`` on the session's
wildcard subject, and a log stream that takes one message per ``item_id``
subject, ever.

Ordering rules are :func:`~..ordering.decide`, the same as SQLite's; the
envelopes are byte-identical.  Errors (a conflict, a bad retract) are only
ever reported against a head freshly read from the stream.  Reads are direct
gets on the log streams, answered by any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from functools import partial
from typing import Any

import nats
from nats.aio.client import Client

from shared import tracing
from shared.errors import UnavailableError
from shared.messages import AppendReply, AppendRequest, SessionInfo
from shared.nats_connect import open_client
from shared.nats_seam import bind
from shared.startup import require_jetstream
from shared.subjects import Subjects

from ..base import AppendDone, CommitListener, Committed, Page
from ..committer import GroupCommitter, Outcome, Pending, _resolve
from ..ordering import Row
from .api import RESEND_AFTER, Acks, DirectGet
from .commit import MAX_BATCH_MESSAGES, MAX_ITEMS_PER_APPEND, BatchWriter
from .index import SessionIndex
from .layout import Layout, ensure_streams
from .reads import StreamReads

__all__ = ["MAX_BATCH_MESSAGES", "MAX_ITEMS_PER_APPEND", "JetStreamStore"]

log = logging.getLogger("convlog.store.jetstream")

class JetStreamStore:
    """A :class:`~services.log.store.base.LogStore` on JetStream streams.

    Args:
        connect_options: ``nats.connect`` keyword arguments (the store owns
            its connection), unless ``nc`` is given.
        subjects: subject names for the prefix.
        replicas: the streams' replicas when this store creates them.
        shards: log streams the sessions are spread over (fixed for a log).
        max_batch: most append requests one group commit takes.
        timeout: seconds to wait for the stream's answers.
        max_cached_sessions: sessions whose head and index are kept in memory.
        max_inflight: group commits in flight at once (over disjoint sessions;
            each publishes its sessions' appends in parallel).
        nats_seam: ``auto`` or ``public`` (see :mod:`shared.nats_seam`) for the
            store's own connection.
        nc: an already connected client to use (not closed by :meth:`close`).
        create: create the streams of a log that does not exist yet (else
            :meth:`open` raises ``NotFoundError``: a log to read from).
    """

    #: The fan-out stream sources the log streams: no outbox.
    publishes_items = True
    #: Any number of log-service instances append to the same sessions.
    shared_by_instances = True

    def __init__(
        self,
        connect_options: dict[str, Any] | None = None,
        *,
        subjects: Subjects,
        replicas: int = 1,
        shards: int = 1,
        max_batch: int = 512,
        timeout: float = 5.0,
        max_cached_sessions: int = 10_000,
        max_inflight: int = 64,
        nats_seam: str = "auto",
        nc: Client | None = None,
        create: bool = True,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.layout = Layout(subjects, shards)
        self._stop = stop  # set: the first connect ends (a shutdown while the server never answers)
        self.path = f"jetstream:{','.join(self.layout.log_streams)}"  # for the service's ready line
        self._connect_options = connect_options or {}
        self._nc = nc
        self._owns_nc = nc is None
        self._nats_seam = nats_seam
        self._create = create
        self.replicas = replicas
        self.timeout = timeout
        self.max_cached_sessions = max_cached_sessions
        # Appends wait on the network, not on a local fsync: keep many in
        # flight (over disjoint sessions; see GroupCommitter).
        self._committer = GroupCommitter(self._commit_batch, max_batch=max_batch, max_inflight=max_inflight)
        self._reads = StreamReads(
            self.layout, lambda: self._gets, max_cached_sessions=max_cached_sessions, timeout=timeout
        )
        self._writer = BatchWriter(lambda: self._publisher, self.layout, self._reads)
        self._direct: list[DirectGet] | None = None
        self._acks: Acks | None = None
        self._opened = False

    @property
    def retries(self) -> int:
        """Batches the server refused (a head moved, an id existed) and that were decided again."""
        return self._writer.retries

    @property
    def _publisher(self) -> Acks:
        if self._acks is None:
            raise UnavailableError("the JetStream store is not open")
        return self._acks

    async def _commit_batch(self, batch: list[Pending]) -> tuple[list[Outcome], list[Committed]]:
        return await self._writer.commit(batch)

    @property
    def commits(self) -> int:
        """Group commits that stored something (for stats and tests)."""
        return self._committer.commits

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        if self._opened:
            return
        try:
            if self._nc is None:
                self._nc = await open_client(stop=self._stop, **self._connect_options)
                bind(self._nc, self._nats_seam)
            await require_jetstream(self._nc)  # none at all: a configuration error, not a wait
            await ensure_streams(
                self._nc, self.layout, replicas=self.replicas, timeout=self.timeout, create=self._create
            )
            gets = [DirectGet(self._nc, name, timeout=self.timeout) for name in self.layout.log_streams]
            gets.append(DirectGet(self._nc, self.layout.stream, timeout=self.timeout))
            for g in gets:
                await g.start()
            # Unanswered, a publish is sent again (settled) soon: a leader change drops it.
            self._acks = Acks(self._nc, timeout=min(self.timeout, RESEND_AFTER))
            await self._acks.start()
            self._direct = gets
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as e:
            await self._close_nc()
            raise UnavailableError(f"cannot open the JetStream store {self.layout.stream}: {e}") from e
        except BaseException:
            await self._close_nc()
            raise
        self._opened = True
        self._committer.start()

    @property
    def background_tasks(self) -> list[asyncio.Task[None]]:
        """Tasks whose failure is fatal to the process (the service watches them)."""
        return [t for t in (self._committer.task,) if t is not None]

    @property
    def connected(self) -> bool:
        """The store's NATS connection is up (not closed, not reconnecting)."""
        return self._nc is not None and self._nc.is_connected

    async def close(self) -> None:
        await self._committer.stop()
        await self._close_nc()

    async def _close_nc(self) -> None:
        if self._owns_nc and self._nc is not None:
            nc, self._nc = self._nc, None  # a later open() connects afresh
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.drain()

    async def __aenter__(self) -> JetStreamStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._committer.add_listener(listener)

    @property
    def _gets(self) -> list[DirectGet]:
        if self._direct is None:
            raise UnavailableError("the JetStream store is not open")
        return self._direct

    # -- appends ---------------------------------------------------------
    def submit(self, session_id: str, request: AppendRequest, done: AppendDone, *, trace: str | None = None) -> None:
        """As :meth:`LogStore.submit`; ``trace`` (a W3C ``traceparent``) is
        stored as a header of the request's items, so it reaches the worker
        on ``<prefix>.items.<sid>``."""
        self._committer.submit(session_id, request, done, trace=trace)

    async def append(self, session_id: str, request: AppendRequest) -> AppendReply:
        """As :meth:`LogStore.append`; the current span's ``traceparent`` (if
        tracing is on) is stored with the items, as :meth:`submit` does."""
        trace = (tracing.headers() or {}).get("traceparent") if tracing.enabled() else None
        if trace is None:
            return await self._committer.append(session_id, request)
        fut: asyncio.Future[AppendReply] = asyncio.get_running_loop().create_future()
        self._committer.submit(session_id, request, partial(_resolve, fut), trace=trace)
        return await fut

    # -- reads: the cached index and direct gets (see .reads) ------------
    async def last_order(self, session_id: str) -> int:
        return await self._reads.last_order(session_id)

    async def read(
        self, session_id: str, *, after: int, limit: int, max_bytes: int, visible: bool = False
    ) -> Page:
        return await self._reads.read(session_id, after=after, limit=limit, max_bytes=max_bytes, visible=visible)

    async def tail(
        self, session_id: str, n: int, *, visible: bool = True, max_bytes: int | None = None
    ) -> Page:
        return await self._reads.tail(session_id, n, visible=visible, max_bytes=max_bytes)

    async def sessions(self, *, after: str | None, limit: int) -> tuple[list[SessionInfo], bool]:
        return await self._reads.sessions(after=after, limit=limit)

    async def committed_after(self, position: int, limit: int) -> list[Committed]:
        return await self._reads.committed_after(position, limit)

    async def position_of(self, session_id: str, item_order: int) -> int | None:
        return await self._reads.position_of(session_id, item_order)

    async def import_rows(self, sid: str, rows: list[Row], after: int) -> None:
        """Store envelopes decided elsewhere (``convlog migrate``) after order
        ``after``, in atomic batches chained on the head.

        Raises:
            ConflictError: the session is not at ``after``, or moved meanwhile.
        """
        from shared.errors import ConflictError

        from .api import IdTaken, WrongLastSequence

        s = await self._session(sid, fresh=True)
        if s.last_order != after:
            raise ConflictError(f"session {sid!r} is at {s.last_order}, not {after}", last_order=s.last_order)
        for i in range(0, len(rows), MAX_ITEMS_PER_APPEND):
            try:
                await self._writer.store_rows(sid, s, rows[i : i + MAX_ITEMS_PER_APPEND])
            except (WrongLastSequence, IdTaken) as e:
                raise ConflictError(f"session {sid!r} moved while importing", last_order=-1) from e

    async def _session(self, sid: str, *, fresh: bool) -> SessionIndex:
        return await self._reads.session(sid, fresh=fresh)

    async def _extend(self, sid: str, s: SessionIndex, upto: int) -> None:
        await self._reads.extend(sid, s, upto)

    @property
    def _cache(self) -> OrderedDict[str, SessionIndex]:
        return self._reads.cache

