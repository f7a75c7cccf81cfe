"""SQLite store: WAL, ``synchronous=FULL``, one writer, group commit.

Appends are queued and a single committer task writes whatever requests
arrived while the previous commit ran in ONE transaction with one
``executemany`` — so many concurrent appends share one fsync.  Each caller
hears back (its ``done`` callback, or its future) only after that
transaction committed.  A commit that started
finishes even if its caller is cancelled.

The ordering rules themselves live in :mod:`.ordering`.  The writer keeps each
session's ``(last_order, last_hash, last_clear)`` in
memory; the store takes an exclusive lock file so no second process can write
the same database behind that cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiosqlite

from shared.errors import ConvlogError, UnavailableError
from shared.messages import AppendReply, AppendRequest, SessionInfo

from .base import AppendDone, CommitListener, Committed, Page, StoreClosedError
from .ordering import Existing, Row, SessionState, decide, now_rfc3339, stored_entry

__all__ = ["SQLiteStore"]

log = logging.getLogger("convlog.store.sqlite")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    position   INTEGER PRIMARY KEY,
    session_id TEXT    NOT NULL,
    item_order INTEGER NOT NULL,
    item_id    TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    hidden     INTEGER NOT NULL DEFAULT 0,
    envelope   BLOB    NOT NULL,
    UNIQUE (session_id, item_order),
    -- item_id first: the ids LogClient mints are time-ordered (UUIDv7), so
    -- this index grows at its end and a commit dirties a page or two of it,
    -- not one page per item.  (Databases made before keep their
    -- (session_id, item_id) index; the two behave alike.)
    UNIQUE (item_id, session_id)
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    last_order INTEGER NOT NULL,
    last_hash  TEXT    NOT NULL,
    last_clear INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT    NOT NULL
) WITHOUT ROWID;
"""

_READ_CHUNK = 512
# The WAL is restarted past this size (see _checkpoint_loop), and a WAL file
# larger than this is cut back to it.  The two are equal on purpose: cutting
# a 1 GiB WAL file back to 64 MiB stalled appends for 750 ms; rewriting a
# file in place costs nothing extra.  Each restart under load still costs
# appends 100-300 ms (measured), hence a limit this high: about every 30 s at
# this machine's top sustained rate (the WAL grows ~33 MB/s at 12k appends/s),
# and never while the load pauses now and then (it then restarts by itself).
_WAL_SIZE_LIMIT = 1 << 30


@dataclass(slots=True)
class _Pending:
    session_id: str
    request: AppendRequest
    done: AppendDone
    answered: bool = False


def _answer(p: _Pending, out: AppendReply | ConvlogError) -> None:
    p.answered = True
    try:
        p.done(out)
    except Exception:  # a caller's callback must not break the batch
        log.exception("append callback failed")


def _resolve(fut: asyncio.Future[AppendReply], out: AppendReply | ConvlogError) -> None:
    if fut.done():  # the caller was cancelled; the commit stands regardless
        return
    if isinstance(out, ConvlogError):
        fut.set_exception(out)
    else:
        fut.set_result(out)


