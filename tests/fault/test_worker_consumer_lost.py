"""A worker whose consumer is gone when it next pulls binds it again.

A pull request for a consumer (or a work stream) that does not exist is
answered at once by nats-server with a "no responders" status (503), not with
the 409 "Consumer Deleted" that pulls still waiting get.  The consumer can go
while no pull of the worker waits (every notice it has room for is being
worked on): an operator deleting it or the work stream (README: "Delete it
(the log service creates it again)"), a stream recreated meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.worker.intake import consumer_name
from shared.work import work_stream_name
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Entry, FakeOpenAI, slow, text
from tests.support.workerstack import WorkerStack, solo_spec, terminal_items, user_texts


async def test_a_consumer_deleted_while_no_pull_waits_is_bound_again(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def respond(request: dict[str, Any]) -> Entry:
        last = user_texts(request)[-1]
        if last.startswith("busy") and not release.is_set():
            return slow(4.0, text(f"answered: {last}"))
        return text(f"answered: {last}")

    fake_openai.responder(respond)
    spec = solo_spec(stack.tmp / "solo.toml")
    # --concurrency 1: the worker holds at most 4 notices, so 4 busy sessions leave no pull waiting.
    (worker,) = await stack.start_workers(stack.worker("Solo", spec, args=["--concurrency", "1"]))
    js = stack.nc.jetstream()
    stream, name = work_stream_name(stack.settings.subjects), consumer_name("Solo")
    for i in range(4):
        await stack.send(f"busy-{i}", f"busy {i}")

    async def all_held() -> None:
        info = await js.consumer_info(stream, name)
        assert (info.num_ack_pending, info.num_waiting) == (4, 0), info

    await assert_eventually(all_held, timeout=10)
    await js.delete_consumer(stream, name)  # no pull waits: nothing tells the worker
    loop.call_later(0.5, release.set)

    for i in range(4):
        await stack.answered(f"busy-{i}", users=1, timeout=30)
    await stack.send("after", "hello again")
    log = await stack.answered("after", users=1, timeout=15)
    assert [e.data["content"][0]["text"] for e in terminal_items(log, log[0])] == ["answered: hello again"]
    assert worker.running
