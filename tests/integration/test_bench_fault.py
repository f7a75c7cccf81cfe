"""``convlog bench --store jetstream --fault leader-kill`` end to end, at toy
sizes: it kills a real stream leader on its private cluster, reports the
window, and finds every acknowledged item back (the figures themselves are for
the README, never asserted)."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path

from tests.support.logsvc import service_env
from tests.support.procs import REPO_ROOT


async def _bench(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "bench", *args,
        cwd=REPO_ROOT, env=service_env(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 150)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_leader_kill_bench_reports_the_window_and_loses_nothing(tmp_path: Path) -> None:
    code, out, err = await _bench(tmp_path, "--store", "jetstream", "--fault", "leader-kill", "--json",
                                  "--writers", "4", "--sessions", "3", "--duration", "1", "--rounds", "1")
    assert code == 0, err[-3000:]
    figures = json.loads(out)
    (rnd,) = figures["rounds"]
    assert rnd["killed"] != rnd["new_leader"] and {rnd["killed"], rnd["new_leader"]} <= {"n1", "n2", "n3"}
    for key in ("resumed_after_s", "longest_gap_s", "longest_writer_wait_s"):
        assert 0 < rnd[key] < math.inf, (key, rnd)
    assert figures["acked_items"] > 0
    assert (figures["lost"], figures["duplicated"], figures["moved"]) == (0, 0, 0), figures
    assert figures["sessions_not_verified"] == 0 and figures["unacknowledged_in_log"] == 0


async def test_a_fault_needs_the_jetstream_store(tmp_path: Path) -> None:
    code, out, err = await _bench(tmp_path, "--fault", "leader-kill")
    assert code == 2 and "--store jetstream" in err, (code, out, err)