class SQLiteStore:
    """The default :class:`~services.log.store.base.LogStore` on one SQLite file.

    Args:
        path: the database file (created with its directory).
        max_batch: most append requests one transaction takes.
        max_cached_sessions: sessions whose chain head is kept in memory.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, max_batch: int = 512, max_cached_sessions: int = 100_000
    ) -> None:
        self.path = Path(path)
        self.max_batch = max_batch
        self.max_cached_sessions = max_cached_sessions
        self._w: sqlite3.Connection | None = None  # the single writer connection
        # A COMMIT followed by the writer's own WAL checkpoint runs here (see
        # _commit_batch); the connection is never used by two threads at once.
        self._fsync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlog-commit")
        self._r: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._committer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._ckpt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlog-checkpoint")
        # Checkpoints compete with commits for the disk: every 0.25-0.5 s put
        # the p99 of appends at half load near 30 ms; every 2 s, near 15 ms.
        self.checkpoint_interval = 2.0
        self.wal_restart_bytes = _WAL_SIZE_LIMIT
        self.wal_restarts = 0
        self._restart_wal = False  # set by the checkpointer, done by the writer
        self._states: dict[str, SessionState] = {}
        self._listeners: list[CommitListener] = []
        self._position = 0
        self._closed = False
        self.commits = 0  # transactions committed (for stats and tests)

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        if self._w is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._position = self._open_writer()
            self._r = await aiosqlite.connect(self.path, isolation_level=None)
            await self._r.execute("PRAGMA busy_timeout=10000")
            await self._r.execute("PRAGMA query_only=1")
        except (sqlite3.Error, OSError) as e:
            await self._close_connections()
            self._release_lock()
            raise UnavailableError(f"cannot open SQLite store {self.path}: {e}") from e
        self._committer = asyncio.create_task(self._commit_loop(), name="convlog-committer")
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="convlog-checkpoint")

    def _open_writer(self) -> int:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        # Checkpoints run on their own connection and thread (see
        # _checkpoint_loop): inside a COMMIT they stalled every append for the
        # tens of milliseconds a checkpoint takes.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        conn.executescript(_SCHEMA)
        self._w = conn
        row = conn.execute("SELECT COALESCE(MAX(position), 0) FROM items").fetchone()
        return int(row[0]) if row else 0

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database now and then, off the commit path,
        and keep the WAL from growing without bound.

        PASSIVE checkpoints never block the writer; they run on a separate
        connection in a separate thread, so their fsyncs do not delay commits.
        But under steady load a commit always lands while one runs, so the WAL
        is never wholly copied when a write starts and never starts over: it
        grew by megabytes a second, without limit.  So once it is over
        ``wal_restart_bytes``, this loop runs short passes back to back until
        one completes between two commits; the next commit then rewrites the
        WAL from its start.  Only if that keeps failing and the WAL reaches
        twice the limit does the writer copy the last frames itself,
        right after a COMMIT (:meth:`_finish_commit`), which stalls appends.
        With any pause in the load the WAL starts over by itself.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        loop = asyncio.get_running_loop()

        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])

        def checkpoint() -> int:
            """One PASSIVE pass; the WAL's size in bytes."""
            _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(frames) * page_size

        try:
            while not self._closed:
                await asyncio.sleep(self.checkpoint_interval)
                try:
                    size = await loop.run_in_executor(self._ckpt_pool, checkpoint)
                    if size <= self.wal_restart_bytes:
                        continue
                    # Short passes, back to back, until one completes between two
                    # commits: the next commit then starts the WAL over (it shrinks).
                    for _ in range(100):
                        now = await loop.run_in_executor(self._ckpt_pool, checkpoint)
                        if now < size:
                            self.wal_restarts += 1
                            break
                        size = now
                    else:
                        if size > 2 * self.wal_restart_bytes:
                            self._restart_wal = True  # last resort: the writer, between commits
                except sqlite3.Error as e:
                    log.warning("WAL checkpoint failed (will retry): %s", e)
        finally:
            await loop.run_in_executor(self._ckpt_pool, conn.close)

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise UnavailableError(
                f"SQLite store {self.path} is in use by another log service (lock {lock_path})"
            ) from e
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._committer)
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        await self._close_connections()
        self._release_lock()

    async def _close_connections(self) -> None:
        if self._r is not None:
            with contextlib.suppress(Exception):
                await self._r.close()
        if self._w is not None:
            with contextlib.suppress(Exception):
                self._w.close()
        self._w = self._r = None
        self._fsync.shutdown(wait=True)
        self._ckpt_pool.shutdown(wait=True)

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add_commit_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    # -- appends ---------------------------------------------------------
    def submit(self, session_id: str, request: AppendRequest, done: AppendDone) -> None:
        if self._closed or self._committer is None:
            raise StoreClosedError("the store is closed")
        self._queue.put_nowait(_Pending(session_id, request, done))

    async def append(self, session_id: str, request: AppendRequest) -> AppendReply:
        fut: asyncio.Future[AppendReply] = asyncio.get_running_loop().create_future()
        self.submit(session_id, request, partial(_resolve, fut))
        # If our caller is cancelled the commit still runs to completion in the
        # committer task; the cancellation is re-raised here.
        return await fut

    async def _commit_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            # Let the requests that arrived with this one (already-scheduled
            # tasks) reach the queue, to share this commit; and, after a
            # backlog of more than one batch, let the last batch's replies
            # out before the next (the COMMIT itself never yields).
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

    def _finish_commit(self, restart_wal: bool) -> None:
        """COMMIT; then, when the checkpointer asks (on the commit thread),
        copy the last WAL frames, so that the next transaction starts the WAL
        over.  Only here, between two transactions of the only writer, can a
        checkpoint under steady load complete."""
        assert self._w is not None
        self._w.execute("COMMIT")
        if restart_wal:
            try:
                busy, _frames, _copied = self._w.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy:
                    self._restart_wal = True  # try again after the next commit
                else:
                    self.wal_restarts += 1
            except sqlite3.Error as e:  # the commit stands; the next request retries it
                log.warning("WAL checkpoint after commit failed: %s", e)

    def _load_states(self, sids: set[str]) -> None:
        assert self._w is not None
        missing = [s for s in sids if s not in self._states]
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            q = ",".join("?" * len(chunk))
            for sid, last, h, clear in self._w.execute(
                f"SELECT session_id, last_order, last_hash, last_clear FROM sessions "
                f"WHERE session_id IN ({q})",
                chunk,
            ):
                self._states[sid] = SessionState(last, h, clear)
        for s in missing:
            self._states.setdefault(s, SessionState())

    def _existing_ids(self, wanted: dict[str, set[str]]) -> dict[tuple[str, str], Existing]:
        """(session, item_id) -> (order, hash, content digest) for ids already stored."""
        assert self._w is not None
        pairs = [[sid, iid] for sid, ids in wanted.items() for iid in ids]
        if not pairs:
            return {}
        found: dict[tuple[str, str], Existing] = {}
        for sid, iid, order, env in self._w.execute(
            "SELECT i.session_id, i.item_id, i.item_order, i.envelope FROM json_each(?) j "
            "JOIN items i ON i.session_id = j.value->>0 AND i.item_id = j.value->>1",
            (json.dumps(pairs),),
        ):
            found[(sid, iid)] = stored_entry(order, env)
        return found

    def _kinds_of(self, targets: dict[str, set[int]]) -> dict[tuple[str, int], str]:
        assert self._w is not None
        pairs = [[sid, t] for sid, ts in targets.items() for t in ts]
        if not pairs:
            return {}
        rows = self._w.execute(
            "SELECT i.session_id, i.item_order, i.kind FROM json_each(?) j "
            "JOIN items i ON i.session_id = j.value->>0 AND i.item_order = j.value->>1",
            (json.dumps(pairs),),
        )
        return {(sid, o): k for sid, o, k in rows}

    async def _commit(self, batch: list[_Pending]) -> None:
        outcomes, committed = await self._commit_batch(batch)
        for p, out in zip(batch, outcomes, strict=True):
            _answer(p, out)
        if committed:
            for listener in self._listeners:
                res = listener(committed)
                if asyncio.iscoroutine(res):
                    await res

    async def _commit_batch(
        self, batch: list[_Pending], *, careful: bool = False
    ) -> tuple[list[AppendReply | ConvlogError], list[Committed]]:
        """Decide and commit one batch.

        All of it runs on the event loop, the COMMIT included: its fsync
        (about a millisecond here) blocks the loop, and requests arriving
        meanwhile wait in the socket for the next batch, as they would anyway.
        Handing the COMMIT to a helper thread cost more than it overlapped:
        waking the thread and getting the GIL back behind the busy loop made
        appends 20% slower and doubled the p99 at half load (measured).  Only
        the writer's rare last-resort WAL checkpoint (:meth:`_finish_commit`)
        goes to a thread.  Handing the whole batch to a thread was slower
        still: every sqlite3 step released the GIL and queued for it again.

        Optimistic by default: an ``item_id`` is looked up only where the
        answer changes the decision (``expected_last`` behind); every other
        duplicate is caught by the unique index (``ON CONFLICT DO NOTHING``
        writes fewer rows than planned), and then the batch is rolled back and
        decided again with every id looked up (``careful``).  Retries are rare,
        so the common batch costs no lookup at all.
        """
        assert self._w is not None
        sids = {p.session_id for p in batch}
        self._load_states(sids)
        wanted: dict[str, set[str]] = {}
        targets: dict[str, set[int]] = {}
        for p in batch:
            st = self._states[p.session_id]
            behind = p.request.expected_last is not None and p.request.expected_last != st.last_order
            for it in p.request.items:
                if st.last_order and it.item_id is not None and (careful or behind):
                    wanted.setdefault(p.session_id, set()).add(it.item_id)
                if it.kind == "retract" and isinstance(it.data.get("target"), int):
                    targets.setdefault(p.session_id, set()).add(it.data["target"])
        existing = self._existing_ids(wanted)
        stored_kinds = self._kinds_of(targets)

        # Work on copies so a failed transaction leaves the cache untouched.
        work = {s: self._states[s].copy() for s in sids}
        outcomes: list[AppendReply | ConvlogError] = []
        rows: list[Row] = []
        position = self._position
        created_at = now_rfc3339()
        for p in batch:
            try:
                reply, new_rows = decide(
                    p.session_id, p.request, work[p.session_id], existing, stored_kinds, created_at, position
                )
            except ConvlogError as e:
                outcomes.append(e)
                continue
            outcomes.append(reply)
            rows.extend(new_rows)
            if new_rows:
                position = new_rows[-1][0]
        if not rows:
            return outcomes, []
        touched = {r[1] for r in rows}
        try:
            self._w.execute("BEGIN IMMEDIATE")
            inserted = self._w.executemany(
                "INSERT INTO items (position, session_id, item_order, item_id, kind, envelope) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id, item_id) DO NOTHING",
                [r[:6] for r in rows],
            ).rowcount
            if inserted != len(rows):
                # An item_id was already stored (a retry): decide again, carefully.
                self._w.execute("ROLLBACK")
                if careful:
                    raise sqlite3.IntegrityError("duplicate item_id after a careful lookup")
                return await self._commit_batch(batch, careful=True)
            hides = [(r[1], r[6]) for r in rows if r[4] == "retract"]
            if hides:
                self._w.executemany("UPDATE items SET hidden = 1 WHERE session_id = ? AND item_order = ?", hides)
            self._w.executemany(
                "INSERT INTO sessions (session_id, last_order, last_hash, last_clear, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET "
                "last_order = excluded.last_order, last_hash = excluded.last_hash, "
                "last_clear = excluded.last_clear, updated_at = excluded.updated_at",
                [(s, work[s].last_order, work[s].last_hash, work[s].last_clear, created_at) for s in touched],
            )
            restart, self._restart_wal = self._restart_wal, False
            if restart:  # the writer's own checkpoint can copy gigabytes: not on the loop
                await asyncio.get_running_loop().run_in_executor(self._fsync, self._finish_commit, restart)
            else:
                self._finish_commit(restart)
        except sqlite3.Error as e:
            log.error("commit of %d items failed: %s", len(rows), e)
            with contextlib.suppress(sqlite3.Error):
                self._w.execute("ROLLBACK")
            err = UnavailableError("the store could not commit; nothing was written")
            return [
                err if isinstance(out, AppendReply) and any(not i.duplicate for i in out.items) else out
                for out in outcomes
            ], []
        self.commits += 1
        self._position = position
        for s in touched:
            work[s].batch_kinds.clear()
            work[s].batch_ids.clear()
            self._states.pop(s, None)  # re-insert: the dict's order is recency of use
            self._states[s] = work[s]
        while len(self._states) > self.max_cached_sessions:
            # Forget the least recently written session; it reloads from `sessions`.
            del self._states[next(iter(self._states))]
        return outcomes, [Committed(r[0], r[1], r[2], r[5]) for r in rows]

    # -- reads -----------------------------------------------------------
    def _reader(self) -> aiosqlite.Connection:
        if self._r is None:
            raise StoreClosedError("the store is closed")
        return self._r

    async def last_order(self, session_id: str) -> int:
        st = self._states.get(session_id)
        if st is not None:
            return st.last_order
        async with self._reader().execute(
            "SELECT last_order FROM sessions WHERE session_id = ?", (session_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _last_clear(self, session_id: str) -> int:
        st = self._states.get(session_id)
        if st is not None:
            return st.last_clear
        async with self._reader().execute(
            "SELECT last_clear FROM sessions WHERE session_id = ?", (session_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def read(
        self, session_id: str, *, after: int, limit: int, max_bytes: int, visible: bool = False
    ) -> Page:
        r = self._reader()
        # Take last_order first and read no further than it: a commit whose
        # COMMIT has finished but whose cache update has not yet run must not
        # show items beyond the last_order the reply reports.
        last = await self.last_order(session_id)
        if visible:
            after = max(after, await self._last_clear(session_id))
            sql = (
                "SELECT envelope FROM items WHERE session_id = ? AND item_order > ? "
                "AND item_order <= ? AND kind = 'item' AND hidden = 0 ORDER BY item_order LIMIT ?"
            )
        else:
            sql = (
                "SELECT envelope FROM items WHERE session_id = ? AND item_order > ? "
                "AND item_order <= ? ORDER BY item_order LIMIT ?"
            )
        items: list[bytes] = []
        size = 0
        more = False
        async with r.execute(sql, (session_id, after, last, limit + 1)) as cur:
            # Fetch in chunks and stop at the byte budget: SQLite steps lazily,
            # so a page that fills after 2,000 rows does not read 10,000.
            while not more:
                rows = await cur.fetchmany(_READ_CHUNK)
                if not rows:
                    break
                for (env,) in rows:
                    if len(items) == limit or (items and size + len(env) + 1 > max_bytes):
                        more = True
                        break
                    items.append(env)
                    size += len(env) + 1
        return Page(items, last, more)

    async def tail(self, session_id: str, n: int, *, visible: bool = True) -> Page:
        r = self._reader()
        last = await self.last_order(session_id)  # first, as in read()
        if n <= 0:
            return Page([], last, False)
        if visible:
            sql = (
                "SELECT envelope FROM items WHERE session_id = ? AND item_order > ? "
                "AND item_order <= ? AND kind = 'item' AND hidden = 0 "
                "ORDER BY item_order DESC LIMIT ?"
            )
            args: tuple[object, ...] = (session_id, await self._last_clear(session_id), last, n)
        else:
            sql = (
                "SELECT envelope FROM items WHERE session_id = ? AND item_order <= ? "
                "ORDER BY item_order DESC LIMIT ?"
            )
            args = (session_id, last, n)
        async with r.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return Page([env for (env,) in reversed(rows)], last, False)

    async def sessions(self, *, after: str | None, limit: int) -> tuple[list[SessionInfo], bool]:
        async with self._reader().execute(
            "SELECT session_id, last_order, updated_at FROM sessions WHERE session_id > ? "
            "ORDER BY session_id LIMIT ?",
            (after or "", limit + 1),
        ) as cur:
            rows = await cur.fetchall()
        infos = [SessionInfo(session_id=s, last_order=o, updated_at=u) for s, o, u in rows[:limit]]
        return infos, len(rows) > limit

    async def committed_after(self, position: int, limit: int) -> list[Committed]:
        async with self._reader().execute(
            "SELECT position, session_id, item_order, envelope FROM items WHERE position > ? "
            "ORDER BY position LIMIT ?",
            (position, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [Committed(p, s, o, bytes(e)) for p, s, o, e in rows]

    async def position_of(self, session_id: str, item_order: int) -> int | None:
        async with self._reader().execute(
            "SELECT position FROM items WHERE session_id = ? AND item_order = ?",
            (session_id, item_order),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else None
