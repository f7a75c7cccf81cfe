"""``ConvlogSession`` under concurrency: one atomic idempotent append per ``add_items``
from several connections and threads, concurrent pops, retries after an unknown
outcome, cancellation (a started append finishes first) and closing.  Against a
real nats-server, the real log service and SQLite.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

import pytest
from agents import RunContextWrapper

from shared import ConvlogSession
from shared.chain import verify
from shared.client import LogClient
from shared.errors import UnavailableError
from shared.messages import Envelope
from tests.support.natsd import free_port
from tests.support.sdk_env import contents

# -- concurrency, idempotency, cancellation, closing ------------------------


def _batches(envelopes: list[Envelope]) -> dict[str, list[int]]:
    """item_order of each add_items call's items, keyed by the call key in their item_id."""
    out: dict[str, list[int]] = {}
    for env in envelopes:
        if env.kind == "item":
            out.setdefault(env.item_id.rsplit(".", 1)[0], []).append(env.item_order)
    return out


async def test_concurrent_add_items_from_two_connections_stay_contiguous_and_adjacent(
    log_url: str, log_client: LogClient
) -> None:
    # Two sessions on the same id, each with its own NATS connection, as two processes would be.
    a = ConvlogSession.from_url("concurrent_test", url=log_url)
    b = ConvlogSession.from_url("concurrent_test", url=log_url)
    try:

        async def writer(session: ConvlogSession, name: str) -> None:
            for n in range(20):
                await session.add_items(
                    [{"role": "user", "content": f"{name}-{n}-{k}"} for k in range(3)]
                )

        await asyncio.gather(writer(a, "a"), writer(b, "b"))
        envelopes = await log_client.items("concurrent_test")
        assert [e.item_order for e in envelopes] == list(range(1, 121))  # contiguous from 1
        assert verify(envelopes, session_id="concurrent_test") is None
        seen = [e.data["content"] for e in envelopes]
        expected = {f"{w}-{n}-{k}" for w in "ab" for n in range(20) for k in range(3)}
        assert sorted(seen) == sorted(expected)  # nothing lost, nothing doubled
        for orders in _batches(envelopes).values():  # each call's three items are adjacent
            assert orders == list(range(orders[0], orders[0] + 3))
        # and each writer's calls stay in the order it made them
        for w in "ab":
            mine = [s for s in seen if s.startswith(f"{w}-")]
            assert mine == [f"{w}-{n}-{k}" for n in range(20) for k in range(3)]
    finally:
        await a.close()
        await b.close()


async def test_concurrent_add_items_from_threads_with_their_own_loops(log_url: str) -> None:
    # The SDK's SQLiteSession test: one session object used from five threads.
    session = ConvlogSession.from_url("threads_test", url=log_url)
    items = [{"role": "user", "content": f"Message {i}"} for i in range(10)]

    def add_item(item: dict[str, Any]) -> None:
        asyncio.run(session.add_items([item]))

    def add_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
            list(pool.map(add_item, items))

    await asyncio.to_thread(add_all)  # the log service runs on this loop: keep it free
    try:
        assert sorted(contents(await session.get_items())) == sorted(i["content"] for i in items)
    finally:
        await session.close()


async def test_concurrent_pops_hide_distinct_items(log_url: str) -> None:
    a = ConvlogSession.from_url("pop_race", url=log_url)
    b = ConvlogSession.from_url("pop_race", url=log_url)
    try:
        await a.add_items([{"role": "user", "content": f"m{i}"} for i in range(10)])

        async def pops(session: ConvlogSession) -> list[Any]:
            return [(await session.pop_item() or {}).get("content") for _ in range(5)]

        got_a, got_b = await asyncio.gather(pops(a), pops(b))
        assert sorted(got_a + got_b) == sorted(f"m{i}" for i in range(10))  # each item once
        assert await a.get_items() == []
    finally:
        await a.close()
        await b.close()


