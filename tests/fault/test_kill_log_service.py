"""``kill -9`` of the log service mid-load, several times, loses nothing.

Guarantees 2 (an acknowledged append survives ``kill -9``), 3 (retries with
the same ``item_id`` never duplicate) and 4 (every committed item reaches
``convlog.items.<sid>`` exactly once, in order — including items committed
just before a crash and not yet published).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.client import LogClient
from tests.support.eventually import assert_eventually
from tests.support.logsvc import (
    LogServiceProc,
    assert_load_kept,
    following,
    start_writers,
    wait_for_acks,
)
from tests.support.natsd import NatsServer
from tests.support.procs import Proc

SESSIONS = ["kill-a", "kill-b", "kill-c"]
WRITERS = 3
KILLS = 5


@pytest.mark.slow
async def test_kill9_log_service_repeatedly_mid_load_loses_and_duplicates_nothing(
    nats_server: NatsServer,
    tmp_db: Path,
    tmp_path: Path,
    log_services: Callable[..., LogServiceProc],
    writer_procs: Callable[..., tuple[Proc, Path]],
) -> None:
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)

    # Writers append continuously (singles and 3-item batches over three sessions),
    # with a short per-request timeout so crashes turn into retries of the same ids.
    stop = tmp_path / "stop"
    writers = start_writers(
        writer_procs, nats_server.url, WRITERS, sessions=SESSIONS, batch_every=4, pace=0.0,
        stop_file=stop, max_seconds=90, timeout=1.0, deadline=30,
    )
    outs = [out for _, out in writers]

    # A live follower of one session rides through every crash (its gap reads
    # go to the service, so they fail and are retried while it is down).
    async with (
        await LogClient.connect(nats_server.url, name="test-follower") as follower,
        following(follower, SESSIONS[0]) as seen,
    ):
        # Crash the service while appends are in flight, restart it on the same file.
        for _ in range(KILLS):
            await wait_for_acks(outs, more=40, timeout=30)
            svc.kill9()
            await asyncio.to_thread(svc.start)
        await wait_for_acks(outs, more=40, timeout=30)  # writers got through the last restart
        stop.touch()
        for proc, _ in writers:
            assert await asyncio.to_thread(proc.wait, 40) == 0, proc.output()

        async def followed_everything() -> None:
            assert seen == await follower.items(SESSIONS[0])

        await assert_eventually(followed_everything, timeout=30, interval=0.25)

    assert svc.starts == KILLS + 1
    await assert_load_kept(nats_server.url, outs, SESSIONS, WRITERS)
