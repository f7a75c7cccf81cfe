"""The log service over a real nats-server: append, read, sessions, user messages,
``convlog.items.<sid>``, followers, the CLI, and a graceful SIGTERM of ``convlog
log`` under load.  Errors are in ``test_log_service_errors.py``, discovery
(``$SRV``, the nats-py seams) in ``test_log_service_discovery.py``.

Every test on the ``env`` fixture (:mod:`tests.support.logenv`) runs on both
stores (SQLite with its outbox, JetStream whose items stream sources the log
streams): the contract is the same.

The service runs in-process (so tests can look at its store and stop it) except
where the process boundary is the point (SIGTERM). ``convlog.items.<sid>`` is
only ever read through JetStream consumers, never a core subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
from pathlib import Path

import msgspec
import nats
import pytest

from services.worker.routing import Routing
from services.worker.spec import load_spec
from shared.chain import verify
from shared.client import LogClient
from shared.errors import (
    ERROR_CODE_HEADER,
    ConvlogError,
    TooLargeError,
)
from shared.history import visible
from shared.messages import Envelope, ReadReply
from tests.support.eventually import assert_eventually
from tests.support.logenv import (
    MAX_PAYLOAD,
    SEAM_IDS,
    SEAMS,
    STREAM,
    Env,
    both_seams,
    raw_log,
    settled_state,
    user,
    wire,
)
from tests.support.natsd import NatsServer
from tests.support.procs import (
    REPO_ROOT,
    Proc,
    child_pids,
    kill_left,
    pid_alive,
    python_module,
    run_cli,
    service_env,
)

# -- append / read -----------------------------------------------------------------


@both_seams
async def test_append_and_read_forward_tail_and_raw(env: Env) -> None:
    headers, rep = await wire(env.nc, "convlog.append.s1", {"items": [
        user("Hi, I was charged twice 💳", item_id="u-1"),
        {"agent": "Triage", "data": {"type": "function_call", "call_id": "c1",
                                     "name": "transfer_to_billing", "arguments": "{}"}},
        {"agent": "Triage", "data": {"type": "function_call_output", "call_id": "c1",
                                     "output": '{"assistant": "L1Billing"}'}},
    ]})
    assert ERROR_CODE_HEADER not in headers
    assert set(rep) == {"session_id", "first_order", "last_order", "items"}
    assert (rep["session_id"], rep["first_order"], rep["last_order"]) == ("s1", 1, 3)
    assert [set(i) for i in rep["items"]] == [{"item_order", "item_id", "hash", "duplicate"}] * 3
    assert rep["items"][0]["item_id"] == "u-1"
    assert all(len(i["item_id"]) >= 32 for i in rep["items"][1:])  # assigned by the service
    _, rep2 = await wire(env.nc, "convlog.append.s1", {"items": [
        {"agent": "system", "kind": "retract", "data": {"target": 2}},
        {"agent": "L1Billing", "data": {"type": "message", "role": "assistant",
                                        "content": [{"type": "output_text", "text": "Refunded."}]}},
    ], "expected_last": 3})
    assert (rep2["first_order"], rep2["last_order"]) == (4, 5)

    # Default read: visible history only.
    _, page = await wire(env.nc, "convlog.read.s1", {})
    assert set(page) == {"session_id", "items", "last_order", "more"}
    assert [e["item_order"] for e in page["items"]] == [1, 3, 5]
    assert (page["last_order"], page["more"]) == (5, False)
    # raw: every envelope, with every field, and a valid chain.
    _, page = await wire(env.nc, "convlog.read.s1", {"raw": True})
    assert [e["item_order"] for e in page["items"]] == [1, 2, 3, 4, 5]
    assert set(page["items"][0]) == {"session_id", "item_order", "item_id", "agent", "kind",
                                     "data", "created_at", "hash"}
    envs = [msgspec.convert(e, Envelope) for e in page["items"]]
    assert verify(envs, session_id="s1") is None
    assert [e.hash for e in envs] == [i["hash"] for i in rep["items"] + rep2["items"]]
    assert envs[0].data == {"role": "user", "content": "Hi, I was charged twice 💳"}
    # tail: last n visible, oldest first; raw tail includes the retract.
    _, page = await wire(env.nc, "convlog.read.s1", {"tail": 2})
    assert [e["item_order"] for e in page["items"]] == [3, 5]
    _, page = await wire(env.nc, "convlog.read.s1", {"tail": 2, "raw": True})
    assert [e["item_order"] for e in page["items"]] == [4, 5]
    assert [e.item_order for e in await env.client.tail("s1", 1)] == [5]
    # after + limit pages forward.
    _, page = await wire(env.nc, "convlog.read.s1", {"after": 1, "limit": 2, "raw": True})
    assert [e["item_order"] for e in page["items"]] == [2, 3] and page["more"] is True
    _, page = await wire(env.nc, "convlog.read.s1", {"after": 3, "limit": 2, "raw": True})
    assert [e["item_order"] for e in page["items"]] == [4, 5] and page["more"] is False
    # An unknown session reads as empty.
    _, page = await wire(env.nc, "convlog.read.nobody", {})
    assert page == {"session_id": "nobody", "items": [], "last_order": 0, "more": False}
    # A retried append is answered with its original orders; the same id with
    # other content is a conflict naming the id (nobody pre-empts an item).
    _, again = await wire(env.nc, "convlog.append.s1", {"items": [user("Hi, I was charged twice 💳", item_id="u-1")]})
    assert again["items"] == [{**rep["items"][0], "duplicate": True}]
    _, hijack = await wire(env.nc, "convlog.append.s1", {"items": [user("changed", item_id="u-1")]})
    assert hijack["error"]["code"] == "conflict" and hijack["error"]["item_id"] == "u-1"
    assert (await env.client.last_order("s1")) == 5


@both_seams
async def test_read_pages_stay_under_the_max_payload(env: Env) -> None:
    for batch in range(4):
        await env.client.append("big", [user(f"{batch}.{i} " + "x" * 3000) for i in range(10)])
    pages: list[list[int]] = []
    after = 0
    while True:
        msg = await env.nc.request("convlog.read.big", json.dumps({"after": after, "raw": True}).encode())
        assert len(msg.data) <= MAX_PAYLOAD
        page = json.loads(msg.data)
        pages.append([e["item_order"] for e in page["items"]])
        if not page["more"]:
            break
        after = pages[-1][-1]
    assert len(pages) > 1
    assert [o for p in pages for o in p] == list(range(1, 41))
    assert [e.item_order for e in await env.client.items("big")] == list(range(1, 41))
    # A tail that cannot fit in one reply is refused, not truncated.
    headers, body = await wire(env.nc, "convlog.read.big", {"tail": 40})
    assert headers[ERROR_CODE_HEADER] == "413"
    assert body["error"]["code"] == "too_large" and "after/limit" in body["error"]["message"]
    with pytest.raises(TooLargeError):
        await env.client.tail("big", 40)
    assert len(await env.client.tail("big", 5)) == 5


@both_seams
async def test_iter_items_reads_ahead_and_stops_cleanly(env: Env) -> None:
    await env.client.append("ahead", [user(f"m{i}") for i in range(1, 26)])
    got = [e.item_order async for e in env.client.iter_items("ahead", page=4)]
    assert got == list(range(1, 26))
    got = [e.item_order async for e in env.client.iter_items("ahead", after=20, page=2, raw=False)]
    assert got == [21, 22, 23, 24, 25]
    # An item appended while a page is consumed is still yielded: the last
    # page was read ahead, so the end is decided by one more read.
    got = []
    async for e in env.client.iter_items("ahead", after=20, page=4):
        got.append(e.item_order)
        if e.item_order == 21:
            await env.client.append("ahead", [user("m26")])
    assert got == [21, 22, 23, 24, 25, 26]
    # Stopping after the first page drops the page read ahead without an error.
    pages = env.client.iter_items("ahead", page=3)
    assert [await anext(pages) for _ in range(3)] == [
        e for e in (await env.client.read("ahead", limit=3)).items
    ]
    await pages.aclose()
    assert (await env.client.read("ahead", after=25)).items[0].item_order == 26


@pytest.mark.parametrize("how", ["retract", "clear"])
async def test_items_not_raw_is_the_visible_history_of_one_prefix(env: Env, how: str) -> None:
    # LogClient.items(sid, raw=False) paged the visible items: each page was read as of its
    # own head, so a retract or clear landing between two pages mixed two histories (an
    # item hidden by then, or the items before a clear next to those after it).
    sid = f"visible-pages-{how}"
    for n in range(0, 40, 10):  # several pages
        await env.client.append(sid, [user(f"{i} " + "x" * 3000) for i in range(n + 1, n + 11)])
    hide = ({"agent": "system", "kind": "retract", "data": {"target": 1}} if how == "retract"
            else {"agent": "system", "kind": "clear", "data": {}})

    class HiddenAfterTheFirstPage(LogClient):
        """Another writer's retract or clear commits right after the first page is read."""

        pages = 0

        async def read(self, session_id: str, **kw: object) -> ReadReply:
            rep = await super().read(session_id, **kw)  # type: ignore[arg-type]
            self.pages += 1
            if self.pages == 1:
                await env.client.append(sid, [hide, user("after")])
            return rep

    reader = HiddenAfterTheFirstPage(env.nc, timeout=5, deadline=10)
    got = await reader.items(sid, raw=False)
    assert reader.pages > 1
    shown = [e.item_order for e in got]
    raw = await env.client.items(sid, raw=True)
    assert shown == [e.item_order for e in visible(raw)], f"not the visible history of the log: {shown}"


