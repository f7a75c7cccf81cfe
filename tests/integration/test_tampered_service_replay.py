"""`convlog replay SID --verify` against the running log service, over a SQLite log
edited by hand (the threat model's "write access to the SQLite file") so that a
stored envelope is no envelope: the service splices stored bytes into its read
reply, so the whole page failed to decode in the client and the replay exited 2
with ``bad_request: malformed JSON ... (byte 28)``, naming no item, where
``replay --db`` exits 1 naming the row."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.log.service import LogService
from services.log.store.sqlite import SQLiteStore
from shared.client import LogClient
from shared.config import load_settings
from shared.errors import BadRequestError
from shared.messages import AppendItem, AppendRequest
from tests.support.natsd import NatsServer
from tests.support.procs import run_cli


async def _tampered(db: Path, envelope: bytes, *, at: int = 3, delete: int | None = None) -> None:
    store = SQLiteStore(db)
    await store.open()
    for n in range(1, 6):
        await store.append("s", AppendRequest(items=[AppendItem(
            agent="Triage", data={"type": "message", "role": "assistant", "content": f"line {n}"})]))
    await store.close()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE items SET envelope = ? WHERE session_id = 's' AND item_order = ?", (envelope, at))
        if delete is not None:
            conn.execute("DELETE FROM items WHERE session_id = 's' AND item_order = ?", (delete,))


@contextlib.asynccontextmanager
async def _service(nats_server: NatsServer, db: Path) -> AsyncIterator[None]:
    svc = LogService(load_settings({"nats_url": nats_server.url, "db": str(db)}, environ={}))
    await svc.start()
    try:
        yield
    finally:
        await svc.shutdown()


async def _cli(nats_server: NatsServer, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    return await run_cli(*args, "--nats-url", nats_server.url, env=env, timeout=60)


@pytest.mark.parametrize("envelope", [b"this is not JSON", b'{"spoiled": true}', b"[1, 2]"])
async def test_replay_verify_from_the_service_names_a_stored_envelope_that_is_no_envelope(
        nats_server: NatsServer, tmp_path: Path, envelope: bytes) -> None:
    db = tmp_path / "log.db"
    await _tampered(db, envelope)
    async with _service(nats_server, db):
        code, _, err = await _cli(nats_server, "replay", "s", "--verify")
        assert code == 1, err
        assert err.startswith("FAILED: s: item_order 3: stored envelope does not decode"), err

        # The export does not stop silently at the bad item: the items after it follow,
        # the bad one is named and the exit code is 1, as with --db.
        code, out, err = await _cli(nats_server, "replay", "s", "--format", "jsonl")
        assert code == 1, err
        assert [json.loads(x)["item_order"] for x in out.splitlines()] == [1, 2, 4, 5]
        assert "the log service: item_order 3 is not a convlog envelope" in err, err

    # The same file, read with no service running, says the same.
    code, _, err = await _cli(nats_server, "replay", "s", "--verify", "--db", str(db))
    assert code == 1 and err.startswith("FAILED: s: item_order 3: stored envelope does not decode"), err


async def test_replay_from_the_service_reads_past_a_bad_envelope_whose_order_has_a_gap_before_it(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Row 2 deleted, row 3 spoiled: the reads after 1 and after 2 both serve row 3."""
    db = tmp_path / "log.db"
    await _tampered(db, b"{oops", delete=2)
    async with _service(nats_server, db):
        code, _, err = await _cli(nats_server, "replay", "s", "--verify")
        assert code == 1 and err.startswith("FAILED: s: item_order 2: stored envelope does not decode"), err
        code, out, err = await _cli(nats_server, "replay", "s", "--format", "jsonl")
        assert code == 1, err
        assert [json.loads(x)["item_order"] for x in out.splitlines()] == [1, 4, 5]
        assert "item_order 3 is not a convlog envelope" in err, err


async def test_a_page_ending_in_a_stored_envelope_that_is_no_envelope_is_served_as_stored(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """The read-ahead decoded the page's last envelope for the next page's ``after``: a
    page ending in one edited by hand failed with "unavailable: internal error" (a
    traceback in the service's log; a reader waits such an error out), not the page as
    stored, which the reader names."""
    db = tmp_path / "log.db"
    await _tampered(db, b"{oops")
    async with _service(nats_server, db):
        client = await LogClient.connect(nats_server.url)
        try:
            with pytest.raises(BadRequestError, match="malformed JSON"):  # the client's decode of the page
                await client.read("s", after=2, limit=1, raw=True)
            assert [e.item_order for e in (await client.read("s", after=3, limit=1, raw=True)).items] == [4]
        finally:
            await client.close()



@pytest.mark.parametrize("spoiled", [False, True], ids=["copy-ends-a-page", "copy-then-no-envelope"])
async def test_an_envelope_copied_to_a_later_row_is_read_once_not_for_ever(
        nats_server: NatsServer, tmp_path: Path, spoiled: bool) -> None:
    """Row 6, the last of the service's second page (items of ~300 KB, three a page), holds
    a copy of item 3's envelope: the reader paged on from the order the envelope states,
    read rows 4 to 6 again and again, and `replay --verify` never ended.  The same when the
    copy is in row 5 and row 6 is no envelope: that page, read one item at a time, went
    back from row 5 to row 4 for ever."""
    db = tmp_path / "log.db"
    store = SQLiteStore(db)
    await store.open()
    for n in range(1, 9):
        await store.append("s", AppendRequest(items=[AppendItem(
            agent="Triage", data={"type": "message", "role": "assistant", "content": f"{n} " + "x" * 300_000})]))
    await store.close()
    copy_at = 5 if spoiled else 6
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        (third,) = conn.execute("SELECT envelope FROM items WHERE item_order = 3").fetchone()
        conn.execute("UPDATE items SET envelope = ? WHERE session_id = 's' AND item_order = ?", (third, copy_at))
        if spoiled:
            conn.execute("UPDATE items SET envelope = ? WHERE session_id = 's' AND item_order = 6", (b"{oops",))
    async with _service(nats_server, db):
        if not spoiled:
            client = await LogClient.connect(nats_server.url)
            try:  # the layout the test relies on: rows 4 to 6 are one page
                assert [e.item_order for e in (await client.read("s", after=3, raw=True)).items] == [4, 5, 3]
            finally:
                await client.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
        code, _, err = await run_cli("replay", "s", "--verify", "--quiet", "--nats-url", nats_server.url,
                                     env=env, timeout=20)
        assert code == 1, err
        assert err.startswith(f"FAILED: s: item_order {copy_at}: expected item_order {copy_at}, found 3"), err
        code, out, err = await run_cli("replay", "s", "--format", "jsonl", "--nats-url", nats_server.url,
                                       env=env, timeout=20)
        assert code == (1 if spoiled else 0), err
        orders = [json.loads(x)["item_order"] for x in out.splitlines()]
        assert orders == ([1, 2, 3, 4, 3, 7, 8] if spoiled else [1, 2, 3, 4, 5, 3, 7, 8])
