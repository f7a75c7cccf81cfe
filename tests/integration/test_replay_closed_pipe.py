"""``convlog replay SID --verify | head -1``: a reader that closes the pipe early
stops the printing, not the verification. The command exited 0 with no verdict
(main treats BrokenPipeError as ``| head`` and returns 0), so a log whose
tampered item came after what the reader took passed as verified."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.integration.test_audit_edges import build_db

REPO = Path(__file__).resolve().parents[2]
ITEMS = 2000  # far more than one pipe buffer of transcript lines


def replay_head_1(db: Path, tmp: Path, *args: str) -> tuple[int, str, str]:
    """``convlog replay s --db DB ARGS | head -1``: (exit code, the line read, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update(CONVLOG_DATA_DIR=str(tmp / "data"), CONVLOG_EMBEDDED="false")
    p = subprocess.Popen([sys.executable, "-m", "services.cli.main", "replay", "s", "--db", str(db), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert p.stdout is not None and p.stderr is not None
    line = p.stdout.readline().decode()
    p.stdout.close()
    err = p.stderr.read().decode()
    return p.wait(timeout=60), line, err


def tamper_last(db: Path) -> None:
    conn = sqlite3.connect(db)
    (raw,) = conn.execute("SELECT envelope FROM items WHERE item_order = ?", (ITEMS,)).fetchone()
    obj = json.loads(raw)
    obj["data"]["content"] = "tampered"
    conn.execute("UPDATE items SET envelope = ? WHERE item_order = ?", (json.dumps(obj), ITEMS))
    conn.commit()
    conn.close()


def test_verify_with_a_closed_pipe_still_fails_on_a_later_bad_item(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    build_db(db, {"s": ITEMS})
    tamper_last(db)
    for fmt in ("text", "jsonl"):
        code, line, err = replay_head_1(db, tmp_path, "--verify", "--format", fmt)
        assert "s0" in line
        assert code == 1, (fmt, code, err)
        assert f"FAILED: s: item_order {ITEMS}: hash does not match" in err, err
        assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_verify_with_a_closed_pipe_verifies_the_whole_log(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    build_db(db, {"s": ITEMS})
    code, line, err = replay_head_1(db, tmp_path, "--verify")
    assert "s0" in line
    assert code == 0, err
    assert f"verified: s: {ITEMS} items, orders 1..{ITEMS} contiguous" in err, err
    # without --verify, `| head` is still an ordinary exit 0 (nothing was claimed)
    code, line, err = replay_head_1(db, tmp_path)
    assert "s0" in line and code == 0 and err == "", err
