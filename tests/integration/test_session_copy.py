"""``ConvlogSession`` reads from a local copy that follows the log; what it promises.

Real nats-server, the real log service on SQLite, real OS processes for the
multi-writer case.  The promises (README, "Reads are local"):

* ``get_items`` makes no round trip while the copy is current, and another
  connection's writes arrive by delivery;
* every answer is the visible history of a prefix ``1..k`` of the log, ``k``
  never decreasing in one process: no gaps, nothing reordered;
* a process reads its own acknowledged writes;
* a missed delivery is caught within ``max_staleness``;
* concurrent ``add_items`` calls in one process share appends, each call's
  items contiguous, and a refused call fails alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig, StreamConfig

from shared import ConvlogSession, session_copy
from shared.chain import verify
from shared.client import LogClient
from shared.errors import TooLargeError
from shared.history import visible
from shared.messages import Envelope
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT


def _text(item: dict[str, Any]) -> str:
    content = item.get("content")
    return content if isinstance(content, str) else content[0]["text"]


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.fixture
async def other(log_url: str) -> AsyncIterator[LogClient]:
    """A second connection: another process, as far as the session's copy can tell."""
    client = await LogClient.connect(log_url, name="other-process")
    try:
        yield client
    finally:
        await client.close()


def prefix_views(raw: list[Envelope]) -> dict[tuple[str, ...], list[int]]:
    """Each visible history of a prefix ``raw[:k]`` -> the ``k``s that produce it."""
    out: dict[tuple[str, ...], list[int]] = {}
    for k in range(len(raw) + 1):
        view = tuple(_text(e.data) for e in visible(raw[:k]))
        out.setdefault(view, []).append(k)
    return out


def check_prefixes(views: list[list[str]], index: dict[tuple[str, ...], list[int]]) -> list[int]:
    """Every view is a prefix view and k never decreases; returns the smallest such ks."""
    ks: list[int] = []
    for view in views:
        candidates = index.get(tuple(view))
        assert candidates is not None, f"not the visible history of any prefix of the log: {view}"
        later = [k for k in candidates if k >= (ks[-1] if ks else 0)]
        assert later, f"went back in the log: {view} after k={ks[-1]}"
        ks.append(later[0])
    return ks


# -- local reads --------------------------------------------------------------------


async def test_get_items_needs_no_round_trip_and_other_writes_arrive_by_delivery(
    log_url: str, other: LogClient
) -> None:
    session = ConvlogSession.from_url("local-reads", url=log_url, max_staleness=3600)
    try:
        await session.add_items([_user(f"m{i}") for i in range(60)])
        assert [_text(i) for i in await session.get_items(limit=50)] == [f"m{i}" for i in range(10, 60)]
        nc = session.client.nc  # type: ignore[union-attr]
        sent = nc.stats["out_msgs"]
        for _ in range(200):
            assert len(await session.get_items(limit=50)) == 50
        assert nc.stats["out_msgs"] == sent  # 200 reads, not one message sent

        # Another connection appends, pops and clears: each shows up by delivery alone.
        await other.append("local-reads", [{"agent": "x", "data": _user("from other")}])

        async def sees(expected: list[str], n: int = 3) -> None:
            assert [_text(i) for i in await session.get_items(limit=n)] == expected

        await assert_eventually(lambda: sees(["m58", "m59", "from other"]), timeout=10)
        await other.append("local-reads", [{"agent": "x", "kind": "retract", "data": {"target": 60}}])
        await assert_eventually(lambda: sees(["m57", "m58", "from other"]), timeout=10)
        await other.append("local-reads", [{"agent": "x", "kind": "clear", "data": {}},
                                           {"agent": "x", "data": _user("after clear")}])
        await assert_eventually(lambda: sees(["after clear"]), timeout=10)
        assert nc.stats["out_msgs"] == sent
        assert session.copy_info()["log_reads"] == 1  # type: ignore[index] # the first seed only
    finally:
        await session.close()


