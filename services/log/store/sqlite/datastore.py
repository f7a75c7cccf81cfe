"""The SQLite datastore: the file, its connections, pragmas, lock and checkpoints.

What it owns and nothing else: one exclusive lock file (no second process
may write the database behind the recorder's cache), one writer connection in
WAL mode with ``synchronous=FULL``, one read-only reader connection, and the
WAL checkpointer that keeps the WAL from growing without bound.  The SQL of
the log lives in :mod:`.recorder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiosqlite

from shared.errors import UnavailableError
from shared.failures import is_transient

from ..base import StoreClosedError

__all__ = ["WAL_SIZE_LIMIT", "SQLiteDatastore", "db_lock_path"]

log = logging.getLogger("convlog.store.sqlite")

# The WAL is restarted past this size (see _checkpoint_loop), and a WAL file
# larger than this is cut back to it.  The two are equal on purpose: cutting
# a 1 GiB WAL file back to 64 MiB stalled appends for 750 ms; rewriting a
# file in place costs nothing extra.  Each restart under load still costs
# appends 100-300 ms (measured), hence a limit this high: about every 30 s at
# this machine's top sustained rate (the WAL grows ~33 MB/s at 12k appends/s),
# and never while the load pauses now and then (it then restarts by itself).
WAL_SIZE_LIMIT = 1 << 30


def db_lock_path(db: Path) -> Path:
    """The lock file a store holds while it writes ``db``: next to the file itself, not
    to a link to it, so every name of one database takes the same lock."""
    real = Path(db).resolve()
    return real.with_name(real.name + ".lock")


class SQLiteDatastore:
    """Connections to one SQLite file, opened with the pragmas the log needs.

    Args:
        path: the database file (created with its directory).
        schema: SQL run on the writer connection at open (idempotent DDL).
    """

    def __init__(self, path: str | os.PathLike[str], schema: str) -> None:
        self.path = Path(path)
        self._schema = schema
        self.writer: sqlite3.Connection | None = None  # the single writer connection
        self.reader: aiosqlite.Connection | None = None
        # The writer's rare last-resort checkpoint after a COMMIT runs here;
        # the connection is never used by two threads at once.
        self.commit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlog-commit")
        self._ckpt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlog-checkpoint")
        self._lock_fd: int | None = None
        self._file_fd: int | None = None  # the database file itself, locked too (see _take_lock)
        self._checkpointer: asyncio.Task[None] | None = None
        self._closed = False
        # Checkpoints compete with commits for the disk: every 0.25-0.5 s put
        # the p99 of appends at half load near 30 ms; every 2 s, near 15 ms.
        self.checkpoint_interval = 2.0
        self.wal_restart_bytes = WAL_SIZE_LIMIT
        self.wal_restarts = 0
        self.restart_wal = False  # set by the checkpointer, done by the writer

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        """Take the lock, open both connections, start the checkpointer.

        Raises:
            UnavailableError: the file is locked by another process or cannot be opened.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._open_writer()
            self.reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self.reader.execute("PRAGMA busy_timeout=10000")
            await self.reader.execute("PRAGMA query_only=1")
        except (sqlite3.Error, OSError) as e:
            await self._close_connections(keep_pools=True)  # open_store may try again
            self._release_lock()
            raise UnavailableError(f"cannot open SQLite store {self.path}: {e}") from e
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="convlog-checkpoint")

    def _open_writer(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        # Checkpoints run on their own connection and thread (see
        # _checkpoint_loop): inside a COMMIT they stalled every append for the
        # tens of milliseconds a checkpoint takes.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        conn.executescript(self._schema)
        self.writer = conn

    @property
    def checkpointer(self) -> asyncio.Task[None] | None:
        """The checkpoint task: it ends with the error of a non-transient failure."""
        return self._checkpointer

    async def close(self) -> None:
        """Stop the checkpointer, close the connections, release the lock.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            # wait() does not raise the error a failed checkpointer ended with
            # (its watcher reported it)
            await asyncio.wait({self._checkpointer})
        await self._close_connections()
        self._release_lock()

    async def _close_connections(self, *, keep_pools: bool = False) -> None:
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await self.reader.close()
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.writer = self.reader = None
        if keep_pools:
            return
        self.commit_pool.shutdown(wait=True)
        self._ckpt_pool.shutdown(wait=True)

    def read_connection(self) -> aiosqlite.Connection:
        """The reader connection.

        Raises:
            StoreClosedError: the datastore is closed.
        """
        if self.reader is None:
            raise StoreClosedError("the store is closed")
        return self.reader

    # -- the lock --------------------------------------------------------
    def _take_lock(self) -> None:
        lock_path = db_lock_path(self.path)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise UnavailableError(
                f"SQLite store {self.path} is in use by another log service (lock {lock_path})"
            ) from e
        except OSError as e:  # not held, but not lockable here (ENOLCK: NFS without a lock daemon)
            os.close(fd)
            raise UnavailableError(_unlockable(self.path, lock_path, e)) from e
        self._lock_fd = fd
        # The lock file is named after this name of the database: another name of the same
        # file (a hard link) takes another one, so the file itself is locked too.  flock, not
        # SQLite's POSIX locks, which it leaves alone; its descriptor is closed only after
        # SQLite's connections (closing it would drop this process's POSIX locks on the file).
        try:
            file_fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)  # empty: SQLite makes a new database of it
        except OSError as e:
            self._release_lock()
            raise UnavailableError(f"cannot open SQLite store {self.path}: {e}") from e
        try:
            fcntl.flock(file_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(file_fd)
            self._release_lock()
            if not isinstance(e, BlockingIOError):
                raise UnavailableError(_unlockable(self.path, self.path, e)) from e
            raise UnavailableError(
                f"SQLite store {self.path} is in use by another log service (under another name: a hard link)"
            ) from e
        self._file_fd = file_fd

    def _release_lock(self) -> None:
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- commits and checkpoints ------------------------------------------
    def finish_commit(self, restart_wal: bool) -> None:
        """COMMIT; then, when the checkpointer asks (on the commit thread),
        copy the last WAL frames, so that the next transaction starts the WAL
        over.  Only here, between two transactions of the only writer, can a
        checkpoint under steady load complete."""
        assert self.writer is not None
        self.writer.execute("COMMIT")
        if restart_wal:
            try:
                busy, _frames, _copied = self.writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy:
                    self.restart_wal = True  # try again after the next commit
                else:
                    self.wal_restarts += 1
            except sqlite3.Error as e:  # the commit stands; the next request retries it
                log.warning("WAL checkpoint after commit failed: %s", e)

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
        right after a COMMIT (:meth:`finish_commit`), which stalls appends.
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
                        if size > 2 * self.wal_restart_bytes and not self.restart_wal:
                            # Last resort, as soon as it is needed (after the passes, the WAL
                            # had grown by tens of megabytes under a steady load): the writer,
                            # between two commits.
                            self.restart_wal = True
                except sqlite3.Error as e:
                    if not is_transient(e):  # a disk or file error: restart the process
                        raise
                    log.warning("WAL checkpoint failed (will retry): %s", e)
        finally:
            await loop.run_in_executor(self._ckpt_pool, conn.close)


def _unlockable(db: Path, path: Path, e: OSError) -> str:
    """What a ``flock`` that failed for another reason than a holder says (it was
    called "in use by another log service", sending the operator after a process
    that does not exist)."""
    return (f"cannot lock SQLite store {db}: flock on {path} failed: {e.strerror or e} "
            "(the one-writer lock needs flock; some network filesystems lack it: put the log "
            "on a local disk)")
