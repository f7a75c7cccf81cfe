"""``convlog bench --sdk --json``: the document is JSON whatever was measured."""

from __future__ import annotations

import json

from services.bench.sdk import Measure
from services.bench.sdk_breakdown import ClientSplit
from services.bench.sdk_procs import Mixing
from services.bench.sdk_report import LABELS, as_json


def _no_constant(name: str) -> object:
    raise AssertionError(f"not JSON: {name}")


# A scenario whose calls all failed has no latencies: its p50/p99 were NaN and
# json.dumps wrote the literal NaN (also the breakdown's ms per call of a phase with
# no call), which jq, JSON.parse and every strict parser refuse, the whole document
def test_a_scenario_whose_calls_all_failed_gives_null_not_nan() -> None:
    ok = Measure(calls=10, seconds=1.0, latencies=[0.001] * 10)
    failed = Measure(calls=0, seconds=1.0, latencies=[], errors=10)
    mix = Mixing(expected=8, found=8, lost=0, doubled=0, out_of_order=0, torn=0, failed_calls=0,
                 calls=4, seconds=1.0)
    results = {
        "ops": 10, "sdk_version": "x",
        "sqlite": {**dict.fromkeys(LABELS, ok), "processes": mix},
        "convlog": {**dict.fromkeys(LABELS, ok), "add_1": failed, "processes": mix},
        "breakdown": {"add_1": (ClientSplit(), None)},
    }
    doc = json.loads(json.dumps(as_json(results)), parse_constant=_no_constant)
    add_1 = doc["scenarios"]["add_1"]
    assert add_1["convlog"]["p50_ms"] is None and add_1["convlog"]["p99_ms"] is None
    assert add_1["convlog"]["errors"] == 10 and add_1["sqlite"]["p50_ms"] == 1.0
    assert doc["breakdown"]["add_1"]["ms_per_call"]["call, start to return"] is None
