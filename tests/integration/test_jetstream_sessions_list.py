"""The JetStream store's sessions list: paging through it does not list the whole
fan-out stream again for every page."""

from __future__ import annotations

import pytest

from services.log.store.jetstream import JetStreamStore
from services.log.store.jetstream.api import DirectGet
from shared.subjects import Subjects
from tests.contract.store_helpers import item, req
from tests.support.natsd import NatsServer


# Each page listed every session subject of the fan-out stream (a STREAM.INFO with a
# subjects filter, the whole stream's subjects), so a client paging through N sessions
# `limit` at a time cost N * N / limit subjects: `convlog sessions` or the web console
# over 100,000 sessions read 10^10/limit.  One listing is kept while the stream's subject
# count says no session came since.
async def test_paging_through_the_sessions_lists_the_fan_out_once_and_sees_new_sessions(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    listings: list[str] = []
    real = DirectGet.subjects

    async def counted(self: DirectGet, filter_subject: str) -> dict[str, int]:
        listings.append(filter_subject)
        return await real(self, filter_subject)

    monkeypatch.setattr(DirectGet, "subjects", counted)
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("lists"), shards=2)
    await store.open()
    try:
        sids = [f"s{i:02d}" for i in range(30)]
        for sid in sids:
            await store.append(sid, req(item(f"{sid}-1")))
        seen: list[str] = []
        after = None
        while True:
            infos, more = await store.sessions(after=after, limit=4)
            seen += [i.session_id for i in infos]
            if not more:
                break
            after = infos[-1].session_id
        assert seen == sids
        assert len(listings) == 1, listings  # 8 pages, one listing

        # A session that comes between two pages is in the later one (listed again).
        infos, _ = await store.sessions(after=None, limit=4)
        await store.append("s15x", req(item("s15x-1")))
        rest, _ = await store.sessions(after=infos[-1].session_id, limit=100)
        assert [i.session_id for i in rest] == sorted([*sids[4:], "s15x"])
        assert len(listings) == 2
        # More items in known sessions are no new session: the listing is kept.
        await store.append("s00", req(item("s00-2")))
        infos, _ = await store.sessions(after=None, limit=2)
        assert [(i.session_id, i.last_order) for i in infos] == [("s00", 2), ("s01", 1)]
        assert len(listings) == 2
    finally:
        await store.close()
