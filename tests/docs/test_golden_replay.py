"""Golden exports and tampered copies: ``convlog replay --verify`` must name the bad order.

``tests/data/golden.jsonl`` is a committed export of a short support session
(made once with the real store by ``tests/data/make_golden.py``); ``edited``,
``removed`` and ``swapped`` are the same export tampered at ``item_order`` 3.
The golden file is also checked by an independent verifier written here with
nothing but ``hashlib`` and ``rfc8785`` — what an auditor without convlog would do.
Real SQLite files are tampered the same way and checked with ``--db``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import rfc8785

DATA = Path(__file__).resolve().parents[1] / "data"
REPO = Path(__file__).resolve().parents[2]
SESSION_ID = "golden-support-1"


def convlog(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update(CONVLOG_DATA_DIR=str(tmp), CONVLOG_EMBEDDED="false")
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False,
    )


def independent_verify(lines: list[bytes], session_id: str) -> int | None:
    """First bad item_order of a JSONL export, or None: DESIGN.md's hash chain, from scratch."""
    prev = "0" * 64
    for expected, line in enumerate(lines, start=1):
        obj = json.loads(line)
        if obj.get("session_id") != session_id or obj.get("item_order") != expected:
            return expected
        claimed = obj.pop("hash")
        obj["prev_hash"] = prev
        try:
            canonical = rfc8785.dumps(obj)
        except ValueError:  # not representable in RFC 8785 (an integer beyond 2**53): no hash can match
            return expected
        if hashlib.sha256(canonical).hexdigest() != claimed:
            return expected
        prev = claimed
    return None


def export_lines(name: str) -> list[bytes]:
    return [line for line in (DATA / name).read_bytes().splitlines() if line.strip()]


# -- committed JSONL exports ----------------------------------------------------------


def test_golden_export_verifies_independently() -> None:
    lines = export_lines("golden.jsonl")
    assert len(lines) == 7
    assert independent_verify(lines, SESSION_ID) is None
    kinds = [json.loads(line)["data"].get("type", "message") for line in lines]
    assert "function_call" in kinds and "function_call_output" in kinds


@pytest.mark.parametrize("name", ["edited.jsonl", "removed.jsonl", "swapped.jsonl"])
def test_tampered_exports_fail_independent_verification_at_order_3(name: str) -> None:
    assert independent_verify(export_lines(name), SESSION_ID) == 3


