"""The SQLite store passes the store conformance suite, plus SQLite specifics."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
import pytest

from services.log.store.base import LogStore
from services.log.store.sqlite import SQLiteStore

from .store_helpers import item, read_all, req, retract
from .store_suite import StoreSuite


async def writer_pragma(store: SQLiteStore, name: str) -> Any:
    """A pragma's value on the connection the store commits through."""
    conn = store._w
    assert conn is not None, "the store has no writer connection"
    if isinstance(conn, aiosqlite.Connection):
        async with conn.execute(f"PRAGMA {name}") as cur:
            return (await cur.fetchone())[0]
    # A plain sqlite3 connection owned by a writer thread: ask on that thread.
    in_writer = getattr(store, "_in_writer", None)
    if in_writer is not None:
        return await in_writer(lambda: conn.execute(f"PRAGMA {name}").fetchone()[0])
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


class TestSQLiteStore(StoreSuite):
    async def make_store(self, tmp_path: Path) -> SQLiteStore:
        store = SQLiteStore(tmp_path / "log.db")
        await store.open()
        return store

    async def test_implements_the_store_protocol(self, store: SQLiteStore) -> None:
        assert isinstance(store, LogStore)

    async def test_wal_and_synchronous_full(self, store: SQLiteStore, tmp_path: Path) -> None:
        # synchronous is per connection: ask the store's own writer connection.
        assert await writer_pragma(store, "synchronous") == 2  # FULL
        assert await writer_pragma(store, "journal_mode") == "wal"
        await store.append("s", req(item("x")))
        # WAL mode is recorded in the file itself.
        conn = sqlite3.connect(tmp_path / "log.db")
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()

    async def test_open_is_idempotent_and_creates_the_directory(self, tmp_path: Path) -> None:
        store = SQLiteStore(tmp_path / "deep" / "dir" / "log.db")
        await store.open()
        try:
            await store.open()
            await store.append("s", req(item("x")))
            assert [e.item_order for e in await read_all(store, "s")] == [1]
        finally:
            await store.close()

    async def test_the_wal_starts_over_under_steady_load(self, tmp_path: Path) -> None:
        # Under steady load a commit always lands while a PASSIVE checkpoint
        # runs, so without the writer's help the WAL never restarts and grows
        # by megabytes a second.  With a small limit, it must stay small.
        store = SQLiteStore(tmp_path / "log.db")
        store.checkpoint_interval = 0.02
        store.wal_restart_bytes = 256 * 1024
        await store.open()
        wal = tmp_path / "log.db-wal"
        biggest = 0
        rounds = 0
        first: int | None = None  # the round after which the WAL had first started over
        at_first = 0  # the WAL file's size then (it never shrinks: a high-water mark)
        try:
            # The checkpointer's thread may first run late on a busy machine, so the
            # WAL may grow some megabytes before it first starts over; what must hold
            # is that it then stops growing: 40 more rounds write ~14 MB of frames,
            # which without restarts would all be new file.
            while (first is None or rounds < first + 40) and rounds < 400:
                await asyncio.gather(
                    *(store.append(f"s{i}", req(item(f"r{rounds} " + "x" * 200))) for i in range(50))
                )
                rounds += 1
                biggest = max(biggest, wal.stat().st_size)
                if first is None and store.wal_restarts > 0:
                    first, at_first = rounds, biggest
            assert first is not None, "the WAL never started over"
            assert biggest - at_first < 4 * 1024 * 1024, (at_first, biggest)
            for i in range(50):
                assert [e.item_order for e in await read_all(store, f"s{i}")] == list(range(1, rounds + 1))
        finally:
            await store.close()

    async def test_the_writer_can_restart_the_wal_between_two_commits(self, tmp_path: Path) -> None:
        # The last resort when no checkpoint pass completes between commits:
        # the writer copies the last frames right after a COMMIT, and the
        # commits after it write the WAL from its start instead of its end.
        store = SQLiteStore(tmp_path / "log.db")
        store.checkpoint_interval = 3600  # no help from the checkpointer
        await store.open()
        wal = tmp_path / "log.db-wal"
        try:
            for i in range(20):
                await store.append(f"s{i}", req(item("x" * 200)))
            store._restart_wal = True
            await store.append("s0", req(item("copied after this commit")))
            assert store.wal_restarts == 1 and not store._restart_wal
            size = wal.stat().st_size
            for i in range(3):
                await store.append(f"s{i}", req(item("overwrites the WAL's first frames")))
            assert wal.stat().st_size == size
            assert [e.item_order for e in await read_all(store, "s0")] == [1, 2, 3]
        finally:
            await store.close()

    @pytest.mark.parametrize("cached", [True, False], ids=["head-cached", "head-from-the-table"])
    @pytest.mark.parametrize("how", ["tail", "read"])
    async def test_a_visible_read_is_as_of_its_last_order_despite_a_retract_committed_meanwhile(
        self, tmp_path: Path, how: str, cached: bool
    ) -> None:
        # The reader runs on its own thread: a retract committed after the read
        # took its last_order must not hide an item from a reply that reports
        # that last_order (the read shows the visible history of 1..last).
        store = SQLiteStore(tmp_path / "log.db")
        await store.open()
        try:
            await store.append("s", req(item("a"), item("b"), item("c")))
            if not cached:
                store._states.clear()  # as after a restart: the head comes from the table
            real = store._reader

            class RetractFirst:
                """The reader, but a retract of order 3 commits before each query runs."""

                def __init__(self) -> None:
                    self.conn = real()

                @contextlib.asynccontextmanager
                async def execute(self, sql: str, args: Any = ()) -> Any:
                    if "FROM items" in sql:
                        await store.append("s", req(retract(3)))
                    async with self.conn.execute(sql, args) as cur:
                        yield cur

            store._reader = RetractFirst  # type: ignore[method-assign]
            if how == "tail":
                page = await store.tail("s", 10)
            else:
                page = await store.read("s", after=0, limit=10, max_bytes=1 << 20, visible=True)
            store._reader = real  # type: ignore[method-assign]
            assert page.last_order == 3
            assert [msgspec.json.decode(e)["data"]["content"] for e in page.items] == ["a", "b", "c"]
            # ... and the next read, as of order 4, no longer shows it.
            page = await store.tail("s", 10)
            assert page.last_order == 4
            assert [msgspec.json.decode(e)["data"]["content"] for e in page.items] == ["a", "b"]
        finally:
            await store.close()
