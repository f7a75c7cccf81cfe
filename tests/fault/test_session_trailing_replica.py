"""``ConvlogSession`` reads its own writes when the log read is answered by a
replica that trails the stream leader.

On the JetStream store a read is served by direct gets, which on an R3 stream
any replica caught up to 90% answers (README, "Caches only"): a log-service
instance that did not make the append (another instance in the queue group,
or one started since) may answer a read with the history as it was a few
milliseconds before.  The session's README contract is stricter: after
``add_items``/``pop_item``/``clear_session`` returns, every read through the
same connection includes it, and ``k`` never goes back for a connection.

The trailing replica is played by the reading instance's direct gets of the
session's head, which answer with the head as it was before the last append
for the first few reads (as a follower does until it has applied it); the
appends, the stream, the service and the session are real.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.log.service import LogService
from services.log.store.jetstream import Layout
from services.log.store.jetstream.api import DirectGet
from shared import ConvlogSession
from shared.client import LogClient
from shared.config import Settings
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer
from tests.support.sdk_env import contents

SID = "trailing-replica"
STALE_READS = 3  # head reads the trailing replica answers before it has caught up



async def _trailing_instance(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, before: Any, *, reads: int = STALE_READS
) -> LogService:
    """A log-service instance, started cold, whose replica still shows ``before``
    as the session's head for its first ``reads`` head reads."""
    head = Layout(settings.subjects).session_filter(SID)
    real = DirectGet.last
    stale = [reads]

    async def trailing(self: DirectGet, subject: str) -> Any:
        if subject == head and stale[0] > 0:
            stale[0] -= 1
            return before
        return await real(self, subject)

    monkeypatch.setattr(DirectGet, "last", trailing)
    service = LogService(settings)
    await service.start()
    return service


async def _head(settings: Settings, client: LogClient) -> Any:
    """The session's head message as a direct get returns it now."""
    layout = Layout(settings.subjects)
    return await DirectGet(client.nc, layout.log_streams[0], timeout=2.0).last(layout.session_filter(SID))


@pytest.mark.parametrize("follow", [True, False], ids=["copy", "no-copy"])
async def test_own_add_items_is_read_when_a_trailing_replica_answers(
    js_settings: Settings, client: LogClient, monkeypatch: pytest.MonkeyPatch, follow: bool
) -> None:
    first = LogService(js_settings)
    await first.start()
    session = ConvlogSession(SID, client=client, follow=follow)
    try:
        await session.add_items([{"role": "user", "content": "one"}])
        before = await _head(js_settings, client)
        await session.add_items([{"role": "assistant", "content": "two"}])  # acknowledged to us
        await first.shutdown()  # the instance that appended goes; the next one starts cold
        second = await _trailing_instance(js_settings, monkeypatch, before)
        try:
            # README: after add_items returns, every read through the same connection includes it.
            assert contents(await session.get_items()) == ["one", "two"]
        finally:
            await second.shutdown()
    finally:
        await session.close()


@pytest.mark.parametrize("follow", [True, False], ids=["copy", "no-copy"])
@pytest.mark.parametrize("mutation", ["pop_item", "clear_session"])
async def test_pop_and_clear_after_own_add_items_act_on_it_when_a_trailing_replica_answers(
    js_settings: Settings, client: LogClient, monkeypatch: pytest.MonkeyPatch, follow: bool, mutation: str
) -> None:
    first = LogService(js_settings)
    await first.start()
    session = ConvlogSession(SID, client=client, follow=follow)
    try:
        await session.add_items([{"role": "user", "content": "one"}])  # acknowledged to us
        await first.shutdown()
        # The replica has not applied the session's first append yet: no head at all.
        second = await _trailing_instance(js_settings, monkeypatch, None)
        try:
            if mutation == "pop_item":
                assert await session.pop_item() == {"role": "user", "content": "one"}
            else:
                await session.clear_session()
            # README: the write is in every later read of this connection, and it was
            # the newest visible item: the pop or clear hid it (nothing visible is left).
            assert await session.get_items() == []
            monkeypatch.undo()  # the replica has caught up: the log as it is
            assert [e.kind for e in await client.items(SID)] == [
                "item", "retract" if mutation == "pop_item" else "clear"
            ]
        finally:
            await second.shutdown()
    finally:
        await session.close()


async def test_a_session_object_made_after_another_closed_reads_its_writes_when_a_trailing_replica_answers(
    js_settings: Settings, client: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The floor belongs to the connection, not to one session object: closing the
    # last object of a session id on a client must not forget it.
    first = LogService(js_settings)
    await first.start()
    writer = ConvlogSession(SID, client=client, follow=False)
    await writer.add_items([{"role": "user", "content": "one"}])
    before = await _head(js_settings, client)
    await writer.add_items([{"role": "assistant", "content": "two"}])  # acknowledged to us
    await writer.close()
    await first.shutdown()
    second = await _trailing_instance(js_settings, monkeypatch, before)
    reader = ConvlogSession(SID, client=client, follow=False)
    try:
        # README: every read through the same connection includes it.
        assert contents(await reader.get_items()) == ["one", "two"]
    finally:
        await reader.close()
        await second.shutdown()


async def test_a_log_read_never_shows_less_than_the_copy_showed_when_a_trailing_replica_answers(
    js_settings: Settings, client: LogClient, monkeypatch: pytest.MonkeyPatch, nats_server: NatsServer
) -> None:
    # The copy's deliveries (another process's writes) count in the connection's floor:
    # a read the copy cannot answer (the whole history of a copy seeded with the last few
    # items) went to the log, and a trailing replica's answer was taken although the copy
    # had already shown a later item to this process.
    from shared import session_copy

    monkeypatch.setattr(session_copy, "MAX_ITEMS", 4)  # the whole history is more than the copy keeps
    first = LogService(js_settings)
    await first.start()
    other = await LogClient.connect(nats_server.url)  # another process's writes
    session = ConvlogSession(SID, client=client, max_staleness=60)  # no log read to confirm the copy
    try:
        for i in range(1, 6):
            await other.append(SID, [{"agent": "user", "data": {"role": "user", "content": f"m{i}"}}])
        assert contents(await session.get_items(limit=2)) == ["m4", "m5"]  # a copy of the last few
        before = await _head(js_settings, client)
        await other.append(SID, [{"agent": "user", "data": {"role": "user", "content": "m6"}}])

        async def delivered() -> None:
            assert contents(await session.get_items(limit=2)) == ["m5", "m6"]  # shown to this process

        await assert_eventually(delivered, timeout=10)
        await first.shutdown()
        # Long enough behind for the copy's own reads (its staleness check, a seed it
        # refuses as behind) not to use up the stale answers before the log read.
        second = await _trailing_instance(js_settings, monkeypatch, before, reads=12)
        try:
            assert contents(await session.get_items()) == [f"m{i}" for i in range(1, 7)]
        finally:
            await second.shutdown()
    finally:
        await session.close()
        await other.close()