async def test_limits_pops_and_clears_from_the_copy(log_url: str, log_client: LogClient) -> None:
    session = ConvlogSession.from_url("copy-ops", url=log_url)
    try:
        assert await session.pop_item() is None
        await session.clear_session()  # nothing visible: nothing written
        assert await log_client.last_order("copy-ops") == 0
        await session.add_items([_user(f"m{i}") for i in range(5)])
        assert (await session.pop_item() or {})["content"] == "m4"
        assert [_text(i) for i in await session.get_items()] == ["m0", "m1", "m2", "m3"]
        assert [_text(i) for i in await session.get_items(limit=2)] == ["m2", "m3"]
        assert await session.get_items(limit=0) == []
        items = await session.get_items(limit=-1)
        items[0]["content"] = "changed by the caller"  # fresh objects: the copy is untouched
        assert _text((await session.get_items())[0]) == "m0"
        await session.clear_session()
        assert await session.get_items() == []
        await session.add_items([_user("again")])
        assert [_text(i) for i in await session.get_items()] == ["again"]
        # The log agrees with every answer the copy gave.
        assert [_text(e.data) for e in await log_client.visible("copy-ops")] == ["again"]
    finally:
        await session.close()


async def test_reads_beyond_what_the_copy_holds_go_to_the_log(
    log_url: str, log_client: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_copy, "MAX_ITEMS", 40)  # the copy keeps at most 40 items
    await log_client.append("big", [{"agent": "x", "data": _user(f"m{i}")} for i in range(100)])
    session = ConvlogSession.from_url("big", url=log_url)
    try:
        assert [_text(i) for i in await session.get_items(limit=10)] == [f"m{i}" for i in range(90, 100)]
        assert [_text(i) for i in await session.get_items()] == [f"m{i}" for i in range(100)]
        assert [_text(i) for i in await session.get_items(limit=70)] == [f"m{i}" for i in range(30, 100)]
        assert session.copy_info()["items"] <= 40  # type: ignore[index]
    finally:
        await session.close()


# -- staleness bound ----------------------------------------------------------------


async def test_missed_deliveries_are_caught_within_max_staleness(
    log_url: str, other: LogClient
) -> None:
    session = ConvlogSession.from_url("stale", url=log_url, max_staleness=0.3)
    try:
        await session.add_items([_user("first")])
        await _sees(session, ["first"])
        info = session.copy_info()
        assert info is not None and info["following"]
        # The server silently stops delivering to the copy's consumer (paused: its
        # heartbeats go on, so nothing looks wrong from the client).
        nc = session.client.nc  # type: ignore[union-attr]
        pause = json.dumps({"pause_until": "2099-01-01T00:00:00Z"}).encode()
        reply = await nc.request(f"$JS.API.CONSUMER.PAUSE.CONVLOG_ITEMS.{info['consumer']}", pause)
        assert json.loads(reply.data).get("paused") is True, reply.data
        await other.append("stale", [{"agent": "x", "data": _user("not delivered")}])
        # Within max_staleness the copy checks its position with the log and reads the gap.
        await assert_eventually(lambda: _sees(session, ["first", "not delivered"]), timeout=5)
        assert session.copy_info()["log_reads"] > info["log_reads"]  # type: ignore[index]
    finally:
        await session.close()


async def _pause_deliveries(session: ConvlogSession) -> None:
    """The server silently stops delivering to the session copy's consumer (heartbeats go on)."""
    info = session.copy_info()
    assert info is not None and info["following"], info
    pause = json.dumps({"pause_until": "2099-01-01T00:00:00Z"}).encode()
    reply = await session.client.nc.request(  # type: ignore[union-attr]
        f"$JS.API.CONSUMER.PAUSE.CONVLOG_ITEMS.{info['consumer']}", pause)
    assert json.loads(reply.data).get("paused") is True, reply.data


