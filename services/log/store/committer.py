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

from shared.errors import ConvlogError, UnavailableError
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


#: Decide and durably write one batch: an outcome per request (in order) and
#: the committed envelopes in position order.
CommitBatch = Callable[[list[Pending]], Awaitable[tuple[list[Outcome], Sequence[Committed]]]]


def _answer(p: Pending, out: Outcome) -> None:
    p.answered = True
    try:
        p.done(out)
    except Exception:  # a caller's callback must not break the batch
        log.exception("append callback failed")


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
        name: the committer task's name.
    """

    def __init__(self, commit_batch: CommitBatch, *, max_batch: int = 512, name: str = "convlog-committer") -> None:
        self._commit_batch = commit_batch
        self.max_batch = max_batch
        self._name = name
        self._queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[CommitListener] = []
        self._closed = False
        self.commits = 0  # batches that wrote something (for stats and tests)

    def start(self) -> None:
        """Start the committer task (idempotent)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Commit what is queued, then end the task.  Idempotent."""
        self._closed = True
        if self._task is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closed

    def add_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def submit(self, session_id: str, request: AppendRequest, done: AppendDone) -> None:
        """Queue an append; ``done`` is called once with its outcome.

        Raises:
            StoreClosedError: the committer is stopped or never started.
        """
        if not self.running:
            raise StoreClosedError("the store is closed")
        self._queue.put_nowait(Pending(session_id, request, done))

    async def append(self, session_id: str, request: AppendRequest) -> AppendReply:
        fut: asyncio.Future[AppendReply] = asyncio.get_running_loop().create_future()
        self.submit(session_id, request, partial(_resolve, fut))
        # If our caller is cancelled the commit still runs to completion in the
        # committer task; the cancellation is re-raised here.
        return await fut

    async def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            # Let the requests that arrived with this one (already-scheduled
            # tasks) reach the queue, to share this commit; and, after a
            # backlog of more than one batch, let the last batch's replies
            # out before the next.
            await asyncio.sleep(0)
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                await self._commit(batch)
            except Exception:  # never let the committer die silently
                log.exception("group commit failed")
                for p in batch:
                    if not p.answered:
                        _answer(p, UnavailableError("the store failed to commit"))

    async def _commit(self, batch: list[Pending]) -> None:
        outcomes, committed = await self._commit_batch(batch)
        if committed:
            self.commits += 1
        for p, out in zip(batch, outcomes, strict=True):
            _answer(p, out)
        if committed:
            for listener in self._listeners:
                res = listener(committed)
                if asyncio.iscoroutine(res):
                    await res