def test_golden_export_verifies_with_convlog_and_replays_byte_for_byte(tmp_path: Path) -> None:
    golden = DATA / "golden.jsonl"
    done = convlog("replay", SESSION_ID, "--file", str(golden), "--verify", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stderr and "7 items" in done.stderr
    assert "L1Billing" in done.stdout and "handoff" in done.stdout
    done = convlog("replay", SESSION_ID, "--file", str(golden), "--format", "jsonl", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.encode() == golden.read_bytes()


@pytest.mark.parametrize("name", ["edited.jsonl", "removed.jsonl", "swapped.jsonl"])
def test_tampered_exports_fail_convlog_verify_naming_order_3(name: str, tmp_path: Path) -> None:
    done = convlog("replay", SESSION_ID, "--file", str(DATA / name), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "item_order 3" in done.stderr
    assert "item_order 1:" not in done.stderr and "item_order 2:" not in done.stderr


# -- tampered SQLite files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SQLite log holding the golden session (written by the real store)."""
    import asyncio

    import msgspec

    from services.log.store.sqlite import SQLiteStore
    from shared.messages import AppendItem, AppendRequest, Envelope

    path = tmp_path_factory.mktemp("golden-db") / "log.db"

    async def build() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            for line in export_lines("golden.jsonl"):
                env = msgspec.json.decode(line, type=Envelope)
                await store.append(SESSION_ID, AppendRequest(items=[
                    AppendItem(agent=env.agent, kind=env.kind, data=env.data, item_id=env.item_id)
                ]))
            await store.append("bystander", AppendRequest(items=[
                AppendItem(agent="user", data={"role": "user", "content": "unrelated"})
            ]))
        finally:
            await store.close()

    asyncio.run(build())
    return path


def _tamper(db: Path, how: str) -> None:
    conn = sqlite3.connect(db)
    try:
        rows = dict(conn.execute(
            "SELECT item_order, envelope FROM items WHERE session_id = ?", (SESSION_ID,)
        ).fetchall())
        if how == "edit":
            env = json.loads(rows[3])
            env["data"]["content"] = "€4250.00 on 3 March"
            conn.execute(
                "UPDATE items SET envelope = ? WHERE session_id = ? AND item_order = 3",
                (json.dumps(env, ensure_ascii=False).encode(), SESSION_ID),
            )
        elif how == "delete":
            conn.execute("DELETE FROM items WHERE session_id = ? AND item_order = 3", (SESSION_ID,))
        elif how == "swap":
            for order, other in ((3, 4), (4, 3)):
                conn.execute(
                    "UPDATE items SET envelope = ? WHERE session_id = ? AND item_order = ?",
                    (rows[other], SESSION_ID, order),
                )
        conn.commit()
    finally:
        conn.close()


def test_untampered_db_verifies(golden_db: Path, tmp_path: Path) -> None:
    done = convlog("replay", SESSION_ID, "--db", str(golden_db), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "7 items" in done.stderr


def test_a_db_whose_name_holds_uri_characters_verifies(golden_db: Path, tmp_path: Path) -> None:
    # '#', '?' and '%' are the file's name, not parts of the read-only SQLite URI: the
    # replay opened (and created) "log " instead and said it was not a convlog database.
    db = tmp_path / "log #1?%41.db"
    shutil.copy(golden_db, db)
    done = convlog("replay", SESSION_ID, "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "7 items" in done.stderr
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(db.name)] == []


def test_a_db_whose_name_is_not_utf8_verifies(golden_db: Path, tmp_path: Path) -> None:
    # A Linux file name is bytes: one that is not UTF-8 ("café" written in Latin-1) made
    # the read-only SQLite URI raise UnicodeEncodeError, a traceback instead of a replay.
    db = tmp_path / os.fsdecode(b"caf\xe9 log.db")
    shutil.copy(golden_db, db)
    done = convlog("replay", SESSION_ID, "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "7 items" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("how", ["edit", "delete", "swap"])
def test_tampered_db_fails_verify_naming_the_order(golden_db: Path, tmp_path: Path, how: str) -> None:
    db = tmp_path / "tampered.db"
    shutil.copy(golden_db, db)
    _tamper(db, how)
    done = convlog("replay", SESSION_ID, "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "item_order 3" in done.stderr
    # The other session in the same file is untouched and still verifies.
    done = convlog("replay", "bystander", "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("content", [b"not a database at all\n" * 100, None], ids=["not-sqlite", "other-schema"])
def test_replay_db_that_is_not_convlogs_is_a_clear_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "other.db"
    if content is None:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE unrelated (a)")
        conn.commit()
        conn.close()
    else:
        path.write_bytes(content)
    done = convlog("replay", "golden-support-1", "--db", str(path), "--verify", tmp=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "is not a convlog database" in done.stderr and "Traceback" not in done.stderr


# -- tampered indexed columns: every row must agree with its own envelope -----------------
# The envelopes are untouched here, so the hash chain alone would pass; the columns the
# service reads by (and the session's summary row) must agree with what the chain covers.

_SWAP_3_4 = [
    "UPDATE items SET item_order = -3 WHERE session_id = :sid AND item_order = 3",
    "UPDATE items SET item_order = 3 WHERE session_id = :sid AND item_order = 4",
    "UPDATE items SET item_order = 4 WHERE session_id = :sid AND item_order = -3",
]
COLUMN_TAMPERS = {
    # how: (statements, first bad order, fragment of the reason)
    "swap-item-order-columns": (_SWAP_3_4, 3, "(item_order column 3) holds the envelope of item_order 4"),
    "item-id-column": (
        ["UPDATE items SET item_id = 'forged' WHERE session_id = :sid AND item_order = 5"],
        5, "item_id column 'forged' but its envelope says 'golden-5'",
    ),
    "kind-column": (
        ["UPDATE items SET kind = 'clear' WHERE session_id = :sid AND item_order = 6"],
        6, "kind column 'clear' but its envelope says 'item'",
    ),
    "session-column": (
        ["UPDATE items SET session_id = 'elsewhere' WHERE session_id = :sid AND item_order = 4"],
        4, "expected item_order 4, found 5",
    ),
    "swap-positions": (  # rows and envelopes agree, but 4 claims to be committed before 3
        [   # the golden session was written first: its positions are its orders
            "UPDATE items SET position = -3 WHERE session_id = :sid AND item_order = 3 AND position = 3",
            "UPDATE items SET position = 3 WHERE session_id = :sid AND item_order = 4 AND position = 4",
            "UPDATE items SET position = 4 WHERE session_id = :sid AND item_order = 3 AND position = -3",
        ],
        4, "row 3 (item_order column 4) was committed before item_order 3",
    ),
    "hidden-column": (
        ["UPDATE items SET hidden = 1 WHERE session_id = :sid AND item_order = 2"],
        2, "marked hidden, but no retract targets it",
    ),
    "tail-row-deleted": (
        ["DELETE FROM items WHERE session_id = :sid AND item_order = 7"],
        7, "ends at item_order 7, but its last row is item_order 6",
    ),
    "summary-last-hash": (
        ["UPDATE sessions SET last_hash = printf('%064d', 0) WHERE session_id = :sid"],
        7, "last hash 0000000000000000... is not the hash of item_order 7",
    ),
}


def _run_sql(db: Path, statements: list[str], **params: str) -> None:
    conn = sqlite3.connect(db)
    try:
        for sql in statements:
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("how", list(COLUMN_TAMPERS))
def test_tampered_columns_fail_verify_naming_the_first_bad_row(
    golden_db: Path, tmp_path: Path, how: str
) -> None:
    statements, order, fragment = COLUMN_TAMPERS[how]
    db = tmp_path / "tampered.db"
    shutil.copy(golden_db, db)
    _run_sql(db, statements, sid=SESSION_ID)

    done = convlog("replay", SESSION_ID, "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"FAILED: {SESSION_ID}: item_order {order}: " in done.stderr, done.stderr
    assert fragment in done.stderr, done.stderr
    assert "hash chain intact" not in done.stderr and "Traceback" not in done.stderr
    # The other session in the same file is untouched and still verifies.
    done = convlog("replay", "bystander", "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    if how == "session-column":  # the moved row does not verify where it landed either
        done = convlog("replay", "elsewhere", "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
        assert done.returncode == 1
        assert f"filed under session 'elsewhere' but holds an envelope of session {SESSION_ID!r}" in done.stderr


@pytest.fixture(scope="module")
def retract_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SQLite log whose session retracts item 2 and then clears (written by the store)."""
    import asyncio

    from services.log.store.sqlite import SQLiteStore
    from shared.messages import AppendItem, AppendRequest

    path = tmp_path_factory.mktemp("retract-db") / "log.db"

    async def build() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            said = [AppendItem(agent="user", data={"role": "user", "content": f"m{i}"}) for i in (1, 2, 3)]
            await store.append("r", AppendRequest(items=said))
            await store.append("r", AppendRequest(items=[
                AppendItem(agent="system", kind="retract", data={"target": 2}),
                AppendItem(agent="system", kind="clear"),
                AppendItem(agent="user", data={"role": "user", "content": "after the clear"}),
            ]))
        finally:
            await store.close()

    asyncio.run(build())
    return path


@pytest.mark.parametrize(
    ("statement", "order", "fragment"),
    [
        (None, None, "6 items"),
        ("UPDATE items SET hidden = 0 WHERE session_id = 'r' AND item_order = 2",
         2, "item_order 2 is retracted, but its row is not marked hidden"),
        ("UPDATE sessions SET last_clear = 0 WHERE session_id = 'r'",
         5, "the last clear is item_order 0, but the log's is 5"),
    ],
    ids=["untampered", "hidden-flag-cleared", "summary-last-clear"],
)
def test_hidden_flags_and_last_clear_are_checked(
    retract_db: Path, tmp_path: Path, statement: str | None, order: int | None, fragment: str
) -> None:
    db = tmp_path / "copy.db"
    shutil.copy(retract_db, db)
    if statement is not None:
        _run_sql(db, [statement])
    done = convlog("replay", "r", "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
    assert fragment in done.stderr, done.stderr
    if order is None:
        assert done.returncode == 0 and "hash chain intact" in done.stderr
    else:
        assert done.returncode == 1 and f"item_order {order}: " in done.stderr
