"""An append whose publish is still being replicated when its answer is lost.

A 3-node cluster, an R3 log stream, the JetStream store connected to the
stream's leader.  Right after the append reads its head, the two followers
are SIGSTOPped: the leader takes the publish but cannot commit it (no quorum),
so no answer comes within the store's resend time.  The copy sent to settle it
is answered "duplicate message id is in process" (10158): the original is
still being replicated, its fate unknown.  That is not another writer's moved
head; taken for one, the store decided the append again at once, sixteen times
in a few milliseconds (each copy "in process" too), and answered ``unavailable:
the session is too contended; nothing was written`` -- while the original was
stored as soon as the followers came back.  The copy is now sent again until
the stream settles it, and the append is answered as stored.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest

from services.log.store.jetstream import JetStreamStore
from services.log.store.jetstream.api import DirectGet
from shared.subjects import Subjects
from tests.contract.store_helpers import envs, item, req
from tests.support.natscluster import NatsCluster

pytestmark = pytest.mark.timeout(120)

SID = "no-quorum"
OUTAGE = 2.5  # seconds the followers are stopped: more than two resends of the publish


@pytest.mark.parametrize("combined", [False, True], ids=["publish", "combined-batch"])
async def test_an_append_in_process_when_its_answer_is_lost_is_answered_as_stored(
    nats_cluster: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, combined: bool
) -> None:
    subjects = Subjects("noquorum")
    first = JetStreamStore({"servers": [nats_cluster.urls[0]]}, subjects=subjects, replicas=3)
    await first.open()
    try:
        await first.append(SID, req(item("zero", item_id="zero")))
    finally:
        await first.close()
    nc = await nats.connect(nats_cluster.urls[0])
    try:
        leader = (await nc.jetstream().stream_info(first.layout.log_streams[0])).cluster.leader
    finally:
        await nc.close()
    at = next(i for i, s in enumerate(nats_cluster.servers) if s.name == leader)
    followers = [s for i, s in enumerate(nats_cluster.servers) if i != at]

    store = JetStreamStore({"servers": [nats_cluster.urls[at]]}, subjects=subjects, replicas=3)
    await store.open()
    if combined:  # two items in one group commit go in one combined atomic batch
        store._writer.combine_at = 2
    items = [item("one", item_id="one"), item("two", item_id="two")] if combined else [item("one", item_id="one")]
    real = DirectGet.last
    stopped: list[bool] = []

    def resume() -> None:
        for f in followers:
            f.resume()

    async def then_stop_the_followers(self: DirectGet, subject: str) -> Any:
        msg = await real(self, subject)
        if subject == store.layout.session_filter(SID) and not stopped:
            # The head the append is decided on is read: the publish that follows
            # reaches a leader that cannot commit it until the followers are back.
            stopped.append(True)
            for f in followers:
                f.pause()
            asyncio.get_running_loop().call_later(OUTAGE, resume)
        return msg

    monkeypatch.setattr(DirectGet, "last", then_stop_the_followers)
    try:
        reply = await store.append(SID, req(*items))
        assert stopped and store._writer.unknown >= 1  # the answer was lost, and settled
        assert store._writer.combined == int(combined)
        # Stored by this very request, once: answered as stored, not "nothing was written".
        ids = [it.item_id for it in items]
        assert [(i.item_id, i.item_order, i.duplicate) for i in reply.items] == [
            (iid, order, False) for order, iid in enumerate(ids, 2)]
        monkeypatch.undo()
        page = await store.read(SID, after=0, limit=10, max_bytes=1 << 20)
        assert [e.item_id for e in envs(page.items)] == ["zero", *ids]
        assert [e.hash for e in envs(page.items)[1:]] == [i.hash for i in reply.items]
    finally:
        resume()
        await store.close()
