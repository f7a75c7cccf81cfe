"""The store bench's disk probe: this disk's fsync latency, reported next to
the load average because JetStream with ``sync_interval: always`` fsyncs every
message it stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.bench.measure import fsync_latency


def test_fsync_latency_times_real_fsyncs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    got = fsync_latency(tmp_path, writes=20)
    assert set(got) == {"p50_us", "p90_us"}
    assert 0 < got["p50_us"] <= got["p90_us"]
    assert list(tmp_path.iterdir()) == []  # the scratch file is removed


def test_fsync_latency_refuses_no_writes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        fsync_latency(tmp_path, writes=0)
    assert list(tmp_path.iterdir()) == []


def test_fsync_latency_in_a_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fsync_latency(tmp_path / "nope", writes=1)


def test_fsync_latency_percentiles_are_nearest_rank_so_p50_never_exceeds_p90(tmp_path: Path) -> None:
    # p50 took the upper median and p90 a lower index: of two fsyncs, p50 was the
    # slower one and p90 the faster, p50 > p90 (the rule of every other figure is
    # measure.nearest_rank: p50 of 2 is the first, p90 the second).
    for _ in range(5):
        got = fsync_latency(tmp_path, writes=2)
        assert got["p50_us"] <= got["p90_us"], got
