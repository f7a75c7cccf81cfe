"""A page of a session read from a replica that trails the one that answered its head.

On a cluster where the reading server is no replica of the log stream (R3 streams
on five nodes), each direct get goes to any replica: the head (``last_by_subj``)
and the page after it (``next_by_subj`` batches) may be answered by different ones.
A follower trailing the leader by milliseconds then lacked the newest item the head
had promised, and the read failed ``unavailable: the log stream lacks item 3``,
which reads as a log that lost an item.  Seen on a real 5-node loopback cluster
(a follower SIGSTOPped for 0.3 s every 0.5 s while one instance appended and
another, on a node with no replica, read the whole session).  Here, so that it
happens every time, the trailing follower is played by the reading store's batch
gets of the session, which leave out item 3 for their first few answers (as a
follower does until it has applied it); the appends, the stream and the head
read are real.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.log.store.jetstream import JetStreamStore
from services.log.store.jetstream.api import DirectGet
from services.log.store.jetstream.reads import order_of
from shared.subjects import Subjects
from tests.contract.store_helpers import envs, item, req
from tests.support.natsd import NatsServer

SID = "trailing-page"
STALE_ANSWERS = 3  # batch gets the trailing follower answers before it has applied item 3


def _trailing(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, the session's batch gets leave out item 3 for their first answers."""
    stale = [STALE_ANSWERS]
    real_batch, real_bodies = DirectGet.batch, DirectGet.bodies

    def applies(request: dict[str, object]) -> bool:
        return stale[0] > 0 and SID in str(request.get("next_by_subj", ""))

    async def batch(self: DirectGet, request: dict[str, object]) -> list[Any]:
        msgs = await real_batch(self, request)
        if applies(request):
            stale[0] -= 1
            msgs = [m for m in msgs if order_of(m) < 3]
        return msgs

    async def bodies(self: DirectGet, request: dict[str, object]) -> list[bytes]:
        got = await real_bodies(self, request)
        if applies(request):
            stale[0] -= 1
            got = [b for b in got if json.loads(b)["item_order"] < 3]
        return got

    monkeypatch.setattr(DirectGet, "batch", batch)
    monkeypatch.setattr(DirectGet, "bodies", bodies)


@pytest.mark.parametrize("how", ["read", "tail"])
async def test_a_page_from_a_replica_trailing_the_head_is_read_once_it_has_caught_up(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    subjects = Subjects("trailpage")
    writer = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects)
    reader = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects)  # another instance, cold
    await writer.open()
    await reader.open()
    try:
        for n in ("one", "two", "three"):
            await writer.append(SID, req(item(n, item_id=f"{SID}-{n}")))
        _trailing(monkeypatch)
        if how == "read":
            page = await reader.read(SID, after=0, limit=10, max_bytes=1 << 20)
        else:
            page = await reader.tail(SID, 10, visible=False)
        # The head said 3: the page holds 1..3, as a replica that has caught up answers.
        assert page.last_order == 3
        assert [e.item_order for e in envs(page.items)] == [1, 2, 3]
    finally:
        await reader.close()
        await writer.close()