async def test_the_next_forward_page_is_read_ahead_and_served_only_as_a_read_now_would_give_it(env: Env) -> None:
    ahead = env.service.read_ahead
    assert ahead is not None

    async def orders(after: int, limit: int, *, raw: bool = True) -> tuple[list[int], bool, int]:
        page = await env.client.read("ra", after=after, limit=limit, raw=raw)
        return [e.item_order for e in page.items], page.more, page.last_order

    await env.client.append("ra", [user(f"m{i}") for i in range(1, 13)])
    assert await orders(0, 4) == ([1, 2, 3, 4], True, 12)
    # The pages after it were read ahead: each is what a read gives.
    assert await orders(4, 4) == ([5, 6, 7, 8], True, 12)
    assert await orders(8, 4) == ([9, 10, 11, 12], False, 12)
    assert ahead.used == 2
    # Raw and full: committed envelopes, served with the head read now.
    await orders(0, 4)
    await env.client.append("ra", [user("m13")])
    assert await orders(4, 4) == ([5, 6, 7, 8], True, 13)
    assert ahead.used == 3
    # Visible: a retract appended after the page was read ahead hides one of
    # its items, so the page is read again.
    await orders(0, 4, raw=False)
    await env.client.append("ra", [{"agent": "system", "kind": "retract", "data": {"target": 6}}])
    assert await orders(4, 4, raw=False) == ([5, 7, 8, 9], True, 14)
    # The last page, read ahead before the session grew: read again.
    assert await orders(6, 4) == ([7, 8, 9, 10], True, 14)
    await env.client.append("ra", [user("m15")])
    assert await orders(10, 4) == ([11, 12, 13, 14], True, 15)
    assert ahead.used == 3
    assert [e.item_order async for e in env.client.iter_items("ra", page=2)] == list(range(1, 16))
    assert ahead.used >= 9


