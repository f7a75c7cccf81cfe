"""Two log-service instances on the JetStream store; one is killed mid-load.

Any number of instances serve the same sessions at once and none holds state
another needs: with 4 writer processes appending to two sessions through both
instances, ``kill -9`` of one loses nothing — every acknowledged item is in
the log once, at its acknowledged order, the orders are contiguous and the
chain verifies — and the writers finish through the other instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.client import LogClient
from tests.support.logsvc import (
    LogServiceProc,
    check_sessions,
    read_acks,
    start_writers,
    wait_for_acks,
)
from tests.support.natsd import NatsServer
from tests.support.procs import Proc

SESSIONS = ["js-one", "js-two"]
WRITERS = 4
APPENDS = 120  # per writer
BATCH_EVERY = 5


@pytest.fixture
def js_services(nats_server: NatsServer, tmp_path: Path) -> Iterator[list[LogServiceProc]]:
    svcs = []
    for i in range(2):
        log_dir = tmp_path / f"svc{i}"
        log_dir.mkdir()
        svcs.append(LogServiceProc(nats_server.url, tmp_path / "unused.db", log_dir=log_dir, store="jetstream"))
    try:
        for svc in svcs:
            svc.start()
        yield svcs
    finally:
        for svc in svcs:
            svc.stop()


async def test_kill_9_of_one_of_two_instances_loses_nothing(
    nats_server: NatsServer,
    tmp_path: Path,
    js_services: list[LogServiceProc],
    writer_procs: Callable[..., tuple[Proc, Path]],
) -> None:
    go = tmp_path / "go"
    writers = start_writers(
        writer_procs, nats_server.url, WRITERS, sessions=SESSIONS, count=APPENDS,
        batch_every=BATCH_EVERY, go_file=go, max_seconds=90,
    )
    for proc, _ in writers:
        await asyncio.to_thread(proc.wait_for_line, "connected", 20)
    await asyncio.to_thread(go.touch)

    # Mid-load, one instance dies; the writers retry unanswered appends (same ids).
    at_kill = await wait_for_acks([out for _, out in writers], 60, timeout=30)
    js_services[0].kill9()
    for proc, _ in writers:
        assert await asyncio.to_thread(proc.wait, 90) == 0, proc.output()

    acks = read_acks(out for _, out in writers)
    assert at_kill < len(acks.appends), "the writers were done before the kill"
    per_writer = APPENDS + (APPENDS // BATCH_EVERY) * 2
    assert acks.done == WRITERS and not acks.unknown
    assert acks.items == WRITERS * per_writer
    async with await LogClient.connect(nats_server.url) as client:
        total = await check_sessions(client, SESSIONS, acks)
        assert total == acks.items  # nothing unacknowledged, nothing twice
        # The survivor goes on serving.
        r = await client.append(SESSIONS[0], [{"agent": "user", "data": {"role": "user", "content": "after"}}])
        assert r.last_order == total_for(acks, SESSIONS[0]) + 1


def total_for(acks: object, sid: str) -> int:
    return sum(len(ids) for s, ids, _ in acks.appends if s == sid)  # type: ignore[attr-defined]
