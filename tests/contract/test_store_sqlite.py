"""The SQLite store passes the store conformance suite, plus SQLite specifics."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite

from services.log.store.base import LogStore
from services.log.store.sqlite import SQLiteStore

from .store_suite import StoreSuite, item, read_all, req


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
