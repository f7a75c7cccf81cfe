"""The log service's store gauges read the SQLite file whatever its name holds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.metrics.log import _store_gauges


@pytest.mark.parametrize("name", ["log #1.db", "what?.db", "100%.db", "plain.db"])
def test_sessions_gauge_counts_a_file_whose_name_holds_uri_characters(tmp_path: Path, name: str) -> None:
    db = tmp_path / name
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE sessions (session_id TEXT PRIMARY KEY)")
    conn.executemany("INSERT INTO sessions VALUES (?)", [("a",), ("b",)])
    conn.commit()
    conn.close()
    gauges = {g.name: g.samples[0].value for g in _store_gauges(db)}
    assert gauges["convlog_log_sessions"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no stray file made
