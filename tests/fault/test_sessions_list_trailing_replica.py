"""The sessions list's ``multi_last`` of the fan-out answered by a replica that
trails the one that showed the log's last items copied.

The list waits until the fan-out holds every log stream's last item (direct gets
of those sessions), then asks the fan-out for the last item of each session of
the page (``multi_last``).  On R3 each direct get goes to any replica: seen on a
real 5-node loopback cluster (the reader on a node with no replica of the
fan-out, one of its followers SIGSTOPped for 0.3 s every 0.5 s while a writer
appended to one session), about 1 list in 100 gave that session a
``last_order`` below the one it had waited for (5 in 746: ``4465 < 4489``):
the ``multi_last`` came from the follower still applying what it missed.

Here, so that it happens every time, the trailing follower is played by the
real server answering the list's first few ``multi_last`` gets of the fan-out as
of an earlier stream sequence (``up_to_seq``: the last items, and the
``Nats-UpTo-Sequence``, a follower that has applied that far answers with);
the appends, the streams and the copy are real.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.log.store.jetstream import JetStreamStore, api
from services.log.store.jetstream.layout import Layout
from shared.subjects import Subjects
from tests.contract.store_helpers import item, req
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer

STALE_ANSWERS = 3  # multi_last gets the trailing follower answers before it has caught up


async def test_a_session_is_listed_with_the_item_the_list_waited_for_when_a_trailing_replica_answers(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    subjects = Subjects("listtrail")
    layout = Layout(subjects)
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, timeout=2.0)
    await store.open()
    try:
        await store.append("s1", req(item("one", item_id="s1-one")))
        await store.append("s2", req(item("one", item_id="s2-one")))

        async def copied() -> None:
            listed, _ = await store.sessions(after=None, limit=10)
            assert [(i.session_id, i.last_order) for i in listed] == [("s1", 1), ("s2", 1)]

        await assert_eventually(copied, timeout=5)
        stale_seq = 2  # the fan-out as it was then: the two first items
        await store.append("s1", req(item("two", item_id="s1-two")))  # acknowledged before the list

        real_get = api._Batches.get
        stale = [STALE_ANSWERS]

        async def trailing(self: Any, subject: str, request: dict[str, object], collect: Any) -> list[Any]:
            if subject.endswith(f".{layout.stream}") and "multi_last" in request and stale[0] > 0:
                stale[0] -= 1
                request = {**request, "up_to_seq": stale_seq}
            return await real_get(self, subject, request, collect)

        monkeypatch.setattr(api._Batches, "get", trailing)
        listed, more = await store.sessions(after=None, limit=10)
        assert not more
        # The list waited for s1's item 2 in the fan-out: it lists s1 with it.
        assert [(i.session_id, i.last_order) for i in listed] == [("s1", 2), ("s2", 1)]
    finally:
        await store.close()


async def test_the_list_waits_for_the_leaders_last_item_not_a_trailing_replicas(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The list read each log stream's last item (the point it waits for the fan-out
    to copy) with a direct get, which any replica answers: one trailing the leader gave
    an older point, the wait and the fan-out's ``multi_last`` were held to it, and an
    append acknowledged before the call was left out of the list (read-your-writes).
    Here the trailing replica of the log stream answers that get with the last item
    the real server gave before the append, and the fan-out answers as it was then
    too (its copy of the append a few milliseconds late, as the copy is on a busy
    cluster: the direct gets of its last items and its ``multi_last`` as above); the
    appends, the streams and the copy are real."""
    from services.log.store.jetstream.api import DirectGet

    subjects = Subjects("listlead")
    layout = Layout(subjects)
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, timeout=2.0)
    await store.open()
    try:
        await store.append("s1", req(item("one", item_id="s1-one")))

        async def copied() -> None:
            listed, _ = await store.sessions(after=None, limit=10)
            assert [(i.session_id, i.last_order) for i in listed] == [("s1", 1)]

        await assert_eventually(copied, timeout=5)
        log_all, items = layout.log_all(0), layout.items("s1")
        # The last items then: of the log stream, and of the session in the fan-out.
        before = {s: await get.last(s) for s, get in ((log_all, store._reads.shard(0)), (items, store._reads.fan_out()))}
        assert all(before.values())
        await store.append("s1", req(item("two", item_id="s1-two")))  # acknowledged before the list

        real_last, real_get = DirectGet.last, api._Batches.get
        stale = [2 * STALE_ANSWERS, STALE_ANSWERS]

        async def trailing_last(self: DirectGet, subject: str) -> Any:
            if subject in before and stale[0] > 0:
                stale[0] -= 1
                return before[subject]
            return await real_last(self, subject)

        async def trailing(self: Any, subject: str, request: dict[str, object], collect: Any) -> list[Any]:
            if subject.endswith(f".{layout.stream}") and "multi_last" in request and stale[1] > 0:
                stale[1] -= 1
                request = {**request, "up_to_seq": 1}  # the fan-out as it was then
            return await real_get(self, subject, request, collect)

        monkeypatch.setattr(DirectGet, "last", trailing_last)
        monkeypatch.setattr(api._Batches, "get", trailing)
        listed, _ = await store.sessions(after=None, limit=10)
        assert [(i.session_id, i.last_order) for i in listed] == [("s1", 2)]
    finally:
        await store.close()


async def test_a_session_another_instance_appended_to_is_listed_with_the_item_the_fan_out_showed(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose last item in the fan-out the log's ``multi_last`` did not confirm
    (the replica that answered it trails the leader) had its head read again with a
    direct get, from any replica: one trailing too listed it without the item the list
    had waited for, appended by another instance (whose cache the lister does not share)
    and acknowledged before the call.  Here both of the lister's gets of the log stream
    answer as it was before that append (the ``multi_last`` as of its sequence then, the
    head with the head the real server gave then); the appends, the streams and the copy
    are real."""
    from services.log.store.jetstream.api import DirectGet

    subjects = Subjects("listother")
    layout = Layout(subjects)
    writer = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, timeout=2.0)
    lister = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, timeout=2.0)
    await writer.open()
    await lister.open()
    try:
        await writer.append("s1", req(item("one", item_id="s1-one")))

        async def copied() -> None:
            listed, _ = await lister.sessions(after=None, limit=10)
            assert [(i.session_id, i.last_order) for i in listed] == [("s1", 1)]

        await assert_eventually(copied, timeout=5)
        head = layout.session_filter("s1")
        before = await lister._reads.shard(0).last(head)  # the log's head of s1 then (sequence 1)
        assert before is not None
        await writer.append("s1", req(item("two", item_id="s1-two")))  # acknowledged before the list

        real_last, real_get = DirectGet.last, api._Batches.get
        stale = [STALE_ANSWERS, STALE_ANSWERS]

        async def trailing_last(self: DirectGet, subject: str) -> Any:
            if subject == head and stale[0] > 0:
                stale[0] -= 1
                return before
            return await real_last(self, subject)

        async def trailing(self: Any, subject: str, request: dict[str, object], collect: Any) -> list[Any]:
            if subject.endswith(f".{layout.log_streams[0]}") and "multi_last" in request and stale[1] > 0:
                stale[1] -= 1
                request = {**request, "up_to_seq": 1}  # the log stream as it was then
            return await real_get(self, subject, request, collect)

        monkeypatch.setattr(DirectGet, "last", trailing_last)
        monkeypatch.setattr(api._Batches, "get", trailing)
        listed, _ = await lister.sessions(after=None, limit=10)
        assert [(i.session_id, i.last_order) for i in listed] == [("s1", 2)]
    finally:
        await lister.close()
        await writer.close()
