"""The demo's transcript (``SessionFollower``) when its follower stops for good.

The log is made to serve an item that does not decode (a SQLite file edited
by someone with write access to it): a row written into the file behind the
running log service, for a session it holds no state of, so the service serves
it as soon as the follower reads the log (its next check of the log, or the gap
the user's message opens).  The follower's read of it fails with
``BadRequestError``, which ``LogClient.follow`` does not retry.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from shared.chain import GENESIS_HASH
from shared.client import LogClient
from shared.errors import BadRequestError


def _spoil(db: Path, sid: str) -> None:
    """Item #1 of ``sid``, whose envelope is not JSON, written into the log's file."""
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO items (position, session_id, item_order, item_id, kind, envelope) "
                    "VALUES (1000000, ?, 1, 'spoiled', 'item', CAST('{' AS BLOB))", (sid,))
        con.execute("INSERT INTO sessions (session_id, last_order, last_hash, updated_at) "
                    "VALUES (?, 1, ?, '2025-01-01T00:00:00Z')", (sid, GENESIS_HASH))


async def _stopped(follower: object, within: float) -> None:
    task = follower._task  # type: ignore[attr-defined]
    deadline = time.monotonic() + within
    while not task.done():
        assert time.monotonic() < deadline, "the follower did not read the spoiled item"
        await asyncio.sleep(0.05)


async def test_turn_raises_what_stopped_the_follower_at_once(log_client: LogClient, tmp_path: Path) -> None:
    """turn() waited out its whole timeout, then reported "the turn did not end in
    time", while the follower had long died of the item; it now raises at once."""
    from services.cli.transcript import SessionFollower

    async with SessionFollower(log_client, "s") as follower:
        _spoil(tmp_path / "convlog.db", "s")
        started = time.monotonic()
        with pytest.raises(BadRequestError, match="malformed JSON"):
            await follower.turn("hello", timeout=30)
        assert time.monotonic() - started < 10
        with pytest.raises(BadRequestError, match="malformed JSON"):  # and every later turn
            await follower.turn("again", timeout=30)


async def test_follower_that_stopped_raises_on_exit(log_client: LogClient, tmp_path: Path) -> None:
    """Leaving the follower after it died between turns threw its error away."""
    from services.cli.transcript import SessionFollower

    with pytest.raises(BadRequestError, match="malformed JSON"):
        async with SessionFollower(log_client, "s") as follower:
            _spoil(tmp_path / "convlog.db", "s")
            await _stopped(follower, 10)


async def test_turn_after_the_follower_stopped_sends_nothing(log_client: LogClient, tmp_path: Path) -> None:
    """A turn started after the follower died sent its message (the log keeps it,
    unanswered by anything that follows the session) before noticing."""
    from services.cli.transcript import SessionFollower

    async with SessionFollower(log_client, "s") as follower:
        _spoil(tmp_path / "convlog.db", "s")
        await _stopped(follower, 10)
        with pytest.raises(BadRequestError, match="malformed JSON"):
            await follower.turn("hello", timeout=30)
    assert await log_client.last_order("s") == 1  # the spoiled item alone

