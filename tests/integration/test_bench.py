"""``convlog bench`` end to end, at toy sizes: every phase runs against a real
log service and nats-server and reports what it measured (the figures
themselves are for the README, never asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.bench.appends import report, run_bench
from services.bench.measure import to_json
from services.cli.main import build_parser
from tests.support.logsvc import service_env
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT, child_pids, kill_left, outlived, run_cli


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
    # --json: the same phases as one document.
    doc = json.loads(to_json("appends", results, writers=4))
    assert doc["bench"] == "appends" and doc["writers"] == 4 and set(doc["results"]) == set(results)
    assert doc["results"]["append"]["ops"] == results["append"].ops
    assert doc["results"]["append"]["p99_ms"] == round(results["append"].pct(0.99), 2)
    # The open loop also says how late its sends started (the generator's own lag).
    half = results["half"]
    assert len(half.late) == half.ops + half.errors and min(half.late) >= 0
    assert doc["results"]["half"]["sent_late_max_ms"] == round(max(half.late) * 1000, 2)
    assert "sent_late_p99_ms" not in doc["results"]["append"]  # closed loop: nothing is scheduled
    # Half load starts once the closed loop's items are all on the items stream
    # and the notice reconciler has seen them: the wait is reported.
    assert half.settled_after is not None and half.settled_after >= 0
    assert doc["results"]["half"]["settled_after_s"] == round(half.settled_after, 2)
    assert "settled_after_s" not in doc["results"]["append"]
    assert re.search(r"append p50 at 2000 items / at 1000 items: \d+\.\d\dx", text), text


# --prefix was ignored: the bench wrote to convlog.* whatever the running service's prefix
# (no answer there: 'unavailable' after 20 s; another service there: it measured that one)
async def test_bench_against_a_running_service_uses_its_prefix(nats_server: NatsServer, tmp_path: Path) -> None:
    from services.log.service import LogService
    from shared.client import LogClient
    from shared.config import Settings, load_settings

    service = LogService(load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "acme.db"),
                                        "prefix": "acme"}, {}))
    await service.start()
    try:
        code, out, err = await run_cli(
            "bench", "--nats-url", nats_server.url, "--prefix", "acme", "--json", "--writers", "2",
            "--sessions", "2", "--duration", "0.3", "--replay-items", "500",
            env=service_env(tmp_path), timeout=120)
        assert code == 0, err[-2000:]
        assert json.loads(out)["results"]["append"]["ops"] > 0
        client = await LogClient.connect(nats_server.url, settings=Settings(nats_url=nats_server.url, prefix="acme"))
        try:
            assert any(s.session_id.startswith("bench-") for s in (await client.sessions()).sessions)
        finally:
            await client.close()
    finally:
        await service.shutdown()


# --replay-items N replayed a session of N rounded down to 500s (at least 500): --replay-items
# 1200 replayed 1,000 items, --replay-items 100 replayed 500
# The echo responder's start-up was not checked: when it died, readline() returned b"",
# the baseline ran against no responder (every request failed, 0 ops/s) and the report
# divided by that rate: a ZeroDivisionError traceback after every phase had run
async def test_bench_whose_echo_responder_dies_says_so_in_one_line(log_url: str, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()  # imported at every start-up of a Python on PYTHONPATH: the responder exits at once
    (hook / "sitecustomize.py").write_text("import os, sys\nif '--echo' in sys.argv:\n    os._exit(7)\n")
    env = service_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    code, out, err = await run_cli(
        "bench", "--nats-url", log_url, "--writers", "2", "--sessions", "2", "--duration", "0.3",
        "--replay-items", "100", env=env, timeout=60)
    assert code == 1 and not out, (code, out, err[-2000:])
    assert "Traceback" not in err and "echo baseline's responder did not start (exit code 7)" in err, err[-2000:]


# --metrics-cost divided by the metrics-off rate: with every append refused (items over the
# server's max payload) it crashed with a ZeroDivisionError traceback after all its rounds
async def test_metrics_cost_bench_with_no_append_acknowledged_says_so_in_one_line(tmp_path: Path) -> None:
    code, out, err = await run_cli(
        "bench", "--metrics-cost", "--item-size", "2000000", "--writers", "2", "--sessions", "2",
        "--duration", "0.5", "--rounds", "1", env=service_env(tmp_path), timeout=60)
    assert code == 1 and not out, (code, out, err[-2000:])
    assert "Traceback" not in err and "metrics-off log service acknowledged no append" in err, err[-2000:]


async def test_replay_phase_replays_as_many_items_as_asked(log_url: str) -> None:
    for n in (1200, 100):
        args = build_parser().parse_args(["bench", "--writers", "2", "--sessions", "2", "--duration", "0.3",
                                          "--replay-items", str(n)])
        results = await run_bench(args, log_url)
        assert results["replay"].ops == n


# --long-session N filled N // 1000 batches of 1000: a 1,500-item session held 1,000 items
# and a 500-item one none, each still labelled with N
async def test_long_session_phase_fills_the_session_to_the_length_it_names(log_url: str) -> None:
    from services.bench.appends import _session_length, payload
    from shared.client import LogClient
    from shared.config import Settings

    client = await LogClient.connect(log_url, settings=Settings(nats_url=log_url))
    try:
        for n in (1500, 500):
            args = build_parser().parse_args(["bench", "--duration", "0.4", "--long-session", str(n)])
            run_id = f"len-{n}"
            runs = await _session_length(client, log_url, args, payload(20), run_id)
            measured = runs[f"len{n}"]
            assert measured.ops > 0 and measured.name == f"appends to a {n}-item session (1 writer)"
            # filled to n items, then one item per measured append
            assert await client.last_order(f"bench-{run_id}-len{n}") == n + measured.ops
    finally:
        await client.close()


async def test_bench_store_jetstream_runs_every_case_next_to_raw_publishes(tmp_path: Path) -> None:
    # The real command at toy sizes: raw R1/R3, SQLite, JetStream R1/R3 on 1 and 2 shards.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "bench", "--store", "jetstream", "--json",
        "--writers", "4", "--sessions", "3", "--duration", "0.3", "--replay-items", "500",
        cwd=REPO_ROOT, env=service_env(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()[-2000:]
    figures = json.loads(out)
    cases = {"raw", "raw_r3", "sqlite", "jetstream_r1", "jetstream_r1_2shards", "jetstream_r3", "jetstream_r3_2shards"}
    assert figures["bench"] == "store" and set(figures["results"]) == cases
    assert figures["cases"]["jetstream_r3_2shards"] == {"label": "JetStream store R3, 2 shards",
                                                         "store": "jetstream", "nodes": 3, "shards": 2}
    for key in ("raw", "raw_r3"):
        raw = figures["results"][key]
        assert set(raw) == {"append", "half"} and raw["append"]["ops_per_s"] > 0 and raw["append"]["errors"] == 0
    for key in cases - {"raw", "raw_r3"}:
        phases = figures["results"][key]
        assert set(phases) == {"baseline", "append", "half", "replay"}
        assert phases["append"]["ops_per_s"] > 0 and phases["append"]["errors"] == 0, (key, phases)
        assert phases["replay"]["ops"] == 500
    assert set(figures["appends_vs_raw_r1"]) == cases and figures["appends_vs_raw_r1"]["raw"] == 1.0


async def _bench(tmp_path: Path, *args: str) -> tuple[int | None, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "bench", *args,
        cwd=REPO_ROOT, env=service_env(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out, err


async def test_bench_store_cases_picks_the_cases_and_refuses_unknown_ones(tmp_path: Path) -> None:
    code, out, err = await _bench(tmp_path, "--store", "jetstream", "--json", "--cases", "sqlite", "--writers", "2",
                                  "--sessions", "2", "--duration", "0.3", "--replay-items", "500")
    assert code == 0, err.decode()[-2000:]
    figures = json.loads(out)
    assert set(figures["results"]) == {"raw", "sqlite"}  # raw R1, the ratios' baseline, always runs
    assert figures["results"]["sqlite"]["append"]["ops_per_s"] > 0
    code, _, err = await _bench(tmp_path, "--store", "jetstream", "--cases", "jetstream_r1,nope")
    assert code == 2 and "nope" in err.decode() and "jetstream_r1_2shards" in err.decode()
    code, _, err = await _bench(tmp_path, "--cases", "sqlite")
    assert code == 2 and "--store" in err.decode()


# --store sqlite --cases jetstream_r1 measured the JetStream store on a private stack, though
# the help and the module say --store sqlite runs raw R1 and SQLite only
async def test_bench_store_sqlite_refuses_jetstream_cases(tmp_path: Path) -> None:
    code, out, err = await _bench(tmp_path, "--store", "sqlite", "--json", "--cases", "sqlite,jetstream_r1",
                                  "--writers", "2", "--sessions", "2", "--duration", "0.3", "--replay-items", "500")
    assert code == 2 and not out, (code, out.decode()[-2000:])
    assert "jetstream_r1" in err.decode() and "--store jetstream" in err.decode(), err.decode()


# Two benches named at once: one ran and the other was ignored (--signed --store jetstream
# measured signed appends on the SQLite store; --turns --signed ran only the signed bench)
async def test_bench_refuses_two_benches_at_once(tmp_path: Path) -> None:
    toy = ("--writers", "2", "--sessions", "2", "--duration", "0.3", "--replay-items", "500", "--levels", "1")
    for modes in (("--signed", "--store", "jetstream"), ("--turns", "--signed"), ("--metrics-cost", "--sdk"),
                  ("--signed", "--metrics-cost"), ("--turns", "--store", "sqlite")):
        code, out, err = await _bench(tmp_path, *modes, *toy)
        assert code == 2 and "pick one" in err.decode() and not out, (modes, code, err.decode()[-2000:])


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


async def test_signed_bench_prints_json_with_json(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "bench", "--signed", "--json",
        "--writers", "2", "--sessions", "2", "--duration", "0.3",
        cwd=REPO_ROOT, env=service_env(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    doc = json.loads(out)
    assert doc["bench"] == "signed" and {r["kind"] for r in doc["results"]} == {"signed", "unsigned"}
    assert all(r["ops"] > 0 and r["errors"] == 0 for r in doc["results"])
    assert doc["signed_vs_unsigned"] > 0
    assert doc["appends_per_signature"] >= 1 and doc["ed25519_us"]["verify"] > 0
    assert all("log service" in r["cpu_us_per_ack"] for r in doc["results"])


def _long_bench(tmp_path: Path) -> subprocess.Popen[bytes]:
    """`convlog bench` on its private stack (60 s phases; its temporary files in
    ``tmp_path``), stderr piped: the caller stops it and what it started."""
    env = {**service_env(tmp_path / "data"), "TMPDIR": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "bench", "--writers", "2", "--sessions", "2",
         "--duration", "60"], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


# SIGTERM to `convlog bench` stops the private stack it started and removes its
# temporary directory (nats-server, the log service and the echo responder outlived it)
def test_sigterm_to_convlog_bench_stops_its_private_stack(tmp_path: Path) -> None:
    proc = _long_bench(tmp_path)
    kids: list[int] = []
    try:
        assert proc.stderr is not None
        while b"baseline:" not in (line := proc.stderr.readline()):
            assert line, "the bench ended before its baseline phase"
        kids = child_pids(proc.pid)
        assert len(kids) >= 3  # nats-server, the log service, the echo responder
        assert list(tmp_path.glob("convlog-bench-*"))
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(60)
        assert not outlived(kids, 10), "processes outlived convlog bench"
        assert not list(tmp_path.glob("convlog-bench-*"))
        assert code == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_left(kids)  # what the bench left


# Ctrl-C twice while `convlog bench` starts its embedded nats-server: the second one
# (KeyboardInterrupt) interrupted EmbeddedNats.start, which left that nats-server running.
def test_ctrl_c_twice_while_the_bench_starts_nats_leaves_no_nats_server(tmp_path: Path) -> None:
    proc = _long_bench(tmp_path)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not kids:  # the nats-server is forked: it is starting
            assert time.monotonic() < deadline and proc.poll() is None, "no nats-server started"
            kids = child_pids(proc.pid)
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.005)
        os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(60)
        assert not outlived(kids, 10), "the nats-server outlived convlog bench"
        assert code == 130
        assert not list(tmp_path.glob("convlog-bench-*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_left(kids)  # what the bench left