class _ReplyLost(LogClient):
    """Fault injection at the client seam: the first append commits, then its reply is lost."""

    lost = False

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        reply = await super().append(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise UnavailableError("no reply on convlog.append (injected: reply lost)")
        return reply


async def test_retried_add_items_after_unknown_outcome_does_not_double(
    log_url: str, log_client: LogClient
) -> None:
    nc_client = await LogClient.connect(log_url)
    flaky = _ReplyLost(nc_client.nc)
    session = ConvlogSession("retry_test", client=flaky)
    items = [{"role": "user", "content": "Refund please"}, {"role": "assistant", "content": "Done"}]
    try:
        with pytest.raises(UnavailableError):
            await session.add_items(items)  # committed, but the caller cannot know
        await session.add_items(items)  # the caller retries the same batch
        assert await session.get_items() == items
        raw = await log_client.items("retry_test")
        assert [e.data for e in raw] == items  # written once
        # A later, successful call with equal content is a new write (a user may repeat themselves).
        await session.add_items(items[:1])
        assert contents(await session.get_items()) == ["Refund please", "Done", "Refund please"]
    finally:
        await nc_client.close()


@pytest.mark.parametrize("follow", [True, False])
async def test_pop_item_again_after_an_unknown_outcome_hides_one_item(
    log_url: str, log_client: LogClient, follow: bool
) -> None:
    sid = f"pop_retry_{follow}"
    await log_client.append(sid, [{"agent": "user", "data": {"role": "user", "content": c}}
                                  for c in ["one", "two", "three"]])
    nc_client = await LogClient.connect(log_url)
    session = ConvlogSession(sid, client=_ReplyLost(nc_client.nc), follow=follow)
    try:
        with pytest.raises(UnavailableError):
            await session.pop_item()  # the retract committed, but the caller cannot know
        # The caller pops again: that is the pop that ended unknown, not one more.
        assert await session.pop_item() == {"role": "user", "content": "three"}
        assert contents(await session.get_items()) == ["one", "two"]
        raw = await log_client.items(sid)
        assert [e.kind for e in raw] == ["item", "item", "item", "retract"]  # one retract
        assert await session.pop_item() == {"role": "user", "content": "two"}  # then pops go on
        assert contents(await session.get_items()) == ["one"]
        # A pop that ended unknown, then an add: the next pop is a new one (it pops the add).
        session.client.lost = False  # type: ignore[union-attr]
        with pytest.raises(UnavailableError):
            await session.pop_item()
        await session.add_items([{"role": "user", "content": "four"}])
        assert await session.pop_item() == {"role": "user", "content": "four"}
        assert await session.get_items() == []
    finally:
        await session.close()
        await nc_client.close()


async def test_a_retry_after_an_unknown_outcome_dedupes_whoever_is_running_now(
    log_url: str, log_client: LogClient
) -> None:
    nc_client = await LogClient.connect(log_url)
    session = ConvlogSession("retry_author", client=_ReplyLost(nc_client.nc))
    items = [{"role": "user", "content": "Refund please"}, {"role": "assistant", "content": "Refunded"}]
    run = RunContextWrapper(context=None)
    session.set_current_agent("Billing", context=run)  # what hooks=session.hooks() does
    try:
        with pytest.raises(UnavailableError):
            await session.add_items(items, wrapper=run)  # committed, but the caller cannot know
        # The app retries the same batch outside that run: no agent is known now.
        await session.add_items(items)
        raw = await log_client.items("retry_author")
        assert [(e.agent, e.data) for e in raw] == [("user", items[0]), ("Billing", items[1])]  # once
    finally:
        await session.close()
        await nc_client.close()


async def test_concurrent_equal_add_items_are_two_writes_not_a_retry(
    log_url: str, log_client: LogClient
) -> None:
    # Only a call that ended without a known outcome hands its key to an equal
    # batch; two calls in flight at once with equal items both land, and a
    # retry pending from a failed call is used once.
    nc_client = await LogClient.connect(log_url)
    flaky = _ReplyLost(nc_client.nc)
    session = ConvlogSession("equal_twice", client=flaky)
    same = [{"role": "user", "content": "yes"}]
    try:
        with pytest.raises(UnavailableError):
            await session.add_items([{"role": "user", "content": "first"}])
        await asyncio.gather(session.add_items(same), session.add_items(same))
        assert contents(await session.get_items()) == ["first", "yes", "yes"]
        await session.add_items([{"role": "user", "content": "first"}])  # the retry: a duplicate
        await session.add_items([{"role": "user", "content": "first"}])  # after it: a new write
        raw = await log_client.items("equal_twice")
        assert [e.data["content"] for e in raw] == ["first", "yes", "yes", "first"]
    finally:
        await nc_client.close()


async def test_a_pending_retry_key_is_taken_by_one_of_two_concurrent_equal_calls(
    log_url: str, log_client: LogClient
) -> None:
    # While a key waits after an unknown outcome, two equal calls at once: one is the
    # retry (a duplicate), the other a new write. Both took the key, and landed as one.
    nc_client = await LogClient.connect(log_url)
    session = ConvlogSession("retry_shared", client=_ReplyLost(nc_client.nc))
    same = [{"role": "user", "content": "yes"}]
    try:
        with pytest.raises(UnavailableError):
            await session.add_items(same)  # committed, but the caller cannot know
        await asyncio.gather(session.add_items(same), session.add_items(same))
        raw = await log_client.items("retry_shared")
        assert [e.data["content"] for e in raw] == ["yes", "yes"]
    finally:
        await nc_client.close()


async def test_cancelled_add_items_finishes_the_append_then_raises(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    session = new_session("cancel_test")
    task = asyncio.create_task(session.add_items([{"role": "user", "content": "once"}]))
    await asyncio.sleep(0)  # one step: the append task is started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The started append was not abandoned half-way: it is there, once.
    assert contents(await session.get_items()) == ["once"]
    assert len(await log_client.items("cancel_test")) == 1


async def test_a_cancelled_queued_add_items_lands_and_raises_only_after(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    # Two session objects on one client and id share one append queue: the
    # second call waits behind the first, is cancelled there, and still goes
    # out; its caller hears of the cancellation once the append is answered.
    a, b = new_session("queued_cancel"), new_session("queued_cancel")
    first = asyncio.create_task(a.add_items([{"role": "user", "content": "one"}]))
    await asyncio.sleep(0)  # the first is in flight, sent alone
    second = asyncio.create_task(b.add_items([{"role": "user", "content": "two"}]))
    await asyncio.sleep(0)  # the second is queued behind it
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert first.done()  # the queued append went out after the first was answered
    await first
    assert [e.data["content"] for e in await log_client.items("queued_cancel")] == ["one", "two"]
    assert contents(await a.get_items()) == ["one", "two"]


async def test_close_is_idempotent_and_closed_operations_raise(
    log_url: str, log_client: LogClient
) -> None:
    owned = ConvlogSession.from_url("closing", url=log_url)
    assert await owned.ping() is True
    own_client = owned.client
    assert own_client is not None
    await owned.close()
    await owned.close()
    assert own_client.nc.is_closed  # an owned connection is closed with the session
    for call in (owned.get_items(), owned.add_items([{"role": "user", "content": "x"}]),
                 owned.pop_item(), owned.clear_session(), owned.ping()):
        with pytest.raises(RuntimeError, match="closed"):
            await call
    injected = ConvlogSession("closing", client=log_client)
    await injected.close()
    assert not log_client.nc.is_closed  # someone else's client is left open
    assert await log_client.last_order("closing") == 0


async def test_from_url_without_a_server_fails_in_bounded_time() -> None:
    session = ConvlogSession.from_url("nobody", url=f"nats://127.0.0.1:{free_port()}",
                                      connect_deadline=1.0)
    async with asyncio.timeout(10):
        with pytest.raises(UnavailableError, match="no NATS server answered"):
            await session.get_items()
    await session.close()


def _open_fds() -> int:
    import gc
    import os

    gc.collect()
    return len(os.listdir("/proc/self/fd"))


async def test_a_thread_whose_asyncio_run_ends_leaves_no_connection_open(log_url: str) -> None:
    # asyncio.run in a thread (the SDK's own threads test, above) closes that thread's
    # loop when it returns.  The session's connection on it was never closed: a closed
    # loop cannot run a close, so close() skipped it, and its socket stayed open in
    # this process and on the server (with the copy's consumer following it), one more
    # per thread run.
    session = ConvlogSession.from_url("threads_closing", url=log_url)
    await session.add_items([{"role": "user", "content": "first"}])  # this loop's connection
    before = _open_fds()

    async def use() -> None:
        await session.get_items()
        await session.add_items([{"role": "user", "content": "from a thread"}])

    try:
        for _ in range(4):
            await asyncio.to_thread(asyncio.run, use())
        assert _open_fds() - before < 2  # each run's connection went with its loop
        assert contents(await session.get_items()) == ["first"] + ["from a thread"] * 4
    finally:
        await session.close()


async def test_a_loop_whose_tasks_were_all_cancelled_gets_a_new_connection(log_url: str) -> None:
    # An app that cancels every task left on a loop it goes on using (a shutdown
    # sweep, as asyncio.run does) ends the session's connection there too; the next
    # call on that loop must connect again, not use the closed connection for good.
    session = ConvlogSession.from_url("swept_loop", url=log_url)

    def sweep_then_use() -> list[str]:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(session.add_items([{"role": "user", "content": "before"}]))
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(session.add_items([{"role": "user", "content": "after"}]))
            got = loop.run_until_complete(session.get_items())
            loop.run_until_complete(session.close())
            return contents(got)
        finally:
            loop.close()

    assert await asyncio.to_thread(sweep_then_use) == ["before", "after"]
