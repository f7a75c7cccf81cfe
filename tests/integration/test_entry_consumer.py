"""The entry agent moves from A to B in the spec, and B's worker restarts first.

B's consumer exists (B ran before, not as the entry agent).  Its update to
take ``work.entry`` too is refused (A's consumer still filters it, and a
work-queue stream allows one consumer per subject).  The intake refuses to
start on a consumer that lacks a subject it needs, saying why (it kept B's
old consumer with a warning, and notices for the entry agent never reached B),
and names the consumer that still takes ``work.entry`` and what to do about it.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats
import pytest
from nats.aio.msg import Msg

from services.worker.intake import ConsumerConfigError, WorkIntake, consumer_config, consumer_name
from shared.subjects import Subjects
from shared.work import ensure_work_stream, work_entry_subject, work_stream_name
from tests.support.natsd import NatsServer


async def test_an_entry_agent_whose_consumer_cannot_take_work_entry_is_not_silently_bound(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    subjects = Subjects("convlog")
    js = nc.jetstream()
    await ensure_work_stream(js, subjects)
    stream = work_stream_name(subjects)
    # Yesterday: A was the entry agent, B was not; both consumers exist.
    await js.add_consumer(stream, consumer_config(subjects, "A", entry=True, ack_wait=30.0))
    await js.add_consumer(stream, consumer_config(subjects, "B", entry=False, ack_wait=30.0))

    stopping = asyncio.Event()
    got: list[Msg] = []
    intake = WorkIntake(nc, subjects, "B", entry=True, ack_wait=30.0, room=lambda: 8,
                        deliver=got.append, stopping=stopping)
    task = asyncio.create_task(intake.run())
    try:
        done, _ = await asyncio.wait({task, asyncio.create_task(intake.bound.wait())}, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:  # refused loudly: what a deployment needs to see
            assert isinstance(task.exception(), ConsumerConfigError)
            return
        info = await js.consumer_info(stream, consumer_name("B"))
        filters = list(info.config.filter_subjects or [info.config.filter_subject])
        assert work_entry_subject(subjects) in filters, (
            f"entry agent B is bound and serving, but its consumer filters only {filters}: "
            "notices for the entry agent never reach it"
        )
    finally:
        stopping.set()
        intake.poke()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        await intake.close()
        await nc.close()


@pytest.mark.parametrize("b_ran_before", [False, True], ids=["b-new", "b-ran-before"])
async def test_the_refusal_names_the_consumer_that_still_takes_work_entry(
    nats_server: NatsServer, b_ran_before: bool
) -> None:
    # A was the entry agent and is gone from the spec (its consumer stays, filtering
    # work.entry); B is the entry agent now.  B's worker was refused with nats-server's
    # words only ("filtered consumer not unique on workqueue stream"): exit 1 at every
    # restart, and nothing said which consumer held the subject or what to do about it.
    nc = await nats.connect(nats_server.url)
    subjects = Subjects("convlog")
    js = nc.jetstream()
    await ensure_work_stream(js, subjects)
    stream = work_stream_name(subjects)
    await js.add_consumer(stream, consumer_config(subjects, "A", entry=True, ack_wait=30.0))
    if b_ran_before:
        await js.add_consumer(stream, consumer_config(subjects, "B", entry=False, ack_wait=30.0))

    stopping = asyncio.Event()
    intake = WorkIntake(nc, subjects, "B", entry=True, ack_wait=30.0, room=lambda: 8,
                        deliver=lambda _: None, stopping=stopping)
    try:
        with pytest.raises(ConsumerConfigError) as refused:
            await asyncio.wait_for(intake.run(), 10)
        message = str(refused.value)
        assert (f"the consumer {consumer_name('A')} takes {work_entry_subject(subjects)} too" in message
                and f"nats consumer rm {stream} {consumer_name('A')}" in message), message
    finally:
        stopping.set()
        await intake.close()
        await nc.close()
