"""Forward reads: the next page is read while the page before it travels.

A reader paging forward (``LogClient.iter_items``, ``convlog replay``) asks
for page k+1 only once page k has arrived, so without this the service
would read a page, then sit idle while the reply crosses nats-server to the
reader, then read the next.  After answering a forward page that says
``more``, :class:`ReadAhead` starts reading the page that follows it (same
session, limit, byte budget and raw/visible choice, ``after`` = the page's
last item), so the store's read of page k+1 overlaps the delivery of page k;
the request for it then takes the page read ahead.

What the reader gets is what a read at the request's own time gives:

* a read-ahead page is used only with the session's head read fresh at the
  request: a raw page that was full (``more``) holds committed envelopes,
  which never change, and gets the fresh ``last_order``; any other page
  (visible, whose items a later retract or clear could hide, or the last
  page) only when nothing was appended since it was read, else the store
  reads it again;
* a failed read ahead is forgotten, and the request reads as without it.

A few pages are held (:data:`MAX_PAGES`, each under the max payload); those
older than :data:`TTL` seconds are dropped when the next one is read ahead (one
taken later is checked as above all the same); with several service instances the next
request may go to another one, which then reads it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec

from .store.base import LogStore, Page

__all__ = ["MAX_PAGES", "TTL", "ReadAhead"]

#: Pages read ahead and not yet asked for, at most (the oldest is dropped).
MAX_PAGES = 8
#: Seconds a page read ahead waits for its request.
TTL = 5.0

Key = tuple[str, int, int, int, bool]  # session, after, limit, max_bytes, visible


class _Order(msgspec.Struct):
    item_order: int


_order_of = msgspec.json.Decoder(_Order)


class ReadAhead:
    """Forward reads of ``store`` with the next page read ahead (see the module)."""

    def __init__(self, store: LogStore, *, max_pages: int = MAX_PAGES, ttl: float = TTL) -> None:
        self.store = store
        self.max_pages = max_pages
        self.ttl = ttl
        self.used = 0  # requests served from a page read ahead (for tests and stats)
        self._ahead: dict[Key, tuple[float, asyncio.Task[Page]]] = {}

    async def read(self, session_id: str, *, after: int, limit: int, max_bytes: int, visible: bool) -> Page:
        """One forward page, as ``store.read`` gives it; then the next one is read ahead."""
        key = (session_id, after, limit, max_bytes, visible)
        page = await self._take(key)
        if page is None:
            page = await self.store.read(session_id, after=after, limit=limit, max_bytes=max_bytes, visible=visible)
        else:
            self.used += 1
        if page.more and page.items:
            try:
                last = _order_of.decode(page.items[-1]).item_order
            except (msgspec.DecodeError, RecursionError):  # a stored envelope edited by hand
                return page  # served as stored (the reader names it), nothing read ahead
            self._start((session_id, last, limit, max_bytes, visible))
        return page

    async def _take(self, key: Key) -> Page | None:
        entry = self._ahead.pop(key, None)
        if entry is None:
            return None
        try:
            page = await entry[1]
        except Exception:
            return None  # read again, as without read-ahead
        last = await self.store.last_order(key[0])
        if last == page.last_order:
            return page
        if page.more and not key[4]:  # raw and full: committed envelopes only
            return Page(page.items, last, True)
        return None

    def _start(self, key: Key) -> None:
        now = time.monotonic()
        for k, (at, task) in list(self._ahead.items()):
            if now - at > self.ttl:
                self._drop(k, task)
        while len(self._ahead) >= self.max_pages:
            k = next(iter(self._ahead))
            self._drop(k, self._ahead[k][1])
        if key in self._ahead:
            return
        sid, after, limit, max_bytes, visible = key
        task = asyncio.create_task(
            self.store.read(sid, after=after, limit=limit, max_bytes=max_bytes, visible=visible)
        )
        task.add_done_callback(_retrieve)
        self._ahead[key] = (now, task)

    def _drop(self, key: Key, task: asyncio.Task[Page]) -> None:
        del self._ahead[key]
        task.cancel()

    async def close(self) -> None:
        """Cancel every read ahead (before the store closes)."""
        tasks = [task for _, task in self._ahead.values()]
        self._ahead.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def _retrieve(task: asyncio.Task[Page]) -> None:
    """A read ahead nobody asked for may fail or be cancelled: not an error."""
    if not task.cancelled():
        task.exception()
