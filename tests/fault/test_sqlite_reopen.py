"""Opening a SQLite store while another process briefly holds the database.

The first try of ``SQLiteDatastore.open`` fails with "database is locked"
(transient: ``open_store`` tries again); the try that succeeds has working
thread pools (the failed try shut them down, and the store died two seconds
after it said ready, when its checkpointer ran).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from services.log.store.factory import open_store
from services.log.store.sqlite import SQLiteStore
from shared.messages import AppendItem, AppendRequest


async def test_a_store_opened_on_a_retry_keeps_its_checkpointer(tmp_path: Path) -> None:
    db = tmp_path / "convlog.db"
    # A database file in rollback-journal mode (an older copy, a restored backup),
    # and another process holding it exclusively for a few seconds.
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Event()

    def release() -> None:
        holder.execute("COMMIT")
        holder.close()
        released.set()

    timer = threading.Timer(6.0, release)  # after the first try's 5 s busy wait
    timer.start()
    store = SQLiteStore(db)
    store.checkpoint_interval = 0.1
    try:
        await open_store(store, wait=30)
        assert released.is_set()
        await asyncio.sleep(1.0)  # a few checkpoint rounds
        ckpt = store.datastore.checkpointer
        assert ckpt is not None
        assert not ckpt.done(), f"the checkpointer died: {ckpt.exception()!r}"
        req = AppendRequest(items=[AppendItem(agent="user", data={"role": "user", "content": "hi"})])
        assert (await store.append("s", req)).last_order == 1
    finally:
        timer.cancel()
        await store.close()
