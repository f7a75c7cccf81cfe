"""``convlog bench`` end to end, at toy sizes: every phase runs against a real
log service and nats-server and reports what it measured (the figures
themselves are for the README, never asserted)."""

from __future__ import annotations

import re

from services.bench.appends import report, run_bench
from services.cli.main import build_parser


async def test_bench_runs_every_phase_and_reports_it(log_url: str) -> None:
    args = build_parser().parse_args([
        "bench", "--writers", "4", "--sessions", "3", "--duration", "1",
        "--replay-items", "1000", "--long-session", "2000",
    ])
    results = await run_bench(args, log_url)
    assert set(results) == {"baseline", "append", "half", "replay", "len1000", "len2000"}
    for key, run in results.items():
        assert run.ops > 0 and run.errors == 0, (key, run.ops, run.errors)
    assert results["replay"].ops == 1000  # every item of the replayed session, once
    assert all(len(run.latencies) == run.ops for key, run in results.items() if key != "replay")
    text = report(results, args)
    assert re.search(r"durable appends \(closed loop\)\s+\d+\s+\d+\.\d\d", text), text
    assert re.search(r"append p50 at 2000 items / at 1000 items: \d+\.\d\dx", text), text
