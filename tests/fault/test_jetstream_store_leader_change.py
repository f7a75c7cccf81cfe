"""The JetStream store's requests on a real 3-node cluster, while leaders change.

A request the server drops without an answer (the server the store is
connected to dies, a stream leader steps down) is sent again after
:data:`~services.log.store.jetstream.api.RESEND_AFTER`: no read or listing
waits out the store's whole timeout and fails while the cluster can answer.
"""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from services.bench.leader import store_streams
from services.log.store.jetstream import JetStreamStore
from services.log.store.jetstream.api import RESEND_AFTER
from shared.messages import AppendItem, AppendRequest
from shared.subjects import Subjects
from tests.support.natscluster import NatsCluster

pytestmark = pytest.mark.timeout(60)

PREFIX = "lc"
TIMEOUT = 5.0  # the store's timeout (CONVLOG_REQUEST_TIMEOUT's default)
BOUND = RESEND_AFTER + 2.0  # well under TIMEOUT: a request sent again, not waited out


def _item(i: int) -> AppendRequest:
    return AppendRequest(items=[AppendItem(agent="user", data={"role": "user", "content": f"m{i}"}, item_id=f"id-{i}")])


async def _seed(urls: list[str], sessions: dict[str, int]) -> dict[str, str]:
    """Append ``n`` items to each session; the leader (server name) of each stream of the store."""
    async with JetStreamStore({"servers": urls}, subjects=Subjects(PREFIX), replicas=3, timeout=TIMEOUT) as store:
        await asyncio.gather(*(store.append(sid, _item(i)) for sid, n in sessions.items() for i in range(n)))
    nc = await nats.connect(urls)
    try:
        return {s.stream: s.leader or "" for s in await store_streams(nc.jetstream(timeout=2), PREFIX)}
    finally:
        await nc.close()


async def test_a_read_in_flight_when_its_server_dies_is_sent_again_soon(nats_cluster: NatsCluster) -> None:
    # The server the store is connected to dies with the store's read (a batch
    # direct get) unanswered: the store reconnects to another server at once,
    # but the batch get was only sent again when the store's 5 s timeout
    # expired, and the read failed "unavailable" (one-message gets and
    # publishes are sent again after RESEND_AFTER).  The server killed leads no
    # stream of the store: the others answer direct gets all the while.
    leaders = await _seed(nats_cluster.urls, {"s": 20})
    names = [s.name for s in nats_cluster.servers]
    victim = next(i for i, name in enumerate(names) if name not in leaders.values())
    urls = [nats_cluster.urls[victim]] + [u for i, u in enumerate(nats_cluster.urls) if i != victim]
    reader = JetStreamStore({"servers": urls, "dont_randomize": True, "reconnect_time_wait": 0.25,
                             "max_reconnect_attempts": -1}, subjects=Subjects(PREFIX), timeout=TIMEOUT)
    async with reader:
        assert len((await reader.read("s", after=0, limit=100, max_bytes=1 << 30)).items) == 20  # the head cached
        nats_cluster.servers[victim].pause()  # the read's requests go out and are never answered
        t0 = time.monotonic()
        read = asyncio.create_task(reader.read("s", after=0, limit=100, max_bytes=1 << 30))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(nats_cluster.servers[victim].kill)
        page = await read
        took = time.monotonic() - t0
        assert len(page.items) == 20 and page.last_order == 20
        assert took < BOUND, f"the read took {took:.2f}s (bound {BOUND:.1f}s)"


async def test_the_sessions_list_goes_on_through_stepdowns_of_the_fan_out_leader(nats_cluster: NatsCluster) -> None:
    # The sessions list asks the fan-out stream's leader for its subjects
    # (STREAM.INFO).  A stepdown drops the requests the old leader had not
    # answered: each waited out the store's 5 s timeout and the listing failed
    # "unavailable", while the new leader answered at once.
    sessions = {f"s{i}": 2 for i in range(6)}
    await _seed(nats_cluster.urls, sessions)
    fan_out = f"{PREFIX.upper()}_ITEMS"
    worst: list[float] = []
    stop = asyncio.Event()
    async with JetStreamStore({"servers": nats_cluster.urls}, subjects=Subjects(PREFIX), timeout=TIMEOUT) as store:

        async def listing() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                infos, more = await store.sessions(after=None, limit=100)
                worst.append(time.monotonic() - t0)
                assert sorted(i.session_id for i in infos) == sorted(sessions) and not more

        listers = [asyncio.create_task(listing()) for _ in range(16)]
        nc = await nats.connect(nats_cluster.urls)
        try:
            for _ in range(3):  # a stepdown drops what is in flight (nearly always)
                reply = await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{fan_out}", b"", timeout=5)
                assert b'"success":true' in reply.data, reply.data
                await asyncio.sleep(1.2)  # past RESEND_AFTER: one stepdown at a time
        finally:
            stop.set()
            await nc.close()
            await asyncio.gather(*listers)
    assert max(worst) < BOUND, f"a sessions list took {max(worst):.2f}s (bound {BOUND:.1f}s)"


async def test_reads_go_on_through_the_no_responders_after_a_kill_9_of_the_log_leader(
    nats_cluster: NatsCluster,
) -> None:
    # For about 2 s after kill -9 of a log stream's leader the surviving nodes
    # answer its direct gets with 503 "no responders".  The store failed every
    # read (a batch get, from a cached head) and every fresh head read (a
    # one-message get: what an append reads first) "unavailable" at once, where
    # a retry within its timeout would have been answered.
    leaders = await _seed(nats_cluster.urls, {"s": 5})
    names = [s.name for s in nats_cluster.servers]
    victim = names.index(leaders[f"{PREFIX.upper()}_LOG_0"])
    others = [u for i, u in enumerate(nats_cluster.urls) if i != victim]
    reader = JetStreamStore({"servers": others}, subjects=Subjects(PREFIX), timeout=TIMEOUT)
    fresh = JetStreamStore({"servers": others}, subjects=Subjects(PREFIX), timeout=TIMEOUT)
    async with reader, fresh:
        assert len((await reader.read("s", after=0, limit=100, max_bytes=1 << 30)).items) == 5  # the head cached
        await asyncio.to_thread(nats_cluster.servers[victim].kill)
        t0 = time.monotonic()
        page, last = await asyncio.gather(
            reader.read("s", after=0, limit=100, max_bytes=1 << 30),
            fresh.last_order("s"),  # no cached head: a direct get of the session's last item
        )
        took = time.monotonic() - t0
        assert len(page.items) == 5 and page.last_order == 5 and last == 5
        assert took < TIMEOUT, f"took {took:.2f}s"
