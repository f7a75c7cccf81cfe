"""The log service's discovery over a real nats-server: micro ``PING``/``INFO``/
``STATS``, and appends served and counted on either nats-py seam.

Every test on the ``env`` fixture (:mod:`tests.support.logenv`) runs on both stores.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats, ServiceVerb, control_subject

from services.log.service import SERVICE_NAME, LogService
from services.log.store.sqlite import SQLiteStore
from shared import nats_seam
from shared.client import LogClient
from shared.config import load_settings
from shared.errors import (
    ERROR_HEADER,
)
from shared.nats_seam import FAST, PUBLIC, Probe, bind
from tests.support.eventually import assert_eventually
from tests.support.logenv import (
    SEAM_IDS,
    SEAMS,
    Env,
    both_seams,
    expect_seam,
    service_stats,
    user,
    wire,
)
from tests.support.natsd import NatsServer

# -- discovery ---------------------------------------------------------------------


@both_seams
async def test_micro_ping_info_and_stats(env: Env) -> None:
    await env.client.append("d", [user("1")])
    await env.client.read("d")
    await env.client.send("d", "2")
    await wire(env.nc, "convlog.append.d", b"{oops")
    await env.client.sessions()

    async def srv(verb: ServiceVerb, *, with_id: bool = False) -> dict[str, Any]:
        name = SERVICE_NAME
        subject = control_subject(verb, name, env.service._service.id if with_id else None)
        return json.loads((await env.nc.request(subject, b"", timeout=5)).data)

    ping = ServicePing.from_dict(await srv(ServiceVerb.PING))
    assert ping.name == SERVICE_NAME and ping.metadata["prefix"] == "convlog"
    any_ping = json.loads((await env.nc.request("$SRV.PING", b"", timeout=5)).data)
    assert any_ping["name"] == SERVICE_NAME
    assert ServicePing.from_dict(await srv(ServiceVerb.PING, with_id=True)).id == ping.id

    info = ServiceInfo.from_dict(await srv(ServiceVerb.INFO))
    endpoints = {e.name: e for e in info.endpoints}
    assert {n: e.subject for n, e in endpoints.items()} == {
        "append": "convlog.append.>",
        "read": "convlog.read.>",
        "sessions": "convlog.sessions",
        "in": "convlog.in.>",
    }
    assert {e.queue_group for e in info.endpoints} == {"convlog-log"}

    async def counted() -> None:
        stats = ServiceStats.from_dict(await srv(ServiceVerb.STATS))
        by_name = {e.name: e for e in stats.endpoints}
        assert {n: e.num_requests for n, e in by_name.items()} == {
            "append": 2, "read": 1, "sessions": 1, "in": 1,
        }
        assert by_name["append"].num_errors == 1
        assert by_name["read"].num_errors == 0
        assert "bad_request" in (by_name["append"].last_error or "")

    await assert_eventually(counted, timeout=5)


@pytest.mark.parametrize("mode", SEAMS, ids=SEAM_IDS)
async def test_appends_are_served_and_counted_on_either_seam(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    # On the fast seam appends skip micro's queue and task (nats-py
    # internals); on the public one micro's own path serves them, alike.
    settings = load_settings(
        {"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "nats_seam": mode}, environ={}
    )
    async with LogService(settings) as service:
        expect_seam(service, mode)
        sub = FAST.endpoint_subscription(service._service, "append")
        assert FAST.delivers_inline(sub) is (mode == "auto")
        nc = await nats.connect(nats_server.url)
        bind(nc, mode)
        try:
            client = LogClient(nc)
            replies = await asyncio.gather(*(client.append("in", [user(f"m{i}")]) for i in range(20)))
            assert sorted(r.last_order for r in replies) == list(range(1, 21))
            headers, _ = await wire(nc, "convlog.append.in", b"{not json")
            assert headers[ERROR_HEADER].startswith("bad_request")
            stats = await service_stats(nc, service)
        finally:
            await nc.close()
    append = next(e for e in stats.endpoints if e.name == "append")
    assert (append.num_requests, append.num_errors) == (21, 1)
    assert append.average_processing_time > 0


async def test_an_untested_nats_py_serves_on_the_public_seam(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What a nats-py that renamed an internal looks like to the service: the
    # probe names it, and every fast path is off at once (not just that one).
    broken = Probe(version="2.16.0", tested=True, missing=("Endpoint._processing_time_renamed",))
    monkeypatch.setattr(nats_seam, "probe", lambda: broken)
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db")}, environ={})
    with caplog.at_level("WARNING", logger="convlog.nats_seam"):
        async with LogService(settings) as service:
            assert service._seam is PUBLIC
            nc = await nats.connect(nats_server.url)
            try:
                client = LogClient(nc)
                replies = await asyncio.gather(*(client.append("old", [user(f"m{i}")]) for i in range(5)))
                assert sorted(r.last_order for r in replies) == [1, 2, 3, 4, 5]
                stats = await service_stats(nc, service)
            finally:
                await nc.close()
    assert "missing nats-py internals: Endpoint._processing_time_renamed" in caplog.text
    assert next(e for e in stats.endpoints if e.name == "append").num_requests == 5


@pytest.mark.parametrize("mode", SEAMS, ids=SEAM_IDS)
async def test_stats_count_the_commit_in_an_appends_processing_time(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    # micro times only its handler (decode and submit); the commit comes after.
    class SlowCommits(SQLiteStore):
        def _finish_commit(self, restart_wal: bool) -> None:
            time.sleep(0.05)
            super()._finish_commit(restart_wal)

    settings = load_settings(
        {"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "nats_seam": mode}, environ={}
    )
    async with LogService(settings, store=SlowCommits(settings.db_path)) as service:
        expect_seam(service, mode)
        nc = await nats.connect(nats_server.url)
        try:
            client = LogClient(nc)
            for i in range(3):
                await client.append("slow", [user(f"m{i}")])
            await client.read("slow")
            stats = await service_stats(nc, service)
        finally:
            await nc.close()
    by_name = {e.name: e for e in stats.endpoints}
    assert by_name["append"].num_requests == 3
    assert by_name["append"].average_processing_time >= 50_000_000  # ns: each waited for its COMMIT
    assert 0 < by_name["read"].average_processing_time < 50_000_000
