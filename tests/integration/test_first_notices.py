"""The notices on a handoff turn's path: a session's first notice carries its routing
entry (the worker looks nothing up), and a handoff's notice leaves the log service
ahead of the commit's reply and items.

Real nats-server, the real log service (in-process, SQLite: the only writer of its
sessions) and real ``convlog worker`` processes on the fake model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats

from shared.messages import AppendItem
from shared.nats_seam import flush
from shared.routing import encode_checkpoint, entry_checkpoint, open_routing_bucket
from shared.work import Notice, decode_notice, work_subject
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import FakeOpenAI, text
from tests.support.workerstack import (
    SEED_SPEC,
    WorkerStack,
    agent_of,
    support_responder,
    terminal_items,
)


class Watch:
    """Every notice on the work subjects, and every routing look-up (a worker's read of the bucket)."""

    def __init__(self, stack: WorkerStack) -> None:
        self.stack = stack
        self.notices: list[Notice] = []
        self.lookups: list[bytes] = []

    async def start(self) -> None:
        async def on_notice(msg: Any) -> None:
            self.notices.append(decode_notice(msg.data))

        # The log service's own look-ups are not the worker's (it checks the bucket
        # after announcing a first message: services/log/notices.py, _drop_stale_entry).
        service = bytes(self.stack.service.nc._resp_sub_prefix or b"-")

        async def on_api(msg: Any) -> None:  # the bucket's stream is KV_<bucket>
            if f"KV_{self.stack.settings.subjects.routing_bucket}" in msg.subject \
                    and not msg.reply.encode().startswith(service):
                self.lookups.append(msg.subject.encode() + b" " + msg.data)

        await self.stack.nc.subscribe(f"{self.stack.settings.subjects.prefix}.work.>", cb=on_notice)
        await self.stack.nc.subscribe("$JS.API.>", cb=on_api)
        await flush(self.stack.nc)

    def entries(self, sid: str, order: int) -> list[str | None]:
        return [n.entry for n in self.notices if n.session_id == sid and n.item_order == order]

    def looked_up(self, sid: str) -> list[bytes]:
        return [x for x in self.lookups if sid.encode() in x]


async def _watched_pair(stack: WorkerStack, fake_openai: FakeOpenAI) -> Watch:
    """Triage and L1Billing workers, each answering "<agent> answers", and a watch."""
    fake_openai.responder(lambda r: text(f"{agent_of(r)} answers"))
    await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in ("Triage", "L1Billing")))
    watch = Watch(stack)
    await watch.start()
    return watch


