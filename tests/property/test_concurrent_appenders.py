"""Several OS processes appending to ONE session get one contiguous total order.

Guarantee 1 (one total order, contiguous from 1) and 3 (no duplicates) under
real concurrency: independent writer processes, each with its own NATS
connection and ``LogClient``, released together by a start barrier, appending
single items and 3-item batches to the same session through a log service
subprocess on a real SQLite file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from shared.client import LogClient
from tests.support.eventually import assert_eventually
from tests.support.logsvc import (
    LogServiceProc,
    check_session,
    read_acks,
    release_together,
    start_writers,
    stream_matches_log,
)
from tests.support.natsd import NatsServer
from tests.support.procs import Proc

WRITERS = 4
APPENDS = 150  # per writer
BATCH_EVERY = 5  # every 5th append is a 3-item batch
SESSION = "shared-session"


async def test_concurrent_writer_processes_share_one_contiguous_order(
    nats_server: NatsServer,
    tmp_db: Path,
    tmp_path: Path,
    log_services: Callable[..., LogServiceProc],
    writer_procs: Callable[..., tuple[Proc, Path]],
) -> None:
    await asyncio.to_thread(log_services, nats_server.url, tmp_db)

    # Start the writers, wait until each is connected, then release them together.
    go = tmp_path / "go"
    writers = start_writers(
        writer_procs, nats_server.url, WRITERS, sessions=[SESSION], count=APPENDS,
        batch_every=BATCH_EVERY, go_file=go, max_seconds=60,
    )
    await release_together(writers, go)

    # Every writer acknowledged everything it sent.
    acks = read_acks(out for _, out in writers)
    per_writer = APPENDS + (APPENDS // BATCH_EVERY) * 2
    assert acks.done == WRITERS and not acks.unknown
    assert acks.items == WRITERS * per_writer

    async with await LogClient.connect(nats_server.url) as client:
        envelopes = await client.items(SESSION)

        # Orders are exactly 1..total; every acked item is there once, at its acked
        # order; the hash chain verifies; nothing unacknowledged slipped in.
        assert len(envelopes) == acks.items
        check_session(SESSION, envelopes, acks.by_item)

        # A batch got contiguous orders, and each writer's appends kept its own order.
        last_by_writer: dict[str, int] = {}
        for _sid, ids, orders in acks.appends:
            assert orders == list(range(orders[0], orders[0] + len(orders))), (ids, orders)
            writer = ids[0].split("-")[0]
            assert orders[0] > last_by_writer.get(writer, 0)
            last_by_writer[writer] = orders[-1]

        # The writers really ran concurrently: their items interleave in the order.
        switches = sum(1 for a, b in zip(envelopes, envelopes[1:], strict=False) if a.agent != b.agent)
        assert switches >= WRITERS * 5, f"writers barely overlapped ({switches} switches)"

        # And the items stream carries the same order, each envelope once.
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, [SESSION]), timeout=15, interval=0.2
        )


async def test_optimistic_writers_racing_on_expected_last_never_skip_or_overwrite(
    nats_server: NatsServer,
    tmp_db: Path,
    tmp_path: Path,
    log_services: Callable[..., LogServiceProc],
    writer_procs: Callable[..., tuple[Proc, Path]],
) -> None:
    """Compare-and-append under contention: each writer reads ``last_order`` and
    appends with ``expected_last``; losers get ``conflict`` (and write nothing)
    and retry.  Every winner lands right after the order it expected."""
    sid = "cas-session"
    await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    go = tmp_path / "go"
    appends = 40
    writers = start_writers(
        writer_procs, nats_server.url, 3, prefix="c", sessions=[sid], count=appends, batch_every=4,
        go_file=go, cas=True, max_seconds=60,
    )
    await release_together(writers, go)

    acks = read_acks(out for _, out in writers)
    assert acks.done == 3 and not acks.unknown
    assert acks.conflicts > 0, "the writers never raced; the test proved nothing"
    for rec in acks.records:
        assert not any(rec["dup"])
        assert rec["orders"] == list(
            range(rec["expected_last"] + 1, rec["expected_last"] + 1 + len(rec["ids"]))
        ), rec

    async with await LogClient.connect(nats_server.url) as client:
        envelopes = await client.items(sid)
        assert len(envelopes) == acks.items  # a conflict never wrote anything
        check_session(sid, envelopes, acks.by_item)
