"""The head witness stopped (the log service's SIGTERM path) while heads are pending
and nats-server does not answer (SIGSTOP: the connection stays, nothing is answered).

A stop cancels a flush under way: the heads of the chunks not reached yet must
not be left as coroutines never awaited (``RuntimeWarning`` at shutdown, every
later chunk's head lost to the warning).  And the last flush is best effort: it
must not hold the shutdown for one KV timeout per chunk of 256 sessions."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings

import nats

from services.log.heads import HeadWitness
from services.log.store.base import Committed
from shared.signing import Signer
from shared.subjects import Subjects
from tests.support.natsd import NatsServer

SESSIONS = 700  # three chunks of (at most) 256 heads


def _commits(n: int) -> list[Committed]:
    out = []
    for i in range(n):
        sid = f"s{i}"
        env = b'{"session_id":"%s","item_order":3,"hash":"%s"}' % (sid.encode(), b"a" * 64)
        out.append(Committed(position=i + 1, session_id=sid, item_order=3, envelope=env))
    return out


async def _witness_mid_flush(nats_server: NatsServer) -> tuple[HeadWitness, nats.NATS]:
    """A witness whose loop is in a flush that nats-server (paused) does not answer."""
    nc = await nats.connect(nats_server.url)
    witness = HeadWitness(nc, Subjects("convlog"), Signer.generate()[0], interval=0.05)
    await witness.start()
    nats_server.pause()
    witness.on_commit(_commits(SESSIONS))
    await asyncio.sleep(0.5)  # the loop's flush is waiting on its first chunk
    return witness, nc


async def test_a_stop_mid_flush_leaves_no_head_coroutine_never_awaited(nats_server: NatsServer) -> None:
    witness, nc = await _witness_mid_flush(nats_server)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stopping = asyncio.ensure_future(witness.stop())
            await asyncio.sleep(0.3)
            nats_server.resume()  # the last flush gets its answers
            await asyncio.wait_for(stopping, 60)
            gc.collect()
        never = [str(w.message) for w in caught if "never awaited" in str(w.message)]
        assert not never, f"{len(never)} head stores were never awaited, e.g. {never[0]}"
    finally:
        nats_server.resume()
        await nc.close()


async def test_stopping_with_heads_pending_and_nats_not_answering_is_bounded(nats_server: NatsServer) -> None:
    witness, nc = await _witness_mid_flush(nats_server)
    try:
        t0 = time.monotonic()
        await asyncio.wait_for(witness.stop(), 120)
        took = time.monotonic() - t0
        assert took < 8.0, f"stopping the head witness took {took:.1f} s with nats-server not answering"
    finally:
        nats_server.resume()
        await nc.close()
