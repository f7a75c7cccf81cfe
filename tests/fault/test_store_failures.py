"""A store failure is transient (requesters retry) or fatal (the process exits).

The group committer answers a failed batch ``unavailable`` either way.  A
busy database is waited out; anything else (a broken connection, a disk
error, a bug) stops the committer, so the log service shuts down and its
``run()`` raises instead of answering ``unavailable`` forever.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import nats
import pytest

from services.log.service import LogService
from services.log.store.base import StoreClosedError
from services.log.store.committer import GroupCommitter, Pending
from services.log.store.sqlite import SQLiteStore
from shared.client import LogClient
from shared.config import load_settings
from shared.errors import UnavailableError
from shared.failures import FatalError
from shared.messages import AppendItem, AppendRequest
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer


def _request(text: str) -> AppendRequest:
    return AppendRequest(items=[AppendItem(agent="user", data={"role": "user", "content": text})])


async def test_a_broken_sqlite_writer_stops_the_committer_and_refuses_what_follows(tmp_db: Path) -> None:
    store = SQLiteStore(tmp_db)
    await store.open()
    try:
        assert (await store.append("s", _request("kept"))).last_order == 1
        assert store.datastore.writer is not None
        store.datastore.writer.close()  # every statement now raises ProgrammingError

        with pytest.raises(UnavailableError):
            await store.append("s", _request("lost"))
        committer = store.background_tasks[0]
        await asyncio.wait({committer})
        assert isinstance(committer.exception(), sqlite3.ProgrammingError)
        with pytest.raises(StoreClosedError):
            store.submit("s", _request("after"), lambda _out: None)
    finally:
        await store.close()  # does not raise the error the watcher reports


async def test_a_busy_database_is_transient_and_the_committer_keeps_serving() -> None:
    calls = 0

    async def commit_batch(batch: list[Pending]) -> tuple[list[object], list[object]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database is locked")
        return [f"ok {p.session_id}" for p in batch], []

    committer = GroupCommitter(commit_batch)  # type: ignore[arg-type]
    committer.start()
    try:
        with pytest.raises(UnavailableError):
            await committer.append("a", _request("first"))
        assert await committer.append("b", _request("second")) == "ok b"
        assert committer.running and committer.task is not None and not committer.task.done()
    finally:
        await committer.stop()


async def test_the_log_service_exits_with_the_store_failure(nats_server: NatsServer, tmp_path: Path) -> None:
    settings = load_settings(
        {"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "data_dir": str(tmp_path)}, environ={}
    )
    service = LogService(settings)
    runner = asyncio.create_task(service.run())
    try:
        nc = await nats.connect(nats_server.url)
        async with LogClient(nc, timeout=2, deadline=3) as client:
            await assert_eventually(lambda: client.sessions(), timeout=10)
            await client.append("s", [AppendItem(agent="user", data={"role": "user", "content": "kept"})])
            store = service.store
            assert isinstance(store, SQLiteStore) and store.datastore.writer is not None
            store.datastore.writer.close()
            with pytest.raises(UnavailableError):
                await client.append("s", [AppendItem(agent="user", data={"role": "user", "content": "lost"})])
        await nc.close()
        with pytest.raises(FatalError, match="convlog-committer stopped: ProgrammingError"):
            await asyncio.wait_for(runner, 30)
    finally:
        if not runner.done():
            await service.shutdown()
            await asyncio.wait({runner})
