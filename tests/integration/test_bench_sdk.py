"""``convlog bench --sdk`` end to end at a toy size: both stores measured in one
run, the multi-process session checked, and where a ConvlogSession call's time
goes (the figures themselves are for the README, never asserted)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from services.bench.sdk_procs import check_mixing
from tests.support.logsvc import service_env
from tests.support.natsd import NatsServer
from tests.support.procs import run_cli

pytest.importorskip("agents")


async def test_sdk_bench_json_has_every_scenario_the_check_and_the_breakdown(log_url: str) -> None:
    from services.bench.sdk import run_sdk_bench

    out = io.StringIO()
    await run_sdk_bench(log_url, 8, out, as_json_out=True)
    report = json.loads(out.getvalue())
    assert report["bench"] == "sdk" and report["ops"] == 8
    for key in ("add_1", "add_16", "get_1", "get_16", "processes"):
        for store in ("sqlite", "convlog"):
            fig = report["scenarios"][key][store]
            assert fig["calls"] > 0 and fig["calls_per_s"] > 0, (key, store, fig)
        assert report["ratios"][key] == report["scenarios"][key]["ratio"] > 0
    for store in ("sqlite", "convlog"):
        procs = report["scenarios"]["processes"][store]
        assert procs["found"] == procs["expected"] == 8 * 2  # 4 processes x 2 calls x a pair
        assert procs["lost"] == procs["doubled"] == procs["out_of_order"] == procs["torn"] == 0
        assert procs["failed_calls"] == 0

    one = report["breakdown"]["add_1"]
    assert one["client"]["calls"] == 8 and one["client"]["requests"] == 8  # one append per call
    assert one["service"]["appends"] >= 8 and one["service"]["commits"] >= 1
    ms = one["ms_per_call"]
    parts = (ms["prepare, encode, publish"] + ms["round trip (publish to reply)"]
             + ms["reply decode, local copy update"])
    assert parts == pytest.approx(ms["call, start to return"], rel=0.05)
    assert 0 < ms["in the log service (arrival to reply queued)"] < ms["round trip (publish to reply)"]
    assert 0 < ms["of which the COMMIT (fsync)"] <= ms["its commit batch (decide, write, COMMIT)"]
    procs = report["breakdown"]["processes"]
    assert procs["client"]["calls"] == 8 and procs["service"]["appends"] >= 8


# The 16-writer scenarios gave each writer ops // 16 calls: 992 of the 1,000 calls per
# scenario the README states (and 16, not 8, for --sdk-ops 8)
async def test_sixteen_writer_scenarios_make_exactly_the_calls_asked(log_url: str, tmp_path: Path) -> None:
    from services.bench.sdk import _in_process
    from services.bench.sdk_stores import ConvlogSessions, SQLiteSessions

    for ops in (40, 8):
        stores = {"sqlite": SQLiteSessions(tmp_path / f"s{ops}.db"), "convlog": ConvlogSessions(log_url)}
        try:
            measured, _ = await _in_process(stores, ops, f"calls-{ops}")
        finally:
            for store in stores.values():
                await store.close()
        for store, scenarios in measured.items():
            for key in ("add_1", "add_16", "get_1", "get_16"):
                got = scenarios[key]
                assert (got.calls, got.errors) == (ops, 0), (ops, store, key, got.calls, got.errors)


# The four processes were given ops // 4 calls each: --sdk-ops 10 made 8 calls on the
# shared session (up to 3 of the calls per scenario stated were never made, unreported).
async def test_the_process_scenario_makes_exactly_the_calls_asked(log_url: str) -> None:
    from services.bench.sdk import run_sdk_bench

    out = io.StringIO()
    await run_sdk_bench(log_url, 10, out, as_json_out=True)
    report = json.loads(out.getvalue())
    for store in ("sqlite", "convlog"):
        procs = report["scenarios"]["processes"][store]
        assert (procs["calls"], procs["failed_calls"]) == (10, 0), (store, procs)
        assert procs["found"] == procs["expected"] == 10 * 2, (store, procs)
        assert procs["lost"] == procs["doubled"] == procs["out_of_order"] == procs["torn"] == 0, (store, procs)
    assert report["breakdown"]["processes"]["client"]["calls"] == 10


def test_the_breakdown_splits_a_call_into_measured_parts() -> None:
    from services.bench.sdk_breakdown import ClientSplit, ServiceSplit
    from services.bench.sdk_report import breakdown_json

    client = ClientSplit(calls=2, requests=2, total=0.004, before=0.0005, round_trip=0.003, after=0.0005)
    service = ServiceSplit(appends=2, append_s=0.002, commits=1, commit_items=2, commit_s=0.0008,
                           fsync_s=0.0006)
    got = breakdown_json(client, service)
    assert got["ms_per_call"]["call, start to return"] == 2.0
    assert got["ms_per_call"]["in the log service (arrival to reply queued)"] == 1.0
    assert got["ms_per_call"]["NATS and scheduling (the rest)"] == 0.5
    assert got["ms_per_call"]["its commit batch (decide, write, COMMIT)"] == 0.8
    assert got["appends_per_commit"] == 2.0


def _pair(tag: str, n: int) -> list[dict[str, object]]:
    return [{"role": "user", "content": f"[{tag} {n}] hi"},
            {"role": "assistant", "content": [{"type": "output_text", "text": f"[{tag} {n}] ok"}]}]


def test_the_mixing_check_finds_lost_doubled_reordered_and_torn_items() -> None:
    good = _pair("p1", 0) + _pair("p2", 0) + _pair("p1", 1) + _pair("p2", 1)
    m = check_mixing(good, {"p1": 2, "p2": 2}, 0, 4, 1.0)
    assert (m.found, m.lost, m.doubled, m.out_of_order, m.torn) == (8, 0, 0, 0, 0)

    bad = _pair("p1", 1) + _pair("p1", 0) + _pair("p2", 0) + _pair("p2", 0)[:1] + _pair("p1", 1)[1:]
    m = check_mixing(bad, {"p1": 2, "p2": 2}, 0, 4, 1.0)
    assert m.lost == 2  # p2's 1: both items
    assert m.doubled == 2  # p2 0 user, p1 1 assistant
    assert m.out_of_order == 1  # p1 0 after p1 1
    assert m.torn == 1  # the second p2 0 user is followed by p1 1's assistant


# --prefix was ignored: `convlog bench --sdk --nats-url URL` waited for a log service on
# convlog.* whatever the prefix given, so against one serving another prefix it gave up
# ('unavailable', exit 3) or measured whichever service answered convlog.*.
async def test_sdk_bench_against_a_running_service_uses_its_prefix(nats_server: NatsServer, tmp_path: Path) -> None:
    from services.log.service import LogService
    from shared.client import LogClient
    from shared.config import Settings, load_settings

    service = LogService(load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "acme.db"),
                                        "prefix": "acme"}, {}))
    await service.start()
    try:
        code, out, err = await run_cli("bench", "--sdk", "--sdk-ops", "4", "--json", "--nats-url", nats_server.url,
                                       "--prefix", "acme", env=service_env(tmp_path / "cli"), timeout=180)
        assert code == 0, err[-2000:]
        report = json.loads(out)
        assert report["scenarios"]["processes"]["convlog"]["found"] == 4 * 2
        client = await LogClient.connect(settings=Settings(nats_url=nats_server.url, prefix="acme"))
        try:
            sessions = [s.session_id for s in (await client.sessions()).sessions]
        finally:
            await client.close()
        assert any(s.startswith("sdkbench-") for s in sessions), sessions
    finally:
        await service.shutdown()
