"""Merge while busy: one run at a time, and what arrives meanwhile goes in the next.

Some writes cost the server a fixed price whatever their size (a JetStream
atomic batch is stored for a few milliseconds, one batch at a time per
stream).  Sent as they come, overlapping callers would queue many small
ones; merged, one write grows with the load instead.  :class:`Merger` runs
its ``run`` function on one group of submitted items at a time; the items
submitted while a group runs wait and go together in the next group (up to
``limit``, counted by ``size``).  Each caller gets its own item's result.

The log service merges the turn notices of overlapping commits
(:mod:`services.log.pubacks`) and a shard's combined append batches
(:mod:`services.log.store.jetstream.commit`) this way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Merger"]

T = TypeVar("T")
R = TypeVar("R")


class Merger(Generic[T, R]):
    """Runs ``run`` on one group of submitted items at a time.

    Args:
        run: takes a group's items, in submission order, and returns one
            result per item.  An exception it raises is raised to every
            caller of the group.
        size: an item's share of ``limit``.
        limit: most ``size`` per group; an item larger than that goes alone.
        stopped: the result of an item whose outcome the merger cannot give
            because it was closed (or cancelled) before or while running it.
        name: the name of the task that runs the groups.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        size: Callable[[T], int],
        limit: int,
        stopped: Callable[[T], R],
        name: str,
    ) -> None:
        self._run = run
        self._size = size
        self._limit = limit
        self._stopped = stopped
        self._name = name
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.merged = 0  # groups that carried more than one item (stats, tests)

    @property
    def busy(self) -> bool:
        """Whether a group is being run (then a new item waits for the next)."""
        return self._task is not None

    async def submit(self, item: T) -> R:
        """``item``'s result, once the group that carries it has run.

        A group that started finishes even if this caller is cancelled.
        """
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name=self._name)
        return await asyncio.shield(fut)

    async def close(self) -> None:
        """Stop: the group running and the items waiting get ``stopped``'s result."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        take, total = 0, 0
        for item, _ in self._waiting:
            n = self._size(item)
            if take and total + n > self._limit:
                break
            take, total = take + 1, total + n
        group, self._waiting = self._waiting[:take], self._waiting[take:]
        self.merged += take > 1
        return group

    async def _drain(self) -> None:
        group: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                group = self._take()
                try:
                    results = await self._run([item for item, _ in group])
                except Exception as e:
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                else:
                    for (_, fut), result in zip(group, results, strict=True):
                        if not fut.done():
                            fut.set_result(result)
                group = []
        finally:
            if self._task is asyncio.current_task():
                self._task = None
            for item, fut in [*group, *self._waiting]:  # only if cancelled
                if not fut.done():
                    fut.set_result(self._stopped(item))
            self._waiting = []
