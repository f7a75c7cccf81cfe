"""The benches' percentiles: the nearest rank, also on small samples."""

from __future__ import annotations

import json

from services.bench.measure import Run, figures, to_json
from services.bench.sdk import Measure
from services.bench.turns import _pcts


def _ms(values: list[int]) -> list[float]:
    return [v / 1000 for v in values]


# The p99 of 100 latencies was the largest of them (and the p99.9 of 1,000 too): one
# slow outlier in 100 turns read as the bench's p99; the p50 of an even sample was the
# upper of the two middle values (the p50 of two latencies was the slower one)
def test_the_p99_of_100_latencies_is_the_99th_not_the_largest() -> None:
    run = Run("x", 100, 1.0, _ms(list(range(1, 101))))
    assert run.pct(0.99) == 99.0
    assert run.pct(0.5) == 50.0
    assert run.pct(1.0) == 100.0 and run.pct(0.0) == 1.0
    doc = figures(run)
    assert (doc["p50_ms"], doc["p99_ms"], doc["p999_ms"]) == (50.0, 99.0, 100.0)
    thousand = Run("y", 1000, 1.0, _ms(list(range(1, 1001))))
    assert (thousand.pct(0.99), thousand.pct(0.999)) == (990.0, 999.0)
    assert json.loads(to_json("t", {"a": thousand}))["results"]["a"]["p99_ms"] == 990.0


def test_small_samples_take_the_nearest_rank() -> None:
    assert Run("x", 2, 1.0, _ms([3, 1])).pct(0.5) == 1.0
    assert Run("x", 4, 1.0, _ms([4, 3, 2, 1])).pct(0.5) == 2.0
    assert Run("x", 3, 1.0, _ms([3, 1, 2])).pct(0.5) == 2.0
    assert Run("x", 1, 1.0, _ms([7])).pct(0.99) == 7.0
    late = _ms(list(range(1, 101)))
    assert Run("x", 0, 1.0, [], late=late).pct(0.99, late) == 99.0


def test_the_turn_breakdown_and_the_sdk_bench_use_the_same_percentiles() -> None:
    xs = _ms(list(range(1, 101)))
    assert _pcts(xs) == (50.0, 99.0)
    m = Measure(calls=100, seconds=1.0, latencies=xs)
    assert (m.pct_ms(0.5), m.pct_ms(0.99)) == (50.0, 99.0)
