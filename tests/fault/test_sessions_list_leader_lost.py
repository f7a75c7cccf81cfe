"""The JetStream store's sessions list while the fan-out stream elects a new leader.

A 3-node cluster, R3 streams; the leader of ``<PREFIX>_ITEMS`` is killed (SIGKILL).
The list needs the stream's STREAM.INFO, which only a leader answers: for the
election the call cannot be served.  It took longer than the store's timeout
(3.6 s at a 2 s timeout, 6.3 s at 5 s: the log streams' reads, the wait for the
fan-out and the STREAM.INFO request each had a timeout of their own), so the
service's client had given up on it before it ended, and it ended saying only
``cannot list sessions: TimeoutError``.  The call now keeps to the timeout and
says which stream did not answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from services.log.store.jetstream import JetStreamStore
from services.log.store.jetstream.layout import Layout
from shared.errors import UnavailableError
from shared.subjects import Subjects
from tests.contract.store_helpers import item, req
from tests.support.eventually import assert_eventually
from tests.support.natscluster import NatsCluster

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 2.0
SLACK = 0.5  # a loaded machine's scheduling, not another request's timeout


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    c = NatsCluster(tmp_path / "cluster")
    try:
        await asyncio.to_thread(c.start)
        await c.wait_ready()
        yield c
    finally:
        await asyncio.to_thread(c.stop)


async def test_the_sessions_list_keeps_to_its_timeout_and_names_the_stream_while_its_leader_is_elected(
    cluster: NatsCluster,
) -> None:
    subjects = Subjects("listlost")
    layout = Layout(subjects)
    writer = JetStreamStore({"servers": [cluster.servers[0].url]}, subjects=subjects, replicas=3)
    await writer.open()
    try:
        sids = ["s0", "s1", "s2"]
        for sid in sids:
            await writer.append(sid, req(item(sid)))
        nc = await nats.connect(cluster.servers[0].url)
        try:
            info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{layout.stream}", b"", 5)).data)
        finally:
            await nc.close()
    finally:
        await writer.close()
    lost = int(info["cluster"]["leader"].removeprefix("n")) - 1
    up = next(i for i in range(len(cluster.servers)) if i != lost)

    store = JetStreamStore({"servers": [cluster.servers[up].url]}, subjects=subjects, replicas=3, timeout=TIMEOUT)
    await store.open()
    try:
        assert [i.session_id for i in (await store.sessions(after=None, limit=10))[0]] == sids
        cluster.servers[lost].kill()
        t0 = time.monotonic()
        try:
            listed, _ = await store.sessions(after=None, limit=10)
        except UnavailableError as e:
            took = time.monotonic() - t0
            # What is unavailable, not the name of an exception.
            assert layout.stream in str(e) and "TimeoutError" not in str(e), e
        else:  # the new leader came quickly
            took = time.monotonic() - t0
            assert [i.session_id for i in listed] == sids
        assert took <= TIMEOUT + SLACK, took

        async def listed_again() -> None:
            try:
                listed, _ = await store.sessions(after=None, limit=10)
            except UnavailableError as e:  # still electing
                raise AssertionError(e) from e
            assert [i.session_id for i in listed] == sids

        await assert_eventually(listed_again, timeout=20, interval=0.2)
    finally:
        await store.close()