@both_seams
async def test_sessions_lists_by_id_with_paging(env: Env) -> None:
    for sid, n in (("s-c", 1), ("s-a", 3), ("s-b", 2)):
        await env.client.append(sid, [user(str(i)) for i in range(n)])
    _, rep = await wire(env.nc, "convlog.sessions", {"limit": 2})
    assert set(rep) == {"sessions", "more"}
    assert [(s["session_id"], s["last_order"]) for s in rep["sessions"]] == [("s-a", 3), ("s-b", 2)]
    assert set(rep["sessions"][0]) == {"session_id", "last_order", "updated_at"}
    assert rep["more"] is True
    _, rep = await wire(env.nc, "convlog.sessions", {"after": "s-b"})
    assert [s["session_id"] for s in rep["sessions"]] == ["s-c"] and rep["more"] is False
    _, rep = await wire(env.nc, "convlog.sessions")  # an empty body is {}
    assert [s["session_id"] for s in rep["sessions"]] == ["s-a", "s-b", "s-c"]
    assert [s.session_id async for s in env.client.iter_sessions()] == ["s-a", "s-b", "s-c"]


# -- user messages ------------------------------------------------------------------


@both_seams
async def test_user_messages_with_and_without_a_reply_subject(env: Env) -> None:
    headers, ack = await wire(env.nc, "convlog.in.chat", {"content": "Hello", "item_id": "m-1"})
    assert ERROR_CODE_HEADER not in headers
    assert (ack["first_order"], ack["items"][0]["item_id"], ack["items"][0]["duplicate"]) == (1, "m-1", False)

    # A plain publish (no reply subject) is appended too.
    await env.nc.publish("convlog.in.chat", json.dumps({"content": "Are you there?"}).encode())
    await env.nc.publish("convlog.in.chat", b"{broken")  # refused, logged, nothing written

    async def appended() -> list[Envelope]:
        log = await raw_log(env, "chat")
        assert len(log) == 2, log
        return log

    log = await assert_eventually(appended, timeout=5)
    assert [(e.agent, e.kind, e.data) for e in log] == [
        ("user", "item", {"role": "user", "content": "Hello"}),
        ("user", "item", {"role": "user", "content": "Are you there?"}),
    ]
    # The same item_id again: not written twice.
    _, dup = await wire(env.nc, "convlog.in.chat", {"content": "Hello", "item_id": "m-1"})
    assert dup["items"][0] == {**ack["items"][0], "duplicate": True}
    ack2 = await env.client.send("chat", "third")
    assert ack2.first_order == 3

    # `to` picks the entry agent of a new session (routing metadata, outside the log).
    _, ack = await wire(env.nc, "convlog.in.fresh", {"content": "billing please", "to": "L1Billing"})
    assert ack["first_order"] == 1
    kv = await env.nc.jetstream().key_value(env.settings.subjects.routing_bucket)
    entry = json.loads((await kv.get("fresh")).value)
    assert entry == {"active": "L1Billing", "order": 0, "entry": "L1Billing"}
    # The worker's reader decodes what the log service wrote: the turn goes to L1Billing.
    routing = Routing(kv, env.client, load_spec(REPO_ROOT / "deploy" / "agents.toml"))
    cp = await routing.checkpoint("fresh")
    assert cp is not None and (cp.active, cp.order, cp.entry) == ("L1Billing", 0, "L1Billing")
    assert await routing.active_agent("fresh", 1) == "L1Billing"
    assert await routing.active_agent("chat", 1) == "Triage"  # no `to`: the spec's entry
    assert [e.data for e in await raw_log(env, "fresh")] == [{"role": "user", "content": "billing please"}]
    await settled_state(env)


