"""Group commit for any backend: many appends, one durable write.

Appends are queued and a single committer task hands whatever requests
arrived while the previous commit ran to the backend's ``commit_batch`` in
one go — so many concurrent appends share one fsync (SQLite) or one round of
stream publishes (JetStream).  Each caller hears back (its ``done``
callback, or its future) only after that write is durable.  A commit that
started finishes even if its caller is cancelled; the cancellation is
re-raised to the caller.

The backend decides the batch (the ordering rules of :mod:`.ordering`) and
writes it; the committer owns only the queue, the batching, the answers and
the commit listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from time import perf_counter_ns
from typing import Any

from shared.errors import ConvlogError, UnavailableError
from shared.failures import is_transient
from shared.messages import AppendReply, AppendRequest

from .base import AppendDone, CommitListener, Committed, StoreClosedError

__all__ = ["CommitBatch", "GroupCommitter", "Outcome", "Pending"]

log = logging.getLogger("convlog.store.committer")

Outcome = AppendReply | ConvlogError


@dataclass(slots=True)
class Pending:
    """One queued append and the callback that answers it."""

    session_id: str
    request: AppendRequest
    done: AppendDone
    answered: bool = False
    trace: str | None = None  # a W3C traceparent a backend may store with the items


#: Decide and durably write one batch: an outcome per request (in order) and
#: the committed envelopes in position order.
CommitBatch = Callable[[list[Pending]], Awaitable[tuple[list[Outcome], Sequence[Committed]]]]


def _answer(p: Pending, out: Outcome) -> None:
    p.answered = True
    try:
        p.done(out)
    except Exception:  # a caller's callback must not break the batch
        log.exception("append callback failed")


def _refuse(pending: Sequence[Pending | None]) -> None:
    """Answer what a failed commit leaves unanswered ``unavailable`` (requesters retry)."""
    for p in pending:
        if p is not None and not p.answered:
            _answer(p, UnavailableError("the store failed to commit"))


def _resolve(fut: asyncio.Future[AppendReply], out: Outcome) -> None:
    if fut.done():  # the caller was cancelled; the commit stands regardless
        return
    if isinstance(out, ConvlogError):
        fut.set_exception(out)
    else:
        fut.set_result(out)


class GroupCommitter:
    """One committer task in front of a backend's ``commit_batch``.

    Args:
        commit_batch: the backend's write of one batch (see :data:`CommitBatch`).
        max_batch: most append requests one batch takes.
        max_items: most items one batch takes, unless its first request alone has more.
            A batch is decided and written on the event loop (SQLite: see its
            ``_commit_batch``), about 15 us an item here: without a bound, a few
            bulk appends of thousands of items each made one batch that held every
            read, reply and notice of the service for seconds.  The requests past
            the bound go in the next batch, in order.
        name: the committer task's name.
        max_inflight: batches being written at once.  With more than one
            (a backend whose writes wait on the network, not a local fsync),
            a batch never holds a session another batch in flight holds:
            that session's requests wait for the next batch, so each
            session's requests are still decided and written in order.
    """

    def __init__(
        self,
        commit_batch: CommitBatch,
        *,
        max_batch: int = 512,
        max_items: int = 10_000,
        name: str = "convlog-committer",
        max_inflight: int = 1,
    ) -> None:
        self._commit_batch = commit_batch
        self.max_batch = max_batch
        self.max_items = max_items
        self.max_inflight = max_inflight
        self._name = name
        self._queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[CommitListener] = []
        self._closed = False
        self._fatal: Exception | None = None  # the first non-transient commit failure
        self.commits = 0  # batches that wrote something (for stats and tests)
        # Metrics hook, per batch that wrote: (items, commit ns, fsync ns or None).
        self.observe_commit: Callable[[int, int, int | None], None] = lambda *_: None
        self.fsync_ns: int | None = None  # set by a backend that times its durable write

    def start(self) -> None:
        """Start the committer task (idempotent)."""
        if self._task is None and not self._closed:
            loop = self._loop() if self.max_inflight <= 1 else self._loop_pipelined()
            self._task = asyncio.create_task(loop, name=self._name)

    async def stop(self) -> None:
        """Commit what is queued, then end the task.  Idempotent."""
        self._closed = True
        if self._task is not None:
            if not self._task.done():
                await self._queue.put(None)
            # wait() neither cancels the task if we are cancelled nor raises
            # the fatal error its task ended with (reported by its watcher).
            await asyncio.wait({self._task})

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The committer task: it ends with the error after a fatal failure."""
        return self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closed

    def add_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def submit(self, session_id: str, request: AppendRequest, done: AppendDone, *, trace: str | None = None) -> None:
        """Queue an append; ``done`` is called once with its outcome.

        Raises:
            StoreClosedError: the committer is stopped or never started.
        """
        if not self.running:
            raise StoreClosedError("the store is closed")
        self._queue.put_nowait(Pending(session_id, request, done, trace=trace))

    async def append(self, session_id: str, request: AppendRequest) -> AppendReply:
        fut: asyncio.Future[AppendReply] = asyncio.get_running_loop().create_future()
        self.submit(session_id, request, partial(_resolve, fut))
        # If our caller is cancelled the commit still runs to completion in the
        # committer task; the cancellation is re-raised here.
        return await fut

    async def _loop(self) -> None:
        stopping = False
        carry: Pending | None = None  # taken from the queue, over the last batch's max_items
        while not stopping:
            if carry is not None:
                first, carry = carry, None
            else:
                got = await self._queue.get()
                if got is None:
                    break
                first = got
            # Let the requests that arrived with this one (already-scheduled
            # tasks) reach the queue, to share this commit; and, after a
            # backlog of more than one batch, let the last batch's replies
            # out before the next.
            await asyncio.sleep(0)
            batch = [first]
            items = len(first.request.items)
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if items + len(nxt.request.items) > self.max_items:
                    carry = nxt  # first in the next batch
                    break
                batch.append(nxt)
                items += len(nxt.request.items)
            await self._guarded(batch)
            if self._fatal is not None:
                self._give_up([carry] if carry is not None else [])
                raise self._fatal

    async def _loop_pipelined(self) -> None:
        """Like :meth:`_loop`, with up to ``max_inflight`` batches in flight
        over disjoint sets of sessions."""
        held: list[Pending] = []  # arrived, not yet in a batch, in arrival order
        busy: set[str] = set()  # sessions of the batches in flight
        inflight: set[asyncio.Task[None]] = set()
        wake = asyncio.Event()  # a batch finished: held requests may go now
        stopping = False
        while True:
            if self._fatal is not None:
                if inflight:
                    await asyncio.wait(set(inflight))
                self._give_up(held)
                raise self._fatal
            while not stopping:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stopping = True
                else:
                    held.append(nxt)
            if held and len(inflight) < self.max_inflight:
                batch: list[Pending] = []
                rest: list[Pending] = []
                deferred: set[str] = set()  # once one request of a session waits, its later ones do
                items = 0
                for p in held:
                    sid = p.session_id
                    n = len(p.request.items)
                    if (len(batch) < self.max_batch and sid not in busy and sid not in deferred
                            and (not batch or items + n <= self.max_items)):
                        batch.append(p)
                        items += n
                    else:
                        deferred.add(sid)
                        rest.append(p)
                held = rest
                if batch:
                    sids = {p.session_id for p in batch}
                    busy.update(sids)
                    task = asyncio.create_task(self._guarded(batch))
                    inflight.add(task)

                    def finished(t: asyncio.Task[None], sids: set[str] = sids) -> None:
                        inflight.discard(t)
                        busy.difference_update(sids)
                        wake.set()

                    task.add_done_callback(finished)
                    continue
            if stopping and not held:
                if inflight:
                    await asyncio.wait(set(inflight))
                return
            wake.clear()
            waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(wake.wait())}
            getter: asyncio.Task[Pending | None] | None = None
            if not stopping:
                getter = asyncio.ensure_future(self._queue.get())
                waiters.add(getter)
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                if w is not getter:
                    w.cancel()
            if getter is not None:
                if getter.done():
                    got = getter.result()
                    if got is None:
                        stopping = True
                    else:
                        held.append(got)
                        await asyncio.sleep(0)  # let the requests arriving with it join
                else:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter

    async def _guarded(self, batch: list[Pending]) -> None:
        """Commit ``batch``; a failure answers its requests ``unavailable``.

        A transient failure (a busy database, the network) leaves the
        committer serving: the requesters retry.  Any other failure (a disk
        error, a bug) is fatal: the committer stops taking requests and its
        task ends with the error, which the service turns into a non-zero
        exit so the process manager restarts it, instead of answering
        ``unavailable`` forever.
        """
        try:
            await self._commit(batch)
        except Exception as e:  # never let a batch fail silently
            if is_transient(e):
                log.warning("group commit failed (transient, requesters retry): %s: %s", type(e).__name__, e)
            else:
                log.exception("group commit failed")
                if self._fatal is None:
                    self._fatal = e
            _refuse(batch)

    def _give_up(self, held: Sequence[Pending] = ()) -> None:
        """After a fatal failure: refuse new requests; answer the held and queued ones."""
        self._closed = True
        queued: list[Pending | None] = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
        _refuse([*held, *queued])

    async def _commit(self, batch: list[Pending]) -> None:
        started = perf_counter_ns()
        outcomes, committed = await self._commit_batch(batch)
        if committed:
            self.commits += 1
            self.observe_commit(len(committed), perf_counter_ns() - started, self.fsync_ns)
        for p, out in zip(batch, outcomes, strict=True):
            _answer(p, out)
        if committed:
            for listener in self._listeners:
                res = listener(committed)
                if asyncio.iscoroutine(res):
                    await res
