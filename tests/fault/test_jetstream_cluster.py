"""Faults on a real 3-node cluster: the JetStream store on an R3 stream, two
log-service instances, 16 writers × 20 sessions appending all the while.

Each fault happens mid-load, the writers retrying unanswered appends with the
same ``item_id`` as a real client does, and each test then proves:

* 0 acknowledged items lost, duplicated or moved — every acknowledged
  ``item_id`` is in the log once, at its acknowledged ``item_order``, with its
  acknowledged hash, and the log holds nothing nobody asked for;
* one contiguous verified history per session (orders 1..n, chain intact);
* appends resume by themselves: acks keep coming after the fault, with no
  one restarting a client or a log service.

The leader killed is the one of the store's busiest stream, read from the
streams' cluster info (:mod:`services.bench.leader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from services.bench.leader import store_streams
from services.log.store.jetstream.api import RESEND_AFTER
from shared.client import LogClient
from tests.support.cluster_load import (
    PREFIX,
    SESSIONS,
    appends_served,
    check_log,
    cluster_log,
    gaps,
    load,
)
from tests.support.logsvc import READY_LINE, LogServiceProc
from tests.support.natscluster import NatsCluster
from tests.support.natsd import NatsServer
from tests.support.procs import python_module

pytestmark = pytest.mark.timeout(150)

BEFORE, AFTER = 150, 150  # acks to see before a fault, and after it (appends resume)


async def test_kill_9_of_the_stream_leader_loses_nothing(tmp_path: Path) -> None:
    async with cluster_log(tmp_path) as cl, load(cl.url, tmp_path) as writers:
        await writers.acked(BEFORE)
        # Step 1: kill -9 the node leading the store's busiest stream, mid-load.
        leader = await cl.leader()
        assert leader.replicas == 3
        killed_at = time.time()
        cl.server(leader.leader).kill()
        # Step 2: the survivors elect a new leader; the writers' retries go through.
        await writers.acked(AFTER, timeout=40)
        assert (await cl.leader()).leader != leader.leader
        # Step 3: the killed node comes back and catches up; appends go on.
        cl.server(leader.leader).start()
        await writers.acked(AFTER, timeout=40)
        acks = await writers.stop()
        cl.assert_services_kept_running()
        first, longest, stall = gaps(acks, killed_at)
        print(f"leader kill: first ack {first:.2f}s after, longest gap {longest:.2f}s, "
              f"longest one writer waited {stall:.2f}s")
        await check_log(cl.url, acks, SESSIONS)


async def test_appends_resume_soon_after_a_stream_leader_stepdown(tmp_path: Path) -> None:
    # A stepdown drops the publishes (and leader gets) the old leader had not
    # answered, with no reply: they were sent again only when the store's 5 s
    # timeout expired, and every writer of the shard stalled that long.  They
    # are sent again after RESEND_AFTER: no writer waits anywhere near 5 s.
    store_timeout = 5.0  # CONVLOG_REQUEST_TIMEOUT's default, the log services' store timeout
    bound = RESEND_AFTER + 2.0
    assert bound < store_timeout - 1.0
    async with cluster_log(tmp_path) as cl, load(cl.url, tmp_path) as writers:
        await writers.acked(BEFORE)
        nc = await nats.connect(cl.url.split(","), connect_timeout=2)
        try:
            streams = [s.stream for s in await store_streams(nc.jetstream(timeout=2), PREFIX)
                       if s.stream.endswith(("_ITEMS", "_LOG_0"))]
            assert len(streams) == 2, streams  # the log stream and the fan-out
            since = time.time()
            for _ in range(8):  # a dropped answer is likely, not certain, in one stepdown
                # Step 1: the log and the fan-out stream leaders step down, mid-load.
                for stream in streams:
                    reply = await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
                    assert b'"success":true' in reply.data, reply.data
                # Step 2: new leaders are elected at once; the writers go on.
                await writers.acked(AFTER, timeout=40)
                await asyncio.sleep(1.0)
        finally:
            await nc.close()
        acks = await writers.stop()
        cl.assert_services_kept_running()
        first, longest, stall = gaps(acks, since)
        print(f"stepdowns: longest gap {longest:.2f}s, longest one writer waited {stall:.2f}s")
        assert stall < bound, f"a writer waited {stall:.2f}s after a stepdown (bound {bound:.1f}s)"
        await check_log(cl.url, acks, SESSIONS)


async def test_kill_9_of_one_of_two_log_services_loses_nothing(tmp_path: Path) -> None:
    async with cluster_log(tmp_path) as cl, load(cl.url, tmp_path) as writers:
        await writers.acked(BEFORE)
        # Step 1: kill -9 one instance mid-load; its unanswered appends are retried.
        cl.services[0].kill9()
        # Step 2: the other instance carries on alone.
        await writers.acked(AFTER, timeout=40)
        # Step 3: the killed one starts again, cold, and serves next to the other.
        await asyncio.to_thread(cl.services[0].start, 30)
        await writers.acked(AFTER, timeout=40)
        acks = await writers.stop()
        cl.assert_services_kept_running(starts=(2, 1))
        await check_log(cl.url, acks, SESSIONS)


async def test_stopping_all_three_servers_and_starting_them_again_loses_nothing(tmp_path: Path) -> None:
    async with cluster_log(tmp_path) as cl, load(cl.url, tmp_path) as writers:
        await writers.acked(BEFORE)
        # Step 1: every server stops (SIGTERM) mid-load: nothing can be appended.
        for server in cl.cluster.servers:
            await asyncio.to_thread(server.stop)
        stopped_at = time.time()
        # Step 2: they start again on the same ports and stores.
        for server in cl.cluster.servers:
            await asyncio.to_thread(server.start)
        # Step 3: the log services and the writers reconnect by themselves.
        await writers.acked(AFTER, timeout=60)
        acks = await writers.stop()
        cl.assert_services_kept_running()
        first, longest, _ = gaps(acks, stopped_at)
        print(f"full restart: first ack {first:.2f}s after the servers stopped, longest gap {longest:.2f}s")
        await check_log(cl.url, acks, SESSIONS)


async def test_two_instances_appending_to_one_session_at_once(tmp_path: Path) -> None:
    hot = ["cl-hot"]
    async with cluster_log(tmp_path) as cl, load(cl.url, tmp_path, sessions=hot, cas_processes=2) as writers:
        # 16 writers on one session through both instances: 8 plain appends,
        # 8 with expected_last (read the head, append on it, retry on conflict).
        await writers.acked(BEFORE + AFTER)
        acks = await writers.stop()
        cl.assert_services_kept_running()
        lasts = await check_log(cl.url, acks, hot)
        served = await appends_served(cl.url)
    assert len(served) == 2 and min(served.values()) > 0, f"appends per instance: {served}"
    assert sum(served.values()) >= len(acks.appends)
    assert acks.conflicts > 0, "no expected_last append ever lost a race: the instances did not contend"
    assert lasts["cl-hot"] == len(acks.by_item)


@contextlib.asynccontextmanager
async def _cluster_without_quorum(tmp_path: Path) -> AsyncIterator[tuple[str, list[NatsServer]]]:
    """A 3-node cluster with two of its servers stopped: no stream can be placed
    or led. The meta leader stays up, so for a while it still answers, and
    refuses an R3 stream for want of peers ("peer offline"), then only times
    out. Yields the three servers' URL and the two stopped ones."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        await asyncio.to_thread(cluster.start)
        await cluster.wait_ready()
        meta = next((s for s in cluster.servers if "Self is new JetStream cluster metadata leader" in s.log_text()),
                    cluster.servers[0])
        others = [s for s in cluster.servers if s is not meta]
        for server in others:
            await asyncio.to_thread(server.stop)
        yield ",".join(s.url for s in [meta, *others]), others
    finally:
        await asyncio.to_thread(cluster.stop)