# -- convlog.items.<sid> ----------------------------------------------------------


@both_seams
async def test_items_subject_carries_every_commit_in_order_with_msg_id(env: Env) -> None:
    js = env.nc.jetstream()
    sub = await js.subscribe("convlog.items.feed", ordered_consumer=True)
    other = await js.subscribe("convlog.items.other", ordered_consumer=True)
    try:
        await env.client.append("feed", [user("1"), user("2")])
        await asyncio.gather(*(env.client.append("feed", [user(f"c{i}")]) for i in range(10)),
                             *(env.client.append("other", [user(f"o{i}")]) for i in range(5)))
        await env.client.append("feed", [{"agent": "system", "kind": "retract", "data": {"target": 1}}])
        await env.client.append("feed", [{"agent": "system", "kind": "clear"}, user("after clear")])
        dup = await env.client.append("feed", [user("1", item_id="fixed")])
        await env.client.append("feed", [user("1", item_id="fixed")])  # duplicate: not republished
        assert dup.last_order == 16

        log = await raw_log(env, "feed")
        assert [e.item_order for e in log] == list(range(1, 17))
        received: list[Envelope] = []
        for expected in log:
            msg = await sub.next_msg(timeout=5)
            assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == f"feed:{expected.item_order}"
            env_ = msgspec.json.decode(msg.data, type=Envelope)
            assert env_ == expected
            received.append(env_)
        assert verify(received, session_id="feed") is None
        other_orders = [msgspec.json.decode((await other.next_msg(timeout=5)).data, type=Envelope).item_order
                        for _ in range(5)]
        assert other_orders == [1, 2, 3, 4, 5]
        _, published = await settled_state(env)
        assert published == 16 + 5
    finally:
        await sub.unsubscribe()
        await other.unsubscribe()



