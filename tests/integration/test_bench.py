"""``convlog bench`` end to end, at toy sizes: every phase runs against a real
log service and nats-server and reports what it measured (the figures
themselves are for the README, never asserted)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

from services.bench.appends import report, run_bench
from services.cli.main import build_parser
from tests.support.logsvc import service_env
from tests.support.procs import REPO_ROOT


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


async def test_bench_store_jetstream_runs_both_stores_next_to_raw_publishes(tmp_path: Path) -> None:
    # The real command at toy sizes: three private stacks (raw, JetStream, SQLite).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "bench", "--store", "jetstream", "--json",
        "--writers", "4", "--sessions", "3", "--duration", "0.5", "--replay-items", "500",
        cwd=REPO_ROOT, env=service_env(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    figures = json.loads(out)
    assert set(figures["stores"]) == {"jetstream", "sqlite"}
    assert figures["raw"]["raw"]["ops_per_s"] > 0 and figures["raw"]["raw"]["errors"] == 0
    for store in ("jetstream", "sqlite"):
        phases = figures["stores"][store]
        assert set(phases) == {"baseline", "append", "half", "replay"}
        assert phases["append"]["ops_per_s"] > 0 and phases["append"]["errors"] == 0, (store, phases)
        assert phases["replay"]["ops_per_s"] > 0
    assert set(figures["appends_vs_raw_publish"]) == {"jetstream", "sqlite"}


async def test_metrics_cost_bench_alternates_off_and_on_and_reports_the_ratio() -> None:
    from services.bench.metrics_cost import run_metrics_cost

    args = build_parser().parse_args([
        "bench", "--metrics-cost", "--writers", "4", "--sessions", "3", "--duration", "1",
        "--rounds", "1",
    ])
    text = await run_metrics_cost(args)
    assert re.search(r"metrics off, round 1\s+\d+\s+\d+\.\d\d\s+\d+\.\d\d\s+0$", text, re.M), text
    assert re.search(r"metrics on, round 1\s+\d+\s+\d+\.\d\d\s+\d+\.\d\d\s+0$", text, re.M), text
    m = re.search(r"on / off = (\d+\.\d+) .*; (\d+) scrapes\)", text)
    assert m and float(m.group(1)) > 0 and int(m.group(2)) >= 1, text