async def test_clear_and_pop_on_a_copy_that_looks_empty_act_on_what_the_log_holds(
    log_url: str, log_client: LogClient, other: LogClient
) -> None:
    # A copy that has not received another process's write yet (delivery still on
    # its way, or lost and not yet caught by max_staleness) looks empty.  A read may
    # be that stale; a mutation must not be: the other write was acknowledged before
    # clear_session()/pop_item() was called, and skipping it is not eventual — the
    # clear is never written, the item is never popped.
    session = ConvlogSession("stale-edits", client=log_client, max_staleness=30)
    writer = ConvlogSession("stale-edits", client=other)
    try:
        assert await session.get_items() == []  # seeded: an empty copy, following
        await _pause_deliveries(session)
        await writer.add_items([_user("reset me")])
        await session.clear_session()
        assert await other.visible("stale-edits") == []  # the clear hid it (was: nothing written)
        await writer.add_items([_user("pop me")])
        assert await session.pop_item() == _user("pop me")  # was: None
        assert await other.visible("stale-edits") == []
        assert await session.get_items() == []
        assert [e.kind for e in await other.items("stale-edits", raw=True)] == [
            "item", "clear", "item", "retract"]
    finally:
        await session.close()
        await writer.close()


async def test_a_deleted_consumer_is_replaced_at_the_next_read(
    log_url: str, other: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_copy, "HEARTBEAT_S", 0.3)  # silent for 0.9 s: gone
    session = ConvlogSession.from_url("deleted", url=log_url, max_staleness=3600)
    try:
        await session.add_items([_user("first")])
        await _sees(session, ["first"])
        info = session.copy_info()
        assert info is not None and info["following"]
        nc = session.client.nc  # type: ignore[union-attr]
        await nc.jetstream().delete_consumer("CONVLOG_ITEMS", info["consumer"])
        await other.append("deleted", [{"agent": "x", "data": _user("second")}])
        # The server says so on the delivery subject (409 status), and its heartbeats
        # stop: the next read follows anew, on a new consumer.
        await assert_eventually(lambda: _sees(session, ["first", "second"]), timeout=10)
        after = session.copy_info()
        assert after is not None and after["following"] and after["consumer"] != info["consumer"]
        reads = after["log_reads"]
        await other.append("deleted", [{"agent": "x", "data": _user("third")}])
        await assert_eventually(lambda: _sees(session, ["first", "second", "third"]), timeout=10)
        assert session.copy_info()["log_reads"] == reads  # type: ignore[index] # delivered
    finally:
        await session.close()


async def _sees(session: ConvlogSession, expected: list[str]) -> None:
    assert [_text(i) for i in await session.get_items()] == expected


async def test_an_unread_copy_stops_following_and_reseeds_on_the_next_read(
    log_url: str, other: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_copy, "SEED_WINDOW", 10)
    session = ConvlogSession.from_url("pause", url=log_url)
    try:
        await session.get_items()
        for i in range(15):  # 15 deliveries nobody reads
            await other.append("pause", [{"agent": "x", "data": _user(f"m{i}")}])

        def paused() -> None:
            info = session.copy_info()
            assert info is not None and info["pauses"] == 1 and not info["following"], info

        await assert_eventually(paused, timeout=10)
        await _sees(session, [f"m{i}" for i in range(15)])
        assert session.copy_info()["following"]  # type: ignore[index]
    finally:
        await session.close()


