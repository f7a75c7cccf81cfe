"""nats-server restarts and freezes mid-load lose nothing and heal by themselves.

Guarantee 2 (an acknowledged append survives a restart of nats-server) and 4
(the items stream still holds every committed item once, in order), plus the
client semantics of issue 3: clients and the service reconnect on their own,
and a server frozen with SIGSTOP (nats-py #671) delays an append but does not
hang it or duplicate it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.client import LogClient
from tests.support.eventually import assert_eventually
from tests.support.logsvc import (
    LogServiceProc,
    assert_load_kept,
    check_session,
    following,
    start_writers,
    stream_matches_log,
    wait_for_acks,
)
from tests.support.natsd import NatsServer
from tests.support.procs import Proc

SESSIONS = ["restart-a", "restart-b"]
WRITERS = 3


@pytest.mark.slow
async def test_nats_restarts_mid_load_lose_no_acked_item(
    nats_server: NatsServer,
    tmp_db: Path,
    tmp_path: Path,
    log_services: Callable[..., LogServiceProc],
    writer_procs: Callable[..., tuple[Proc, Path]],
) -> None:
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    stop = tmp_path / "stop"
    writers = start_writers(
        writer_procs, nats_server.url, WRITERS, sessions=SESSIONS, batch_every=4,
        stop_file=stop, max_seconds=90, timeout=1.0, deadline=30,
    )
    outs = [out for _, out in writers]

    async with (
        await LogClient.connect(nats_server.url, name="test-follower") as follower,
        following(follower, SESSIONS[0]) as seen,
    ):
        # 1. A graceful restart (SIGTERM) on the same port and store directory.
        await wait_for_acks(outs, more=40, timeout=30)
        await asyncio.to_thread(nats_server.restart)
        # Writers and the service reconnect by themselves: appends are acked again.
        await wait_for_acks(outs, more=40, timeout=30)

        # 2. A crash (SIGKILL: no JetStream flush on the way out), then a start on the same port.
        await asyncio.to_thread(nats_server.kill)
        await asyncio.to_thread(nats_server.start)
        await wait_for_acks(outs, more=40, timeout=30)

        stop.touch()
        for proc, _ in writers:
            assert await asyncio.to_thread(proc.wait, 40) == 0, proc.output()

        # The follower saw every item of its session once, in order, through both.
        async def followed_everything() -> None:
            assert seen == await follower.items(SESSIONS[0])

        await assert_eventually(followed_everything, timeout=30, interval=0.25)

    assert svc.proc is not None and svc.proc.running, "the log service died:\n" + svc.output()
    assert "nats: disconnected; reconnecting" in svc.output()  # said when NATS went away

    await assert_load_kept(nats_server.url, outs, SESSIONS, WRITERS)


@pytest.mark.slow
@pytest.mark.parametrize(
    "freeze",
    [
        pytest.param(4.0, id="4s"),
        # Past the clients' ping-based stale detection (3 s x 2 outstanding): the
        # client reconnects to a still-frozen server and retries the same item_id.
        pytest.param(12.0, id="12s-past-stale-detection"),
    ],
)
async def test_append_during_sigstop_of_nats_completes_after_sigcont(
    nats_server: NatsServer,
    tmp_db: Path,
    log_services: Callable[..., LogServiceProc],
    freeze: float,
) -> None:
    sid = "frozen"
    await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        await client.append(sid, [{"agent": "user", "data": {"role": "user", "content": "before"}}])

        # Freeze the server: sockets stay open, nothing is answered (nats-py #671).
        nats_server.pause()
        try:
            started = time.monotonic()
            pending = asyncio.create_task(
                client.append(sid, [{"agent": "user", "data": {"role": "user", "content": "frozen"}}])
            )
            # The freeze itself is the stimulus: hold it, then thaw.
            done, _ = await asyncio.wait({pending}, timeout=freeze)
            assert not done, "an append cannot complete while nats-server is stopped"
        finally:
            nats_server.resume()

        reply = await asyncio.wait_for(pending, timeout=20)
        elapsed = time.monotonic() - started
        assert elapsed < 20, f"append took {elapsed:.1f}s ({freeze}s of it frozen)"

        # Exactly one copy, at the acknowledged order; the next append is prompt.
        (item,) = reply.items
        envelopes = await client.items(sid)
        assert [e.item_id for e in envelopes].count(item.item_id) == 1
        check_session(sid, envelopes, {(sid, item.item_id): item.item_order})
        assert len(envelopes) == 2
        after = await asyncio.wait_for(
            client.append(sid, [{"agent": "user", "data": {"role": "user", "content": "after"}}]),
            timeout=10,
        )
        assert after.first_order == 3
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, [sid]), timeout=20, interval=0.25
        )
