"""The turn notices of a loaded log service go in atomic batches on the work
stream (one fsync for many), each notice stored once, none lost when a batch
is refused; over a real nats-server, with the real :class:`Notifier`."""

from __future__ import annotations

import msgspec
import nats
from nats.js.api import RetentionPolicy, StreamConfig

from services.log.notices import Notifier
from services.log.store.base import Committed
from shared.subjects import Subjects
from shared.work import (
    decode_notice,
    ensure_work_stream,
    notice_msg_id,
    work_entry_subject,
    work_stream_name,
)
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer

SUBJECTS = Subjects("convlog")
STREAM = work_stream_name(SUBJECTS)


def user_message(sid: str, order: int) -> Committed:
    env = {"session_id": sid, "item_order": order, "item_id": f"{sid}-{order}", "agent": "user", "kind": "item",
           "data": {"role": "user", "content": f"hello {order}"}, "created_at": "2026-01-01T00:00:00.000000Z",
           "hash": "0" * 64}
    return Committed(order, sid, order, msgspec.json.encode(env))


async def stored_notices(nc: nats.NATS) -> list[tuple[str, int, str]]:
    js = nc.jetstream()
    n = (await js.stream_info(STREAM)).state.messages
    out = []
    for seq in range(1, n + 1):
        m = await js.get_msg(STREAM, seq)
        notice = decode_notice(m.data)
        out.append((notice.session_id, notice.item_order, (m.headers or {})["Nats-Msg-Id"]))
    return out


async def test_the_notices_of_one_commit_are_stored_once_each_in_one_batch(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    notifier = Notifier(nc, SUBJECTS, kv=None)
    try:
        await ensure_work_stream(nc.jetstream(), SUBJECTS)
        assert (await nc.jetstream().stream_info(STREAM)).config.allow_atomic
        # Six sessions' first user messages committed together: six notices, to the entry agent.
        notifier.on_commit([user_message(f"s{i}", 1) for i in range(6)])

        async def all_published() -> None:
            assert notifier.published == 6

        await assert_eventually(all_published, timeout=10)
        assert notifier._acks.batches == 1 and notifier.failed == 0
        assert await stored_notices(nc) == [(f"s{i}", 1, notice_msg_id(f"s{i}", 1)) for i in range(6)]
        m = await nc.jetstream().get_msg(STREAM, 1)
        assert m.subject == work_entry_subject(SUBJECTS)
    finally:
        await notifier.stop()
        await nc.close()


async def test_a_refused_batch_loses_no_notice_and_stores_none_twice(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    notifier = Notifier(nc, SUBJECTS, kv=None)
    try:
        await ensure_work_stream(nc.jetstream(), SUBJECTS)
        # The reconciler (or another instance) already announced r2's message:
        # the batch holding its id is refused whole, then published notice by notice.
        await nc.jetstream().publish(work_entry_subject(SUBJECTS), b'{"session_id":"r2","item_order":1}',
                                     headers={"Nats-Msg-Id": notice_msg_id("r2", 1)})
        notifier.on_commit([user_message(f"r{i}", 1) for i in range(5)])

        async def all_published() -> None:
            assert notifier.published == 5

        await assert_eventually(all_published, timeout=10)
        assert notifier._acks.fallbacks == 1 and notifier.failed == 0
        got = await stored_notices(nc)
        assert sorted(msg_id for *_, msg_id in got) == sorted(notice_msg_id(f"r{i}", 1) for i in range(5))
    finally:
        await notifier.stop()
        await nc.close()


async def test_a_work_stream_made_before_atomic_batches_is_given_them(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=["convlog.work.>"],
                                         retention=RetentionPolicy.WORK_QUEUE, duplicate_window=30))
        await ensure_work_stream(js, SUBJECTS)
        config = (await js.stream_info(STREAM)).config
        assert config.allow_atomic
        assert (config.retention, config.duplicate_window) == (RetentionPolicy.WORK_QUEUE, 30)  # the rest kept
    finally:
        await nc.close()