# The store is opened first, then the items stream (SQLite store), the routing
# bucket, the work stream and the heads bucket are created; each waits. On the
# SQLite store it is those that wait: a request lost while a cluster formed once
# stopped both of the README's log services with "nats: timeout".
WAITS = {"jetstream": "waiting for the store", "sqlite": "waiting for the streams on NATS JetStream"}
#: The stream each store's service creates R3 once the cluster is back.
STREAMS = {"jetstream": "CONVLOG_LOG_0", "sqlite": "CONVLOG_ITEMS"}


@pytest.mark.parametrize("store", WAITS)
async def test_a_log_service_started_before_its_cluster_has_quorum_waits_for_it(tmp_path: Path, store: str) -> None:
    svc = None
    async with _cluster_without_quorum(tmp_path) as (url, others):
        try:
            svc = LogServiceProc(url, tmp_path / "log.db", log_dir=tmp_path, store=store,
                                 env={"CONVLOG_STREAM_REPLICAS": "3"})
            svc.start(wait=False)  # it cannot be ready yet
            assert svc.proc is not None
            await asyncio.to_thread(svc.proc.wait_for_line, WAITS[store], 30)
            assert svc.proc.running, svc.proc.output()
            # The others come back; the service opens or creates what it needs and serves.
            for server in others:
                await asyncio.to_thread(server.start)
            await asyncio.to_thread(svc.proc.wait_for_line, READY_LINE, 60)
            async with await LogClient.connect(url) as client:
                reply = await client.append("early", [{"agent": "user", "data": {"role": "user", "content": "hi"}}])
                assert reply.first_order == 1
                info = await client.nc.jetstream().stream_info(STREAMS[store])
                assert info.config.num_replicas == 3
        finally:
            if svc is not None:
                await asyncio.to_thread(svc.stop)


@pytest.mark.parametrize("store", WAITS)
async def test_sigterm_while_waiting_for_the_cluster_stops_at_once_and_cleanly(tmp_path: Path, store: str) -> None:
    async with _cluster_without_quorum(tmp_path) as (url, _):
        svc = LogServiceProc(url, tmp_path / "log.db", log_dir=tmp_path, store=store,
                             env={"CONVLOG_STREAM_REPLICAS": "3"})
        try:
            svc.start(wait=False)
            assert svc.proc is not None
            await asyncio.to_thread(svc.proc.wait_for_line, WAITS[store], 30)
            os.kill(svc.proc.pid, signal.SIGTERM)
            # Not the rest of the minute's wait, and no error: a stop asked for.
            assert await asyncio.to_thread(svc.proc.wait, 10) == 0, svc.proc.output()
            assert "Traceback" not in svc.proc.output() and "convlog log:" not in svc.proc.output()
        finally:
            await asyncio.to_thread(svc.stop)


async def test_a_worker_waits_for_its_routing_bucket_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    async with _cluster_without_quorum(tmp_path) as (url, _):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVLOG_", "OPENAI_"))}
        env.update(CONVLOG_NATS_URL=url, CONVLOG_STREAM_REPLICAS="3", CONVLOG_EMBEDDED="false")
        with python_module("services.cli.main", "worker", "Triage", log_dir=tmp_path, env=env,
                           name="worker-Triage") as worker:
            await asyncio.to_thread(worker.wait_for_line, r"waiting for the routing bucket on NATS JetStream", 30)
            assert worker.running, worker.output()
            os.kill(worker.pid, signal.SIGTERM)
            assert await asyncio.to_thread(worker.wait, 10) == 0, worker.output()
            assert "Traceback" not in worker.output() and "convlog worker:" not in worker.output()