async def test_a_first_notice_carries_the_entry_and_the_worker_looks_nothing_up(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    watch = await _watched_pair(stack, fake_openai)

    await stack.send("first-1", "hello")
    await stack.send("first-2", "what is my balance?", to="L1Billing")
    one = await stack.answered("first-1", users=1)
    two = await stack.answered("first-2", users=1)

    assert (one[-1].agent, two[-1].agent) == ("Triage", "L1Billing")
    assert watch.entries("first-1", 1) == [""]  # no `to`: the spec's entry agent
    assert watch.entries("first-2", 1) == ["L1Billing"]
    assert watch.looked_up("first-1") == [] and watch.looked_up("first-2") == []
    # Only a session's first item carries one.
    await stack.send("first-1", "again")
    await stack.answered("first-1", users=2)
    assert watch.entries("first-1", 3) == [None]


async def test_a_checkpoint_already_in_the_bucket_is_read_not_overruled(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    watch = await _watched_pair(stack, fake_openai)
    # An earlier attempt of a first message (a log service that died before committing it)
    # left L1Billing as the session's entry; a message naming Triage cannot replace it.
    kv = await open_routing_bucket(stack.nc, stack.settings.subjects)
    await kv.create("first-r", encode_checkpoint(entry_checkpoint("L1Billing")))

    await stack.send("first-r", "hello", to="Triage")
    log = await stack.answered("first-r", users=1)

    assert log[-1].agent == "L1Billing"
    entries = watch.entries("first-r", 1)  # the log service's, and Triage's forward
    assert entries and set(entries) == {None}  # the bucket decides: the worker reads it
    assert watch.looked_up("first-r")


async def test_a_handoff_notice_leaves_ahead_of_the_commits_reply_and_items(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(support_responder)
    await stack.start_workers(*(stack.worker(a, SEED_SPEC) for a in ("Triage", "L1Billing")))
    await stack.send("hand-0", "hi", to="L1Billing")  # the log service lists the agents' consumers
    await stack.answered("hand-0", users=1)
    wire: list[tuple[str, str, bytes]] = []  # one subscription: the order the server forwarded them in
    spy = await nats.connect(stack.server.url)
    try:
        async def on_any(msg: Any) -> None:
            wire.append((msg.subject, msg.reply, msg.data))

        await spy.subscribe(">", cb=on_any)
        await flush(spy)
        await stack.send("hand-1", "I was charged twice")
        log = await stack.answered("hand-1", users=1)
        handoff = next(e for e in log if e.data.get("type") == "function_call_output")
        subjects = stack.settings.subjects
        (reply_to,) = [r for s, r, d in wire if s == subjects.append("hand-1") and handoff.item_id.encode() in d]
        named = {work_subject(subjects, "L1Billing"): "notice", subjects.items("hand-1"): "item", reply_to: "reply"}

        def order() -> list[str]:
            out = [named[s] for s, _, d in wire if s in named and (s == reply_to or handoff.item_id.encode() in d)]
            assert {"notice", "reply", "item"} <= set(out), out
            return out

        seen = await assert_eventually(order, timeout=5)
        assert seen[0] == "notice", seen  # the next agent's notice, before Triage's ack and the items
    finally:
        await spy.close()


@contextlib.asynccontextmanager
async def _first_messages_racing_a_to(stack: WorkerStack, sid: str) -> AsyncIterator[Any]:
    """Send ``sid``'s first message naming L1Billing with its entry's write to the routing
    bucket held back (a slow KV: replicated, a busy server), then one naming nobody,
    committed at #1 meanwhile; the body runs while the write is still held (released,
    and the first send awaited, at its end).  Yields the routing bucket.

    The one naming nobody is appended (as an app writing its users' messages does): a
    second message on ``convlog.in`` waits for the first, to be committed behind it."""
    assert stack.service.notifier is not None
    kv = stack.service.notifier.kv
    real_create = kv.create
    writing, release = asyncio.Event(), asyncio.Event()

    async def slow_create(key: str, value: bytes, *args: Any, **kwargs: Any) -> Any:
        writing.set()
        await release.wait()  # the request still on its way
        return await real_create(key, value, *args, **kwargs)

    kv.create = slow_create
    try:
        with_to = asyncio.create_task(stack.send(sid, "bill me", to="L1Billing"))
        await asyncio.wait_for(writing.wait(), 5)
        hello = AppendItem(agent="user", data={"role": "user", "content": "hello"})
        assert (await stack.client.append(sid, [hello])).last_order == 1
        yield kv
        release.set()
        await with_to
    finally:
        release.set()
        kv.create = real_create


async def test_a_first_message_committed_while_a_to_is_being_written_carries_that_entry(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # Two first messages at once: one names L1Billing (its entry is being written to the
    # bucket, before its append), the other names nobody and is committed at #1 meanwhile.
    # The bucket will say L1Billing; the notice of #1 must not claim it holds nothing, nor
    # go out before it does (its worker would read a bucket still empty): it waits for it.
    watch = Watch(stack)
    await watch.start()
    async with _first_messages_racing_a_to(stack, "first-race") as kv:
        await asyncio.sleep(0.5)
        assert watch.entries("first-race", 1) == []  # not announced while the entry is unknown

    def first_notice() -> list[str | None]:
        entries = watch.entries("first-race", 1)
        assert entries, "no notice of #1 yet"
        return entries

    entries = await assert_eventually(first_notice, timeout=5)
    stored = await kv.get("first-race")
    assert b"L1Billing" in stored.value  # the entry the workers read
    assert entries == ["L1Billing"]  # announced once written: the worker needs no look-up


async def test_a_first_message_committed_while_a_to_is_being_written_is_answered_by_that_entry(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # Two first messages at once: "bill me" names L1Billing, whose entry is still on its
    # way to the bucket (a slow KV: replicated, a busy server) when "hello", naming nobody,
    # is committed at #1. The bucket then says L1Billing: both must be answered by it,
    # not #1 by the entry agent (read from a bucket not yet written) and #2 by L1Billing.
    await _watched_pair(stack, fake_openai)
    async with _first_messages_racing_a_to(stack, "first-race-2"):
        await asyncio.sleep(1.0)  # time for #1 to be announced and answered, were it to be
    log = await stack.answered("first-race-2", users=2)
    users = [e for e in log if e.agent == "user"]
    assert [u.data["content"] for u in users] == ["hello", "bill me"]
    assert [terminal_items(log, u)[0].agent for u in users] == ["L1Billing", "L1Billing"]
