"""A group commit over two shards whose combined batch on one of them is never answered.

A 3-node cluster, two shards whose R1 log streams are on two nodes, the store
connected to the node of the first.  Two sessions, one on each shard, append at
once: under load (``combine_at``) the group commit
goes as one combined atomic batch per shard.  The node of the second shard is
SIGSTOPped: its batch, the copy sent to settle it and the lookup get no
answer (its outcome is unknown), while the first shard's batch is stored.
The settle's failure was raised out of the whole group commit: both appends
were answered ``unavailable: the store failed to commit``, though the first
session's item was in the log (and no turn notice went for it).  Each shard's
outcome is now its own sessions'.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from services.log.store.jetstream import JetStreamStore
from services.log.store.jetstream.layout import Layout
from services.log.store.jetstream.settle import OutcomeStillUnknown
from shared.errors import UnavailableError
from shared.subjects import Subjects
from tests.contract.store_helpers import envs, item, req
from tests.support.eventually import assert_eventually
from tests.support.natscluster import NatsCluster

pytestmark = pytest.mark.timeout(120)

SHARDS = 2


@pytest.fixture
async def tagged_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A 3-node cluster whose nodes are tagged with their names (to place R1 streams)."""
    cluster = NatsCluster(tmp_path / "cluster", tag_nodes=True)
    try:
        await asyncio.to_thread(cluster.start)
        await cluster.wait_ready()
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def _two_shards_on_two_nodes(cluster: NatsCluster, subjects: Subjects) -> tuple[str, str]:
    """Shard k's R1 log stream placed on node k+1 (the store takes log streams it finds);
    returns a session of each shard."""
    layout = Layout(subjects, SHARDS)
    nc = await nats.connect(cluster.servers[0].url)
    try:
        for k in range(SHARDS):
            config = {**layout.log_stream_config(k, 1), "placement": {"tags": [f"n{k + 1}"]}}

            async def create(name: str = layout.log_streams[k], config: dict[str, Any] = config) -> None:
                # A node's tags reach the meta leader a moment after the cluster is ready.
                reply = json.loads((await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(),
                                                     5)).data)
                assert (reply.get("cluster") or {}).get("leader") == config["placement"]["tags"][0], reply

            await assert_eventually(create, timeout=10, interval=0.2)
    finally:
        await nc.close()
    sids = [f"s{n}" for n in range(100)]
    return (next(s for s in sids if layout.shard_of(s) == 0), next(s for s in sids if layout.shard_of(s) == 1))


async def _one_append_each_with_a_node_paused(
    store: JetStreamStore, ok_sid: str, lost_sid: str, lost_node: Any
) -> tuple[Any, Any]:
    """One new item each for ``ok_sid`` and ``lost_sid`` in one group commit (the combined
    path: one batch per shard) while ``lost_node``, holding ``lost_sid``'s shard, is
    paused; their outcomes (a reply or the exception)."""
    store._writer.combine_at = 2
    lost_node.pause()
    try:
        return tuple(await asyncio.gather(
            store.append(ok_sid, req(item("one", item_id=f"{ok_sid}-one"))),
            store.append(lost_sid, req(item("one", item_id=f"{lost_sid}-one"))),
            return_exceptions=True,
        ))
    finally:
        lost_node.resume()


async def test_a_shard_whose_combined_batch_is_unsettled_leaves_the_other_shards_appends_stored(
    tagged_cluster: NatsCluster,
) -> None:
    subjects = Subjects("shardsettle")
    ok_sid, lost_sid = await _two_shards_on_two_nodes(tagged_cluster, subjects)
    ok_node, lost_node = tagged_cluster.servers[0], tagged_cluster.servers[1]

    store = JetStreamStore({"servers": [ok_node.url]}, subjects=subjects, replicas=1, shards=SHARDS, timeout=1.0)
    await store.open()
    try:
        for sid in (ok_sid, lost_sid):  # their heads are cached: the group commit reads nothing first
            await store.append(sid, req(item("zero", item_id=f"{sid}-zero")))
        ok, lost = await _one_append_each_with_a_node_paused(store, ok_sid, lost_sid, lost_node)
        assert store._writer.combined >= 1 and store._writer.unknown >= 1
        # The shard whose batch was stored answers its append as stored ...
        assert not isinstance(ok, BaseException), ok
        assert [(i.item_id, i.item_order, i.duplicate) for i in ok.items] == [(f"{ok_sid}-one", 2, False)]
        # ... and the other says its outcome is unknown (retry with the same ids), not "failed".
        assert isinstance(lost, OutcomeStillUnknown), lost
        page = await store.read(ok_sid, after=0, limit=10, max_bytes=1 << 20)
        assert [e.item_id for e in envs(page.items)] == [f"{ok_sid}-zero", f"{ok_sid}-one"]
        again = await store.append(lost_sid, req(item("one", item_id=f"{lost_sid}-one")))
        assert [i.item_order for i in again.items] == [2]
    finally:
        lost_node.resume()
        await store.close()


async def test_a_shard_whose_head_cannot_be_read_leaves_the_other_shards_appends_stored(
    tagged_cluster: NatsCluster,
) -> None:
    # Heads not cached: the combined path reads them first.  The read on the stopped
    # node's shard failed the whole group commit, and the append on the healthy shard
    # was answered "the store failed to commit" (nothing written) with it.
    subjects = Subjects("shardhead")
    ok_sid, lost_sid = await _two_shards_on_two_nodes(tagged_cluster, subjects)
    ok_node, lost_node = tagged_cluster.servers[0], tagged_cluster.servers[1]

    store = JetStreamStore({"servers": [ok_node.url]}, subjects=subjects, replicas=1, shards=SHARDS, timeout=1.0)
    await store.open()
    try:
        ok, lost = await _one_append_each_with_a_node_paused(store, ok_sid, lost_sid, lost_node)
        assert not isinstance(ok, BaseException), ok
        assert [(i.item_id, i.item_order) for i in ok.items] == [(f"{ok_sid}-one", 1)]
        assert isinstance(lost, UnavailableError), lost
        assert (await store.append(lost_sid, req(item("one", item_id=f"{lost_sid}-one")))).last_order == 1
    finally:
        lost_node.resume()
        await store.close()
