"""The SQLite store's reads: ``read``, ``tail``, ``sessions``, ``last_order`` and the
global commit order (``committed_after``, ``position_of``).

Every read takes the session's head first and reads as of it (see
:meth:`SQLiteReads.read`), with the reader connection to itself (see
:meth:`SQLiteReads._reading`).  A mixin of :class:`~.recorder.SQLiteStore`, which
owns the state declared below.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiosqlite

from shared.messages import SessionInfo

from ..base import Committed, Page
from ..ordering import SessionState
from .datastore import SQLiteDatastore

__all__ = ["SQLiteReads"]

_READ_CHUNK = 512
#: Rows of a read's first fetch: a usual page or tail (a model's window of 50, a
#: worker's page of 64 and its look-ahead row) in one thread hop, and at most this
#: many items held to find a page of large items over the budget.
_FIRST_CHUNK = 65


def _next_chunk(max_bytes: int, size: int, n: int) -> int:
    """Rows to fetch next: about what is left of ``max_bytes`` at the average size so far."""
    return min(_READ_CHUNK, max(max_bytes - size, 0) * n // max(size, 1) + 2)


class SQLiteReads:
    """Reads on the datastore's read connection (state owned by ``SQLiteStore``)."""

    datastore: SQLiteDatastore
    _states: dict[str, SessionState]
    _read_lock: asyncio.Lock

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """The reader connection, to one read at a time.

        SQLite keeps one read snapshot per connection for as long as any statement
        on it is still stepping: a read that began while another's statement was
        open between two of its chunks read as of that older snapshot, under a head
        taken (from the cache) after it, and left out items acknowledged before it
        was asked (``more: false``, ``last_order`` naming them).  Reads ran one after
        another on the connection's thread anyway; now each statement starts a
        snapshot of its own.
        """
        async with self._read_lock:
            yield self._reader()

    def _reader(self) -> aiosqlite.Connection:
        return self.datastore.read_connection()

    async def last_order(self, session_id: str) -> int:
        st = self._states.get(session_id)
        if st is not None:
            return st.last_order
        async with self._reading() as r, r.execute(
            "SELECT last_order FROM sessions WHERE session_id = ?", (session_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _head(self, r: aiosqlite.Connection, session_id: str) -> tuple[int, int]:
        """``(last_order, last_clear)`` as of one moment (the cache, or one row)."""
        st = self._states.get(session_id)
        if st is not None:
            return st.last_order, st.last_clear
        async with r.execute(
            "SELECT last_order, last_clear FROM sessions WHERE session_id = ?", (session_id,)
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def read(
        self, session_id: str, *, after: int, limit: int, max_bytes: int, visible: bool = False
    ) -> Page:
        async with self._reading() as r:
            return await self._read(r, session_id, after, limit, max_bytes, visible)

    async def _read(
        self, r: aiosqlite.Connection, session_id: str, after: int, limit: int, max_bytes: int, visible: bool
    ) -> Page:
        # Take the head first and read as of it: the reader runs on its own
        # thread and may see commits made after that moment, which must not
        # show (items beyond ``last``) nor hide (a later retract) anything.
        last, clear = await self._head(r, session_id)
        if visible:
            after = max(after, clear)
            sql = (
                "SELECT envelope FROM items WHERE session_id = ? AND item_order > ? "
                "AND item_order <= ? AND kind = 'item' AND (hidden = 0 OR hidden > ?) "
                "ORDER BY item_order LIMIT ?"
            )
            args: tuple[object, ...] = (session_id, after, last, last, limit + 1)
        else:
            sql = (
                "SELECT envelope FROM items WHERE session_id = ? AND item_order > ? "
                "AND item_order <= ? ORDER BY item_order LIMIT ?"
            )
            args = (session_id, after, last, limit + 1)
        items: list[bytes] = []
        size = 0
        more = False
        async with r.execute(sql, args) as cur:
            # Fetch in chunks and stop at the byte budget: SQLite steps lazily,
            # so a page that fills after 2,000 rows does not read 10,000.  The
            # chunks are sized to what is left of the budget (a page of large
            # items does not fetch 512 of them to send 4).
            chunk = min(_FIRST_CHUNK, limit + 1)
            while not more:
                rows = await cur.fetchmany(chunk)
                if not rows:
                    break
                for (env,) in rows:
                    if len(items) == limit or (items and size + len(env) + 1 > max_bytes):
                        more = True
                        break
                    items.append(env)
                    size += len(env) + 1
                if len(rows) < chunk:
                    break  # the rows ran out: no call to learn it
                chunk = _next_chunk(max_bytes, size, len(items))
        return Page(items, last, more)

    async def tail(
        self, session_id: str, n: int, *, visible: bool = True, max_bytes: int | None = None
    ) -> Page:
        async with self._reading() as r:
            return await self._tail(r, session_id, n, visible, max_bytes)

    async def _tail(
        self, r: aiosqlite.Connection, session_id: str, n: int, visible: bool, max_bytes: int | None
    ) -> Page:
        last, clear = await self._head(r, session_id)  # first, as in read()
        if n <= 0:
            return Page([], last, False)
        if visible:
            sql = (
                "SELECT envelope FROM items WHERE session_id = ? AND item_order > ? "
                "AND item_order <= ? AND kind = 'item' AND (hidden = 0 OR hidden > ?) "
                "ORDER BY item_order DESC LIMIT ?"
            )
            args: tuple[object, ...] = (session_id, clear, last, last, n)
        else:
            sql = (
                "SELECT envelope FROM items WHERE session_id = ? AND item_order <= ? "
                "ORDER BY item_order DESC LIMIT ?"
            )
            args = (session_id, last, n)
        items: list[bytes] = []
        size = 0
        async with r.execute(sql, args) as cur:
            if max_bytes is None:
                items = [env for (env,) in await cur.fetchall()]
            else:
                # Newest first, in chunks sized to what is left of the budget:
                # a tail over it is refused having read little more than it.
                chunk = min(_FIRST_CHUNK, n)
                while rows := await cur.fetchmany(chunk):
                    for (env,) in rows:
                        size += len(env) + 1
                        if size > max_bytes:
                            return Page([], last, True)
                        items.append(env)
                    if len(rows) < chunk or len(items) == n:
                        break  # the rows ran out: no call to learn it
                    chunk = _next_chunk(max_bytes, size, len(items))
        items.reverse()
        return Page(items, last, False)

    async def sessions(self, *, after: str | None, limit: int) -> tuple[list[SessionInfo], bool]:
        async with self._reading() as r, r.execute(
            "SELECT session_id, last_order, updated_at FROM sessions WHERE session_id > ? "
            "ORDER BY session_id LIMIT ?",
            (after or "", limit + 1),
        ) as cur:
            rows = await cur.fetchall()
        infos = [SessionInfo(session_id=s, last_order=o, updated_at=u) for s, o, u in rows[:limit]]
        return infos, len(rows) > limit

    async def committed_after(self, position: int, limit: int) -> list[Committed]:
        async with self._reading() as r, r.execute(
            "SELECT position, session_id, item_order, envelope FROM items WHERE position > ? "
            "ORDER BY position LIMIT ?",
            (position, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [Committed(p, s, o, bytes(e)) for p, s, o, e in rows]

    async def recent_heads(self, within: float) -> list[tuple[str, bytes]]:
        """The newest envelope of each session written within ``within`` seconds of the
        log's last commit (its ``updated_at``): what a head witness may have had still
        to sign when the process that committed them died."""
        stamp = "%Y-%m-%dT%H:%M:%S.%fZ"  # ordering.now_rfc3339's
        async with self._reading() as r:
            async with r.execute("SELECT MAX(updated_at) FROM sessions") as cur:
                row = await cur.fetchone()
        try:
            last = datetime.strptime(row[0], stamp).replace(tzinfo=UTC)
            since = (last - timedelta(seconds=within)).strftime(stamp)
        except (TypeError, ValueError):  # no session yet
            return []
        async with self._reading() as r, r.execute(
            "SELECT s.session_id, i.envelope FROM sessions s JOIN items i "
            "ON i.session_id = s.session_id AND i.item_order = s.last_order WHERE s.updated_at >= ?",
            (since,),
        ) as cur:
            rows = await cur.fetchall()
        return [(sid, bytes(env)) for sid, env in rows]

    async def position_of(self, session_id: str, item_order: int) -> int | None:
        async with self._reading() as r, r.execute(
            "SELECT position FROM items WHERE session_id = ? AND item_order = ?",
            (session_id, item_order),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else None
