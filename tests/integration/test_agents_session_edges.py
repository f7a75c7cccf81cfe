"""ConvlogSession edge cases, each a bug once (found in a review):

* ``get_items`` that reads the log (no copy, or one that does not hold enough)
  pages raw envelopes and folds them here: visible pages read at different
  times mixed two histories when a clear landed between them;
* an ``add_items`` cancelled while its append's outcome is unknown keeps its
  retry key, so the retry with the same items does not write them twice;
* ``close()`` lets a started write reach its outcome before the connection
  goes (its reply was lost and the caller retried on a closed connection until
  the 30 s deadline);
* sixteen tasks on one shared session with a combined append whose reply is
  lost: order kept, nothing lost or doubled, every caller told;
* a mutation whose caller was cancelled still lands in this process's reads
  (its ack reaches the copy), not only once its delivery arrives;
* a read the copy cannot answer goes to the log; a later read the copy
  answers does not go back to before what that log read showed (also when
  the log read was another session object's of the connection, ``follow=False``);
* ``close()`` while the first read is creating the copy's consumer leaves no
  consumer behind (it followed, and was delivered to, on a closed session);
* a call whose item JSON cannot encode (a ``BadRequestError`` before anything
  is sent), combined with other calls in one append, fails alone;
* a call the log forbids (a user item under ``--require-signatures``),
  combined with other calls in one append, fails alone: the others failed
  with its ``ForbiddenError`` too, and were never written;
* a ``close()`` cancelled while it waited for a started write left the
  session marked closed: the next ``close()`` returned at once, and the owned
  connection and the copy's consumer were never given back;
* ``close()`` on one event loop while ``add_items`` was in flight on another
  (``Runner.run_sync`` in a thread) drained that loop's connection under the
  started append: its caller heard ``UnavailableError`` for a committed write;
* a read in flight at ``close()`` registered the session's shared state again,
  with a user never given back: later session objects of that id on the client
  shared it, and their ``close()`` left the copy's consumer following.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest

from services.log import handlers
from shared import ConvlogSession, session_copy
from shared.client import LogClient
from shared.errors import ForbiddenError, UnavailableError
from shared.history import visible


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _prefix_views(raw: list[Any]) -> list[list[str]]:
    return [[e.data["content"] for e in visible(raw[:k])] for k in range(len(raw) + 1)]


class _ClearBetweenPages(LogClient):
    """Another process clears the session (and adds one item) right after the
    first forward page of a visible read was served to this client."""

    other: LogClient
    done = False

    async def read(self, session_id: str, **kw: Any) -> Any:  # type: ignore[override]
        rep = await super().read(session_id, **kw)
        if not self.done and kw.get("after") is not None and not kw.get("raw") and rep.more:
            self.done = True
            await self.other.append(session_id, [{"agent": "x", "kind": "clear", "data": {}},
                                                 {"agent": "x", "data": _user("after clear")}])
        return rep


@pytest.mark.parametrize("follow", [True, False])
async def test_get_items_from_the_log_is_the_visible_history_of_one_prefix(
    log_url: str, log_client: LogClient, monkeypatch: pytest.MonkeyPatch, follow: bool
) -> None:
    # Pages of 10 (1 MiB replies page at 10,000 items the same way) and a copy
    # that holds 5 items, so get_items() with no limit reads the log in pages.
    monkeypatch.setattr(handlers, "DEFAULT_READ_LIMIT", 10)
    monkeypatch.setattr(session_copy, "MAX_ITEMS", 5)
    sid = "paged"
    await log_client.append(sid, [{"agent": "x", "data": _user(f"m{i}")} for i in range(30)])
    mine = await LogClient.connect(log_url)
    client = _ClearBetweenPages(mine.nc)
    client.other = log_client
    session = ConvlogSession(sid, client=client, follow=follow)
    try:
        got = [i["content"] for i in await session.get_items()]
        raw = await log_client.items(sid)
        # README: "always the visible history of one prefix 1..k of the log"
        assert got in _prefix_views(raw), got
    finally:
        await session.close()
        await mine.close()


class _ReplyLost(LogClient):
    """The first append is committed but its reply is lost (outcome unknown)."""

    lost = False

    async def append(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        reply = await super().append(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise UnavailableError("no reply on convlog.append (injected: reply lost)")
        return reply


async def test_a_cancelled_add_items_with_an_unknown_outcome_keeps_its_key(
    log_url: str, log_client: LogClient
) -> None:
    mine = await LogClient.connect(log_url)
    session = ConvlogSession("cancel_unknown", client=_ReplyLost(mine.nc))
    items = [_user("Refund please")]
    try:
        task = asyncio.create_task(session.add_items(items))
        await asyncio.sleep(0)
        task.cancel()  # the caller (a Runner) is cancelled while the append is in flight
        with pytest.raises(asyncio.CancelledError):
            await task
        # The append committed but its outcome was unknown to the caller: the
        # retry with equal items must dedupe (module docstring of call_keys).
        await session.add_items(items)
        raw = await log_client.items("cancel_unknown")
        assert [e.data["content"] for e in raw] == ["Refund please"]  # written once
    finally:
        await session.close()
        await mine.close()


def _answer_late(monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    """The log service (in this process) commits at once but answers ``delay`` s later."""
    from services.log.store.sqlite.recorder import SQLiteStore

    submit = SQLiteStore.submit

    def slow_answer(self: Any, sid: str, req: Any, done: Any, **kw: Any) -> None:
        loop = asyncio.get_running_loop()
        submit(self, sid, req, lambda r: loop.call_later(delay, done, r), **kw)

    monkeypatch.setattr(SQLiteStore, "submit", slow_answer)


async def test_close_while_add_items_is_in_flight_answers_promptly(
    log_url: str, log_client: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _answer_late(monkeypatch, 0.3)
    session = ConvlogSession.from_url("closing_inflight", url=log_url)
    await session.get_items()  # connected and following
    task = asyncio.create_task(session.add_items([_user("in flight")]))
    await asyncio.sleep(0.1)  # the append is sent (and committed); its answer is on its way
    started = time.monotonic()
    await session.close()
    await asyncio.wait({task}, timeout=5)  # (not cancelling it: that would wait all the same)
    took = time.monotonic() - started
    if not task.done():
        outcome = "no answer after 5 s"
    else:
        outcome = "ok" if task.exception() is None else type(task.exception()).__name__
    committed = await log_client.last_order("closing_inflight")
    # The started append ran to completion (it is committed); its caller must
    # hear so, not retry on the closed connection until the 30 s deadline.
    try:
        assert (committed, outcome) == (1, "ok"), (committed, outcome, round(took, 2))
    finally:
        with contextlib.suppress(BaseException):
            await task  # it ends with UnavailableError at the client's 30 s deadline


class _CombinedFailsOnce(LogClient):
    failed = False

    async def append(self, session_id: str, items: Any, **kw: Any) -> Any:  # type: ignore[override]
        items = list(items)
        if not self.failed and len(items) > 1:
            self.failed = True
            await super().append(session_id, items, **kw)  # committed, reply lost
            raise UnavailableError("injected: reply lost")
        return await super().append(session_id, items, **kw)


async def test_sixteen_tasks_one_shared_session_a_lost_combined_reply(
    log_url: str, log_client: LogClient
) -> None:
    mine = await LogClient.connect(log_url)
    client = _CombinedFailsOnce(mine.nc)
    sessions = [ConvlogSession("sixteen", client=client) for _ in range(16)]
    try:
        await sessions[0].get_items()

        async def writer(w: int) -> list[str]:
            out = []
            for n in range(5):
                item = [_user(f"w{w}-{n}")]
                for _ in range(3):
                    try:
                        await sessions[w].add_items(item)
                        out.append("ok")
                        break
                    except UnavailableError:
                        out.append("unavailable")
            return out

        async with asyncio.timeout(30):
            results = await asyncio.gather(*(writer(w) for w in range(16)))
        raw = await log_client.items("sixteen")
        texts = [e.data["content"] for e in raw]
        assert sorted(texts) == sorted(f"w{w}-{n}" for w in range(16) for n in range(5)), texts
        for w in range(16):
            assert [t for t in texts if t.startswith(f"w{w}-")] == [f"w{w}-{n}" for n in range(5)]
        assert sum(r.count("unavailable") for r in results) >= 2  # every caller of that batch told
        for s in sessions:
            assert [i["content"] for i in await s.get_items()] == texts
    finally:
        for s in sessions:
            await s.close()
        await mine.close()


async def _stop_deliveries(session: ConvlogSession) -> None:
    """The server stops delivering to the session copy's consumer (paused; its
    heartbeats go on): only what this process is told in replies reaches the copy."""
    info = session.copy_info()
    assert info is not None and info["following"], info
    pause = json.dumps({"pause_until": "2099-01-01T00:00:00Z"}).encode()
    reply = await session.client.nc.request(  # type: ignore[union-attr]
        f"$JS.API.CONSUMER.PAUSE.CONVLOG_ITEMS.{info['consumer']}", pause
    )
    assert json.loads(reply.data).get("paused") is True, reply.data


@pytest.mark.parametrize("mutation", ["add_items", "pop_item", "clear_session"])
async def test_a_cancelled_mutation_is_in_this_processs_next_read(
    log_url: str, log_client: LogClient, mutation: str
) -> None:
    sid = f"cancelled_{mutation}"
    session = ConvlogSession.from_url(sid, url=log_url, max_staleness=3600)
    try:
        await session.add_items([_user("first"), _user("second")])
        assert len(await session.get_items()) == 2
        await _stop_deliveries(session)
        call = {
            "add_items": lambda: session.add_items([_user("third")]),
            "pop_item": session.pop_item,
            "clear_session": session.clear_session,
        }[mutation]
        task = asyncio.create_task(call())
        await asyncio.sleep(0)
        task.cancel()  # the caller (a Runner) is cancelled while the write is in flight
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await log_client.last_order(sid) == 3  # the write ran to completion
        expected = [e.data["content"] for e in await log_client.visible(sid)]
        # README: read your writes; the write is this process's, acknowledged to it.
        assert [i["content"] for i in await session.get_items()] == expected
    finally:
        await session.close()


async def test_a_read_from_the_copy_does_not_go_back_behind_a_read_from_the_log(
    log_url: str, log_client: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_copy, "MAX_ITEMS", 5)  # get_items() with no limit reads the log
    sid = "log_then_copy"
    await log_client.append(sid, [{"agent": "x", "data": _user(f"m{i}")} for i in range(10)])
    session = ConvlogSession.from_url(sid, url=log_url, max_staleness=3600)
    try:
        assert [i["content"] for i in await session.get_items(limit=1)] == ["m9"]  # from the copy
        await _stop_deliveries(session)  # another process's write is not delivered (yet)
        await log_client.append(sid, [{"agent": "x", "data": _user("newest")}])
        everything = [i["content"] for i in await session.get_items()]  # from the log
        assert everything == [f"m{i}" for i in range(10)] + ["newest"]
        # README: every read is one prefix 1..k of the log, k never decreasing in the process.
        assert [i["content"] for i in await session.get_items(limit=2)] == ["m9", "newest"]
    finally:
        await session.close()


async def _copy_consumers(client: LogClient) -> list[str]:
    infos = await client.nc.jetstream().consumers_info("CONVLOG_ITEMS")
    return [i.name for i in infos if i.name.startswith("convlog-copy-")]


async def _close_while_the_copy_makes_its_consumer(session: ConvlogSession, client: LogClient) -> None:
    """Start ``session``'s first read, and close the session once its copy has subscribed
    and asks for its consumer (the caller gives up while that read is in flight)."""
    read = asyncio.create_task(session.get_items())
    for _ in range(1000):
        await asyncio.sleep(0)
        state = session._shared.get(client)
        copy = state.copy if state is not None else None
        if copy is not None and copy._sub is not None:
            break
    assert copy is not None and copy._sub is not None and copy._consumer is None
    await session.close()
    with contextlib.suppress(Exception):
        await read


async def test_close_while_the_first_read_creates_the_consumer_leaves_no_consumer(
    log_url: str, log_client: LogClient
) -> None:
    sid = "close_during_follow"
    await log_client.append(sid, [{"agent": "x", "data": _user("one")}])
    mine = await LogClient.connect(log_url)  # an app's client: close() leaves it open
    try:
        await _close_while_the_copy_makes_its_consumer(ConvlogSession(sid, client=mine), mine)
        # README: close() stops the copy's consumer; a closed session follows nothing.
        await asyncio.sleep(0.5)
        assert await _copy_consumers(log_client) == []
    finally:
        await mine.close()


async def test_a_call_with_an_item_json_cannot_encode_fails_alone_in_a_combined_append(
    log_url: str, log_client: LogClient
) -> None:
    sid = "unencodable"
    sessions = [ConvlogSession.from_url(sid, url=log_url) for _ in range(4)]
    try:
        await sessions[0].get_items()
        # The first call goes out alone; the three made meanwhile wait and go out in one append.
        results = await asyncio.gather(
            sessions[0].add_items([_user("first")]),
            sessions[1].add_items([_user("second")]),
            sessions[2].add_items([{"role": "user", "content": object()}]),  # no JSON for it
            sessions[3].add_items([_user("fourth")]),
            return_exceptions=True,
        )
        # README: "if the log refuses one of them ... the others are resent without it,
        # so each call gets its own outcome".
        assert [type(r).__name__ for r in results] == ["NoneType", "NoneType", "BadRequestError", "NoneType"]
        assert [e.data["content"] for e in await log_client.items(sid)] == ["first", "second", "fourth"]
    finally:
        for s in sessions:
            await s.close()


async def test_a_call_the_log_forbids_fails_alone_in_a_combined_append(triage_signed: LogClient) -> None:
    client = triage_signed
    sid = "forbidden_alone"
    sessions = [ConvlogSession(sid, client=client, agent="Triage") for _ in range(4)]

    def reply(text: str) -> dict[str, Any]:
        return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}

    try:
        await sessions[0].get_items()
        # The first call goes out alone; the three made meanwhile wait and go out in one
        # append, which the service refuses whole for the user item (signatures required).
        results = await asyncio.gather(
            sessions[0].add_items([reply("first")]),
            sessions[1].add_items([reply("second")]),
            sessions[2].add_items([_user("only through convlog.in")]),
            sessions[3].add_items([reply("fourth")]),
            return_exceptions=True,
        )
        # README: "if the log refuses one of them ... the others are resent without it,
        # so each call gets its own outcome".
        assert [type(r).__name__ for r in results] == ["NoneType", "NoneType", "ForbiddenError", "NoneType"]
        assert isinstance(results[2], ForbiddenError)
        texts = [e.data["content"][0]["text"] for e in await client.items(sid)]
        assert texts == ["first", "second", "fourth"]
    finally:
        for s in sessions:
            await s.close()


async def test_a_close_cancelled_while_it_waits_for_a_write_can_be_called_again(
    log_url: str, log_client: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _answer_late(monkeypatch, 0.5)
    session = ConvlogSession.from_url("close_cancelled", url=log_url)
    await session.get_items()  # connected and following
    own = session.client
    assert own is not None
    write = asyncio.create_task(session.add_items([_user("in flight")]))
    await asyncio.sleep(0.1)  # the append is sent; its answer is on its way
    closing = asyncio.create_task(session.close())  # waits for the started write ...
    await asyncio.sleep(0.1)
    closing.cancel()  # ... and its caller gives up (a shutdown timeout, say)
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    await write  # the write still reaches its outcome
    # README: close() drains an owned connection; it is idempotent, so a second
    # call finishes what the cancelled one left (the connection, the copy's consumer).
    await session.close()
    assert own.nc.is_closed
    assert await _copy_consumers(log_client) == []


async def test_a_read_from_the_copy_does_not_go_back_behind_another_session_objects_log_read(
    log_url: str, log_client: LogClient
) -> None:
    sid = "log_then_copy_two_objects"
    await log_client.append(sid, [{"agent": "x", "data": _user("first")}])
    # Two session objects of one connection: one reads its copy, one the log.
    reader = ConvlogSession.from_url(sid, url=log_url, max_staleness=3600)
    direct = ConvlogSession.from_url(sid, url=log_url, follow=False)
    try:
        assert [i["content"] for i in await reader.get_items()] == ["first"]  # from the copy
        await _stop_deliveries(reader)  # another process's write is not delivered (yet)
        await log_client.append(sid, [{"agent": "x", "data": _user("second")}])
        assert [i["content"] for i in await direct.get_items()] == ["first", "second"]  # the log
        assert direct.client is reader.client  # from_url sessions with equal options share it
        # README: every read is one prefix 1..k of the log, k never going back for a connection.
        assert [i["content"] for i in await reader.get_items()] == ["first", "second"]
    finally:
        await direct.close()
        await reader.close()


async def test_close_from_another_loop_while_add_items_is_in_flight_lets_it_finish(
    log_url: str, log_client: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``Runner.run_sync`` in a thread (its own event loop) is adding items; the app
    # closes the session from its main loop meanwhile.  close() waited only for the
    # writes of its own loop: the thread's connection was drained under the started
    # append, whose caller then heard no answer (the append had committed).
    import threading

    session = ConvlogSession.from_url("closing_other_loop", url=log_url)
    sent = threading.Event()
    outcome: list[str] = []

    async def in_thread() -> None:
        await session.get_items()  # connected and following, on this thread's loop
        _answer_late(monkeypatch, 0.3)
        task = asyncio.create_task(session.add_items([_user("in flight")]))
        await asyncio.sleep(0.1)  # the append is sent (and committed); its answer is on its way
        sent.set()
        try:
            async with asyncio.timeout(5):
                await task
            outcome.append("ok")
        except BaseException as e:  # noqa: BLE001 - the outcome is the assertion
            outcome.append(type(e).__name__)

    thread = threading.Thread(target=asyncio.run, args=(in_thread(),))
    thread.start()
    try:
        assert await asyncio.to_thread(sent.wait, 10)
        await session.close()
    finally:
        await asyncio.to_thread(thread.join, 15)
    assert (await log_client.last_order("closing_other_loop"), outcome) == (1, ["ok"])


async def test_a_read_in_flight_at_close_leaves_nothing_that_keeps_a_later_sessions_copy_following(
    log_url: str, log_client: LogClient
) -> None:
    # A get_items still running when close() gave the session's shared state back
    # (here: its copy was creating the consumer, so the read went on to the log)
    # registered that state again, with a user nobody would ever give back: every
    # later session object of that id on the client then shared it, and its close()
    # left the copy's consumer following (receiving every delivery and heartbeat).
    sid = "close_during_read"
    await log_client.append(sid, [{"agent": "x", "data": _user("one")}])
    mine = await LogClient.connect(log_url)  # an app's client: close() leaves it open
    try:
        await _close_while_the_copy_makes_its_consumer(ConvlogSession(sid, client=mine), mine)
        later = ConvlogSession(sid, client=mine)
        assert [i["content"] for i in await later.get_items()] == ["one"]
        assert len(await _copy_consumers(log_client)) == 1  # the later session follows
        await later.close()
        await asyncio.sleep(0.5)
        assert await _copy_consumers(log_client) == []  # and its close() stops that
    finally:
        await mine.close()
