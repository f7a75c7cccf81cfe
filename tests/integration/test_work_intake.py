"""The agent's work intake on a real nats-server: each notice reaches ``deliver``
once, on the fast seam as nats-py parses it (no task hop) and on the public
seam through the subscription's callback, and a message that is not a notice
is handed over too (the worker terms it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.worker.intake import WorkIntake
from shared.nats_seam import bind
from shared.subjects import Subjects
from shared.work import Notice, ensure_work_stream, publish_notice, work_subject
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer


@contextlib.asynccontextmanager
async def _running(nc: Client, subjects: Subjects) -> AsyncIterator[tuple[WorkIntake, list[Msg]]]:
    """Agent Solo's intake running on ``nc`` (room for 8), and what it delivered; then
    stopped and closed, and ``nc`` closed."""
    got: list[Msg] = []
    stopping = asyncio.Event()
    intake = WorkIntake(nc, subjects, "Solo", entry=False, ack_wait=5.0, room=lambda: 8,
                        deliver=got.append, stopping=stopping)
    task = asyncio.create_task(intake.run())
    try:
        yield intake, got
    finally:
        stopping.set()
        intake.poke()
        await asyncio.wait_for(task, 5)
        await intake.close()
        await nc.close()


@pytest.mark.parametrize("mode", ["auto", "public"])
async def test_notices_reach_deliver_once_on_either_seam(nats_server: NatsServer, mode: str) -> None:
    nc = await nats.connect(nats_server.url)
    seam = bind(nc, mode)
    subjects = Subjects("convlog")
    await ensure_work_stream(nc.jetstream(), subjects)
    async with _running(nc, subjects) as (intake, got):
        await asyncio.wait_for(intake.bound.wait(), 10)
        assert seam.delivers_inline(intake._sub) is seam.fast  # type: ignore[arg-type]
        assert seam.fast is (mode == "auto")
        for order in (1, 2, 3):
            await publish_notice(nc, work_subject(subjects, "Solo"), Notice(session_id="s", item_order=order),
                                 f"s:{order}")
        await nc.jetstream().publish(work_subject(subjects, "Solo"), b"not a notice")
        def four() -> None:
            assert len(got) == 4

        await assert_eventually(four)
        assert [m.data for m in got[3:]] == [b"not a notice"]
        for m in got:
            await m.ack()
        await asyncio.sleep(0.3)  # nothing comes twice (acked, work queue)
        assert len(got) == 4
        assert intake._outstanding == 4  # 8 of room, 4 delivered, pulls still waiting


async def test_a_consumer_an_update_cannot_change_is_kept_not_retried_forever(nats_server: NatsServer) -> None:
    """An existing consumer that differs where an update cannot change it (here its
    max_waiting, set by an operator) is refused with a 500 ("max waiting can not be
    updated"), not a 400: the intake took that for a passing failure and tried to bind
    again every second, forever, never pulling a notice."""
    from services.worker.intake import consumer_config, consumer_name
    from shared.work import work_stream_name

    nc = await nats.connect(nats_server.url)
    subjects = Subjects("convlog")
    js = nc.jetstream()
    await ensure_work_stream(js, subjects)
    config = consumer_config(subjects, "Solo", entry=False, ack_wait=5.0)
    config.max_waiting = 7
    await js.add_consumer(work_stream_name(subjects), config)
    async with _running(nc, subjects) as (intake, got):
        await asyncio.wait_for(intake.bound.wait(), 5)
        await publish_notice(nc, work_subject(subjects, "Solo"), Notice(session_id="s", item_order=1), "s:1")

        def delivered() -> None:
            assert len(got) == 1

        await assert_eventually(delivered)
        info = await js.consumer_info(work_stream_name(subjects), consumer_name("Solo"))
        assert info.config.max_waiting == 7  # the operator's, kept


async def test_a_pull_the_consumer_refuses_is_not_made_again_at_once(nats_server: NatsServer) -> None:
    """A pull over the consumer's limits (an operator lowered its max batch after the
    worker bound) is answered at once with ``409 Exceeded MaxRequestBatch``; the intake
    pulled again at once on every such answer: a busy loop of pull requests, thousands a
    second, and no notice ever delivered."""
    import json

    from services.worker.intake import consumer_name
    from shared.work import work_stream_name

    nc = await nats.connect(nats_server.url)
    subjects = Subjects("convlog")
    await ensure_work_stream(nc.jetstream(), subjects)
    stream, name = work_stream_name(subjects), consumer_name("Solo")
    pulls: list[Msg] = []

    async def seen(msg: Msg) -> None:
        pulls.append(msg)

    await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", cb=seen)
    async with _running(nc, subjects) as (intake, got):
        await asyncio.wait_for(intake.bound.wait(), 10)
        # `nats consumer edit --max-pull-batch 4`: nats-py's ConsumerConfig has no max_batch.
        info = await nc.request(f"$JS.API.CONSUMER.INFO.{stream}.{name}", b"", timeout=5)
        config = {**json.loads(info.data)["config"], "max_batch": 4}
        reply = await nc.request(f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
                                 json.dumps({"stream_name": stream, "config": config, "action": "update"}).encode(),
                                 timeout=5)
        assert json.loads(reply.data)["config"]["max_batch"] == 4, reply.data
        pulls.clear()
        intake.mark_stale("test: a reconnect")  # the next pull asks for 8 again
        await asyncio.sleep(1.5)
        assert 1 <= len(pulls) <= 5, f"{len(pulls)} pull requests in 1.5 s"
        # Bound again, the worker's own limits are back: a notice is delivered.
        await publish_notice(nc, work_subject(subjects, "Solo"), Notice(session_id="s", item_order=1), "s:1")

        def delivered() -> None:
            assert len(got) == 1

        await assert_eventually(delivered, timeout=10)