# -- followers ---------------------------------------------------------------------


@both_seams
async def test_follow_yields_from_a_given_order_without_gaps_or_repeats(env: Env) -> None:
    for i in range(10):
        await env.client.append("f", [user(f"pre {i}")])
    follower = LogClient(env.nc, timeout=2, deadline=10)

    async def follow_until(after: int, last: int, got: list[Envelope]) -> list[Envelope]:
        async with contextlib.aclosing(follower.follow("f", after=after, idle_check=0.5)) as items:
            async for e in items:
                got.append(e)
                if e.item_order >= last:
                    return got
        raise AssertionError("follow ended")

    task = asyncio.create_task(follow_until(5, 70, []))
    # Appends keep arriving while the follower catches up and goes live.
    for i in range(30):
        await env.client.append("f", [user(f"live {i}")])
    await asyncio.gather(*(env.client.append("f", [user(f"burst {i}a"), user(f"burst {i}b")])
                           for i in range(15)))
    got = await asyncio.wait_for(task, 20)
    assert [e.item_order for e in got] == list(range(6, 71))
    log = await raw_log(env, "f")
    assert got == log[5:70]

    # A late follower from 0 gets the history, then what is appended next.
    late_got: list[Envelope] = []
    late = asyncio.create_task(follow_until(0, 72, late_got))

    async def history_delivered() -> None:
        assert len(late_got) == 70
    await assert_eventually(history_delivered, timeout=10)
    await env.client.append("f", [user("live again"), user("the end")])
    got = await asyncio.wait_for(late, 20)
    assert [e.item_order for e in got] == list(range(1, 73))
    assert got == await raw_log(env, "f")


@pytest.mark.parametrize("store_kind", ["sqlite"])  # the JetStream store has no outbox to lag
async def test_follow_takes_from_the_log_what_the_items_stream_never_delivers(env: Env) -> None:
    # A consumer that goes quiet while the log grows (an outbox behind, a
    # consumer stalled: nats-py #504/#510) must not stall the follower: its
    # idle check sees the log ahead and fills the gap from the log.
    await env.client.append("quiet", [user("one"), user("two")])
    got: list[Envelope] = []

    async def consume() -> None:
        async for e in env.client.follow("quiet", idle_check=0.3):
            got.append(e)

    task = asyncio.create_task(consume())
    try:
        async def first_two() -> None:
            assert [e.item_order for e in got] == [1, 2]
        await assert_eventually(first_two, timeout=10)
        assert env.service.outbox is not None
        await env.service.outbox.stop()  # commits go on, nothing reaches convlog.items.quiet
        for i in range(3):
            await env.client.append("quiet", [user(f"unpublished {i}")])
        assert (await env.nc.jetstream().stream_info(STREAM)).state.messages == 2

        async def all_five() -> None:
            assert [e.item_order for e in got] == [1, 2, 3, 4, 5]
        await assert_eventually(all_five, timeout=10)
        assert got == await raw_log(env, "quiet")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the CLI -------------------------------------------------------------------------


