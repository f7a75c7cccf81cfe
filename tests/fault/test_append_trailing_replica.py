"""Appends are decided as on one replica when a direct get is answered by a
replica that trails the stream leader.

On the JetStream store reads are direct gets, which on an R3 stream any
replica caught up to 90% answers, each request possibly another one (README,
"Caches only"): the head may come from a replica that has applied the last
append and an item lookup from one that has not, or the head itself may be
a few milliseconds old.  The README's contract for appends does not bend for
that: an ``item_id`` is stored once, ever, and a retry of it is answered as
the ``duplicate`` (no time window), and a ``conflict`` or a bad retract is
only reported against a head freshly read from the stream.

The trailing replica is played by the deciding instance's direct gets of one
subject (an item's id subject, or the session's head), which answer as a
replica that has not applied the latest append yet for their first few
reads; the appends, the stream, the services and the client are real.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Collection
from typing import Any

import pytest

from services.log.service import LogService
from services.log.store.jetstream import Layout
from services.log.store.jetstream.api import DirectGet
from shared.client import LogClient
from shared.config import Settings
from tests.support.natsd import NatsServer

SID = "trailing-append"
STALE_READS = 3  # reads of a subject the trailing replica answers before it has caught up



def _msg(text: str, item_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"agent": "user", "data": {"role": "user", "content": text}}
    if item_id is not None:
        item["item_id"] = item_id
    return item


def _trail(monkeypatch: pytest.MonkeyPatch, stale: dict[str, Any]) -> None:
    """Direct gets of each subject in ``stale`` answer its value (what a replica
    that has not applied the latest append holds) for their first ``STALE_READS``
    reads, then the stream as it is."""
    real = DirectGet.last
    left = dict.fromkeys(stale, STALE_READS)

    async def trailing(self: DirectGet, subject: str) -> Any:
        if left.get(subject, 0) > 0:
            left[subject] -= 1
            return stale[subject]
        return await real(self, subject)

    monkeypatch.setattr(DirectGet, "last", trailing)


async def _trailing_instance(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, stale: dict[str, Any]
) -> LogService:
    """A log-service instance, started cold, whose direct gets trail as :func:`_trail` says."""
    _trail(monkeypatch, stale)
    service = LogService(settings)
    await service.start()
    return service


def _ids_not_applied(settings: Settings, ids: Collection[str]) -> dict[str, None]:
    """The id subjects of ``ids`` as a replica that has not applied them answers: not found."""
    layout = Layout(settings.subjects)
    return {layout.item_subject(SID, iid): None for iid in ids}


@pytest.mark.parametrize("lagging", [["a", "b"], ["b"]], ids=["no-id-applied", "one-id-applied"])
async def test_a_retry_behind_the_head_is_its_duplicate_when_a_trailing_replica_answers_its_ids(
    js_settings: Settings, client: LogClient, monkeypatch: pytest.MonkeyPatch, lagging: list[str]
) -> None:
    first = LogService(js_settings)
    await first.start()
    try:
        await client.append(SID, [_msg("one")])
        items = [_msg("two", "a"), _msg("three", "b")]
        stored = await client.append(SID, items, expected_last=1)  # committed; say its reply was lost
    finally:
        await first.shutdown()
    # The retry reaches another instance: its head read shows the first attempt, the
    # lookup of (some of) its ids is answered by a replica that has not applied it.
    second = await _trailing_instance(js_settings, monkeypatch, _ids_not_applied(js_settings, lagging))
    try:
        again = await client.append(SID, items, expected_last=1)
        # README: an item_id is stored once, ever; a retry gets the original orders,
        # flagged duplicate (never a conflict, never "retry is partial").
        assert [(i.item_order, i.item_id, i.hash, i.duplicate) for i in again.items] == [
            (i.item_order, i.item_id, i.hash, True) for i in stored.items
        ]
        monkeypatch.undo()
        assert [e.item_order for e in await client.items(SID)] == [1, 2, 3]
    finally:
        await second.shutdown()


async def _head(settings: Settings, client: LogClient) -> Any:
    """The session's head message as a direct get returns it now."""
    layout = Layout(settings.subjects)
    return await DirectGet(client.nc, layout.log_streams[0], timeout=2.0).last(layout.session_filter(SID))


@pytest.mark.parametrize("request_", ["expected_last", "retract"])
async def test_no_conflict_or_bad_retract_is_reported_against_a_head_a_trailing_replica_answered(
    js_settings: Settings, client: LogClient, monkeypatch: pytest.MonkeyPatch, request_: str
) -> None:
    first = LogService(js_settings)
    await first.start()
    try:
        await client.append(SID, [_msg("one")])
        before = await _head(js_settings, client)
        await client.append(SID, [_msg("two")])  # acknowledged: the session is at 2
    finally:
        await first.shutdown()
    # The next append reaches another instance, started cold, whose replica has not
    # applied item 2 yet: its head reads show item 1.
    layout = Layout(js_settings.subjects)
    second = await _trailing_instance(js_settings, monkeypatch, {layout.session_filter(SID): before})
    try:
        if request_ == "expected_last":
            reply = await client.append(SID, [_msg("three")], expected_last=2)
        else:
            reply = await client.append(SID, [{"agent": "user", "kind": "retract", "data": {"target": 2}}])
        # README: a conflict or a bad retract is only reported against a head freshly
        # read from the stream; the stream's head is 2, so the append is valid.
        assert (reply.first_order, reply.last_order) == (3, 3)
        monkeypatch.undo()
        assert [e.kind for e in await client.items(SID)] == [
            "item", "item", "item" if request_ == "expected_last" else "retract"
        ]
    finally:
        await second.shutdown()


async def test_an_append_whose_answer_is_lost_is_stored_not_a_duplicate_when_a_trailing_replica_answers(
    nats_server: NatsServer, js_settings: Settings, client: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance's publish gets no answer (the server freezes with it in its
    socket, then stores it); the lookup that settles it is answered by a replica
    that has not applied it yet."""
    settings = dataclasses.replace(js_settings, request_timeout=0.5)
    layout = Layout(settings.subjects)
    client.timeout, client.deadline = 20.0, 30.0  # the client waits: only the service's publish is lost
    real = DirectGet.last
    stale = [STALE_READS]
    frozen = [False]

    async def trailing(self: DirectGet, subject: str) -> Any:
        if subject == layout.item_subject(SID, "lost") and stale[0] > 0:
            stale[0] -= 1
            return None
        msg = await real(self, subject)
        if subject == layout.session_filter(SID) and not frozen[0]:
            # The head the append is decided on is read: the server freezes before the
            # publish that follows reaches it, for three of the instance's timeouts.
            frozen[0] = True
            nats_server.pause()
            asyncio.get_running_loop().call_later(1.5, nats_server.resume)
        return msg

    monkeypatch.setattr(DirectGet, "last", trailing)
    service = LogService(settings)
    await service.start()
    try:
        reply = await client.append(SID, [_msg("lost", "lost")])
        assert frozen[0] and service.store._writer.unknown >= 1  # the answer was lost, and settled
        # Sent once and stored by this very request: answered as stored, not as a
        # duplicate of an earlier send (there was none), as with one replica.
        assert [(i.item_order, i.duplicate) for i in reply.items] == [(1, False)]
        monkeypatch.undo()
        assert [e.item_id for e in await client.items(SID)] == ["lost"]
    finally:
        nats_server.resume()
        await service.shutdown()