async def test_a_copy_not_read_for_a_while_stops_following(
    log_url: str, other: LogClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_copy, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(session_copy, "IDLE_S", 0.5)
    session = ConvlogSession.from_url("idle", url=log_url)
    try:
        await _sees(session, [])

        def paused() -> None:
            info = session.copy_info()
            assert info is not None and info["pauses"] == 1 and info["consumer"] is None, info

        await assert_eventually(paused, timeout=10)  # heartbeats only, no reads
        await other.append("idle", [{"agent": "x", "data": _user("later")}])
        await _sees(session, ["later"])  # the next read seeds again and follows again
        assert session.copy_info()["following"]  # type: ignore[index]
    finally:
        await session.close()


# -- one process, many session objects -----------------------------------------------


async def test_from_url_sessions_share_a_connection_until_the_last_closes(log_url: str) -> None:
    a = ConvlogSession.from_url("pool-a", url=log_url)
    b = ConvlogSession.from_url("pool-b", url=log_url)
    await a.add_items([_user("a")])
    await b.add_items([_user("b")])
    assert a.client is b.client
    client = a.client
    assert client is not None
    await a.close()
    assert not client.nc.is_closed
    assert [_text(i) for i in await b.get_items()] == ["b"]
    await b.close()
    assert client.nc.is_closed


async def test_concurrent_add_items_share_appends_and_a_refused_call_fails_alone(
    log_url: str, log_client: LogClient
) -> None:
    sessions = [ConvlogSession.from_url("combined", url=log_url) for _ in range(8)]
    try:
        await sessions[0].get_items()
        nc = sessions[0].client.nc  # type: ignore[union-attr]
        sent = nc.stats["out_msgs"]

        async def writer(w: int) -> None:
            for n in range(10):
                await sessions[w].add_items([_user(f"w{w}-{n}-a"), _user(f"w{w}-{n}-b")])

        await asyncio.gather(*(writer(w) for w in range(8)))
        assert nc.stats["out_msgs"] - sent < 80  # fewer appends than calls
        raw = await log_client.items("combined")
        assert verify(raw, session_id="combined") is None
        texts = [_text(e.data) for e in raw]
        assert sorted(texts) == sorted(f"w{w}-{n}-{x}" for w in range(8) for n in range(10) for x in "ab")
        for i, t in enumerate(texts):  # each call's two items are adjacent, a before b
            if t.endswith("-a"):
                assert texts[i + 1] == t[:-1] + "b"
        for w in range(8):  # each writer's calls in the order it made them
            assert [t for t in texts if t.startswith(f"w{w}-")] == [
                f"w{w}-{n}-{x}" for n in range(10) for x in "ab"]

        # A call the log refuses, queued behind others: it fails, they are written.
        calls = [sessions[i].add_items([_user(f"late{i}")]) for i in range(4)]
        calls.insert(2, sessions[5].add_items([_user("y" * 300_000)]))  # over the item limit
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["NoneType"] * 2 + ["TooLargeError"] + ["NoneType"] * 2
        assert isinstance(results[2], TooLargeError)
        tail = [_text(e.data) for e in (await log_client.items("combined"))[160:]]
        assert sorted(tail) == [f"late{i}" for i in range(4)]
        for s in sessions:  # and every session object reads what its process wrote
            assert sorted(_text(i) for i in await s.get_items(limit=4)) == [f"late{i}" for i in range(4)]
    finally:
        for s in sessions:
            await s.close()


# -- several processes ---------------------------------------------------------------


async def _spawn(url: str, sid: str, tag: str, role: str, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.session_rw", "--url", url, "--sid", sid,
        "--tag", tag, "--role", role, *extra, cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )


async def _line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line, f"process exited with {await proc.wait()}"
    return json.loads(line)


async def _say(proc: asyncio.subprocess.Process, text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text.encode() + b"\n")
    await proc.stdin.drain()


async def test_several_processes_see_gap_free_ordered_prefixes_and_converge(
    log_url: str, log_client: LogClient, other: LogClient
) -> None:
    sid = "multi"
    # Writers p1, p2 in their own processes, p3 in this one (own connection); reader r1.
    writers = [
        await _spawn(log_url, sid, "p1", "writer", "--count", "20", "--pop-every", "4"),
        await _spawn(log_url, sid, "p2", "writer", "--count", "20", "--clear-at", "10"),
    ]
    reader = await _spawn(log_url, sid, "r1", "reader")
    procs = [*writers, reader]
    here = ConvlogSession(sid, client=other)
    try:
        # 1. Every process has read once (its copy follows the session); then all start at once.
        for proc in procs:
            assert "ready" in await _line(proc, 120)
        await here.get_items()
        for proc in procs:
            await _say(proc, "go")
        p3: list[list[str]] = []
        for n in range(20):
            await here.add_items([_user(f"p3-{n}"), {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": f"p3-{n}-r", "annotations": []}]}])
            p3.append([_text(i) for i in await here.get_items()])
        results: dict[str, Any] = {"p3": {"after_add": p3}}
        for proc in writers:
            out = await _line(proc, 120)
            results[out["tag"]] = out
        raw = await log_client.items(sid)
        final = [_text(e.data) for e in visible(raw)]
        await _say(reader, "stop " + json.dumps(final))
        results["r1"] = await _line(reader, 60)

        # 2. The log: contiguous, chain intact; every pair once, adjacent, in its writer's order.
        assert verify(raw, session_id=sid) is None
        items = [_text(e.data) for e in raw if e.kind == "item"]
        for tag in ("p1", "p2", "p3"):
            mine = [t for t in items if t.startswith(f"{tag}-")]
            assert mine == [f"{tag}-{n}{r}" for n in range(20) for r in ("", "-r")]
        kinds = [e.kind for e in raw]
        popped = [t for t in results["p1"]["popped"] if t is not None]  # None: nothing visible
        assert kinds.count("clear") == 1 and kinds.count("retract") == len(popped) > 0
        hidden = {e.data["target"] for e in raw if e.kind == "retract"}
        assert sorted(popped) == sorted(_text(raw[t - 1].data) for t in hidden)

        # 3. Every view any process saw is the visible history of a prefix, never going back.
        index = prefix_views(raw)
        order = {_text(e.data): e.item_order for e in raw if e.kind == "item"}
        for tag in ("p1", "p2", "p3"):
            check_prefixes(results[tag]["after_add"], index)
            for n, view in enumerate(results[tag]["after_add"]):
                # 4. ... and what a writer read after add_items includes the pair it wrote.
                assert max(index[tuple(view)]) >= order[f"{tag}-{n}-r"]
        check_prefixes(results["r1"]["views"], index)
        # 5. The reader converged to the final history.
        assert results["r1"]["converged"], results["r1"]["views"][-1]
        assert results["r1"]["views"][-1] == final
    finally:
        await here.close()
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


# -- no consumer allowed ---------------------------------------------------------------


async def test_where_no_consumer_can_be_made_every_read_goes_to_the_log(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from services.log.service import LogService
    from shared.config import load_settings

    caplog.set_level(logging.DEBUG, logger="convlog.session_copy")  # WARNING once per process
    # The items stream allows one consumer and someone else holds it.
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="CONVLOG_ITEMS", subjects=["convlog.items.>"],
                                     max_consumers=1))
    await js.add_consumer("CONVLOG_ITEMS", ConsumerConfig(durable_name="someone-else"))
    await nc.close()
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "c.db")}, {})
    async with LogService(settings), await LogClient.connect(nats_server.url) as other:
        session = ConvlogSession.from_url("no-consumer", url=nats_server.url)
        try:
            await session.add_items([_user("one")])
            await _sees(session, ["one"])
            info = session.copy_info()
            assert info is not None and not info["following"] and info["consumer"] is None
            assert "cannot follow the items stream" in caplog.text
            assert "maximum consumers" in caplog.text
            # Reads still answer with every acknowledged write: from the log.
            await other.append("no-consumer", [{"agent": "x", "data": _user("two")}])
            await _sees(session, ["one", "two"])
            assert (await session.pop_item() or {})["content"] == "two"
            await _sees(session, ["one"])
        finally:
            await session.close()