def cli_env(tmp: Path) -> dict[str, str]:
    return service_env(tmp / "cli-data")


async def convlog(tmp: Path, *args: str) -> tuple[int, str, str]:
    """Run ``python -m services.cli.main ARGS`` without blocking the event loop."""
    return await run_cli(*args, env=cli_env(tmp))


async def test_cli_replay_verify_sessions_and_not_found(env: Env) -> None:
    await env.client.append("audit-1", [user("Hello 👋"), user("second")])
    await env.client.append("audit-1", [{"agent": "system", "kind": "retract", "data": {"target": 1}}])
    await env.client.append("audit-1", [{"agent": "Triage", "data": {
        "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]}}])
    await env.client.append("audit-2", [user("other")])
    url = env.server.url
    log = await raw_log(env, "audit-1")

    rc, out, err = await convlog(env.tmp, "replay", "audit-1", "--verify", "--nats-url", url)
    assert rc == 0, err
    assert "verified" in err and "4 items" in err
    lines = out.splitlines()
    assert len(lines) == 4 and "Hello 👋" in lines[0] and "Triage" in lines[3] and "Hi!" in lines[3]

    rc, out, err = await convlog(env.tmp, "replay", "audit-1", "--format", "jsonl", "--nats-url", url)
    assert rc == 0, err
    assert [msgspec.json.decode(line, type=Envelope) for line in out.splitlines()] == log
    export = env.tmp / "audit-1.jsonl"
    export.write_text(out)
    rc, _, err = await convlog(env.tmp, "replay", "audit-1", "--file", str(export), "--verify", "--quiet")
    assert rc == 0 and "verified" in err, err

    rc, out, err = await convlog(env.tmp, "sessions", "--nats-url", url)
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("audit-1", "4"), ("audit-2", "1")]

    # not_found: a session with no items, and a database that does not exist.
    rc, _, err = await convlog(env.tmp, "replay", "never-seen", "--nats-url", url)
    assert rc == 2 and "not_found" in err, err
    rc, _, err = await convlog(env.tmp, "replay", "audit-1", "--db", str(env.tmp / "missing.db"))
    assert rc == 2 and "not_found" in err, err
    rc, _, err = await convlog(env.tmp, "replay", "a.b", "--nats-url", url)
    assert rc == 2 and "invalid_session_id" in err, err

    if env.settings.store != "sqlite":
        return
    # --db reads the file with no service running.
    await env.service.shutdown()
    rc, out, err = await convlog(env.tmp, "replay", "audit-1", "--db", str(env.db), "--verify",
                                 "--format", "jsonl")
    assert rc == 0 and "verified" in err, err
    assert [msgspec.json.decode(line, type=Envelope) for line in out.splitlines()] == log


# -- SIGTERM under load --------------------------------------------------------------


@pytest.mark.parametrize("mode", SEAMS, ids=SEAM_IDS)
async def test_sigterm_drains_and_exits_zero_with_no_acked_item_lost(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    db = tmp_path / "log.db"
    proc = python_module(
        "services.cli.main", "log", "--nats-url", nats_server.url, "--db", str(db),
        log_dir=tmp_path, env={**cli_env(tmp_path), "CONVLOG_NATS_SEAM": mode},
    )
    acked: dict[str, tuple[str, int]] = {}
    stop = asyncio.Event()
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1)
    client = LogClient(nc, timeout=1.0, deadline=2.0)

    async def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            iid = f"w{w}-{n}"
            try:
                rep = await client.append(f"load-{w % 4}", [user(iid, item_id=iid)])
            except ConvlogError:
                return  # the service is gone: the outcome of this last one is unknown
            acked[iid] = (rep.session_id, rep.items[0].item_order)
            n += 1

    with proc:
        await asyncio.to_thread(proc.wait_for_line, r"log service ready", 15)
        writers = [asyncio.create_task(writer(w)) for w in range(16)]
        try:
            async def loaded() -> None:
                assert len(acked) >= 300, len(acked)
            await assert_eventually(loaded, timeout=30)
            os.kill(proc.pid, signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0, proc.output()
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*writers), 15)
            await nc.close()
    assert "log service stopped" in proc.output()
    assert "reconnecting" not in proc.output()  # its own close at shutdown is no disconnection
    assert f"nats-py seam: {'public' if mode == 'public' else 'fast'}" in proc.output()

    # Every acknowledged append is in the file at its acknowledged order.
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT session_id, item_order, envelope FROM items ORDER BY position").fetchall()
    finally:
        conn.close()
    stored = {msgspec.json.decode(e, type=Envelope).item_id: (s, o) for s, o, e in rows}
    assert len(acked) >= 300
    missing = {iid: at for iid, at in acked.items() if stored.get(iid) != at}
    assert not missing
    for s in range(4):
        sid = f"load-{s}"
        envs = [msgspec.json.decode(e, type=Envelope) for ss, _, e in rows if ss == sid]
        assert verify(envs, session_id=sid) is None

    # Draining also published every committed item.
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.state.messages == len(rows)
    finally:
        await nc.close()


# -- SIGHUP (a terminal closed) --------------------------------------------------------


def _log_with_embedded_nats(tmp_path: Path) -> Proc:
    """`convlog log` starting its own nats-server (a child) on a free port."""
    from tests.support.natsd import free_port

    env = {**cli_env(tmp_path), "CONVLOG_EMBEDDED": "true"}
    return python_module("services.cli.main", "log", "--nats-url", f"nats://127.0.0.1:{free_port()}",
                         log_dir=tmp_path, env=env)


async def _stopped_with_its_server(proc: Proc, kids: list[int]) -> None:
    """`convlog log` exits 0 having stopped, and its nats-server ``kids`` are gone."""
    assert await asyncio.to_thread(proc.wait, 20) == 0, proc.output()

    def gone() -> None:
        assert not [k for k in kids if pid_alive(k)], "the embedded nats-server outlived convlog log"

    await assert_eventually(gone, timeout=10)
    assert "log service stopped" in proc.output()


async def test_sighup_stops_convlog_log_and_its_embedded_nats_server(tmp_path: Path) -> None:
    """Python's default for SIGHUP ended `convlog log` at once: its embedded nats-server
    (a child) kept running, orphaned, and the service never drained."""
    proc = _log_with_embedded_nats(tmp_path)
    kids: list[int] = []
    with proc:
        try:
            await asyncio.to_thread(proc.wait_for_line, r"log service ready", 30)
            kids = child_pids(proc.pid)
            assert len(kids) == 1, kids  # the embedded nats-server
            os.kill(proc.pid, signal.SIGHUP)
            await _stopped_with_its_server(proc, kids)
        finally:
            kill_left(kids)


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGHUP",), ("SIGINT", "SIGINT")])
async def test_a_signal_while_the_embedded_nats_server_starts_stops_it_too(
    tmp_path: Path, signals: tuple[str, ...]
) -> None:
    """Until the log service's handlers were installed, after the embedded nats-server had
    started, SIGTERM or SIGHUP ended `convlog log` at once and a second Ctrl-C interrupted
    the start (KeyboardInterrupt): each left that nats-server running, orphaned."""
    proc = _log_with_embedded_nats(tmp_path)
    kids: list[int] = []
    with proc:
        try:
            end = asyncio.get_running_loop().time() + 30
            while not kids:  # the nats-server is forked: it is starting, not ready yet
                assert asyncio.get_running_loop().time() < end, proc.output()
                kids = child_pids(proc.pid)
            for name in signals:
                os.kill(proc.pid, getattr(signal, name))
            await _stopped_with_its_server(proc, kids)
        finally:
            kill_left(kids)
