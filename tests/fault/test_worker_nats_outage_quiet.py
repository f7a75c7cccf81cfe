"""A worker through a nats-server outage: one line says NATS went away, not one a
reconnect attempt (found in a review).

Workers replaced the shared error callback (``shared.client.connect_options``,
which says a repeated failure to reach the server at DEBUG, and again at WARNING
every 30 s) with their own, which logged every failed reconnect attempt, one each
0.25 s, at INFO: four lines a second in each worker's log for as long as NATS was
down.  The worker now keeps the shared one, and answers again once NATS is back.
"""

from __future__ import annotations

import asyncio

from tests.support.fake_openai import FakeOpenAI, text
from tests.support.workerstack import WorkerStack, solo_spec


async def test_a_worker_through_a_nats_outage_says_it_once_and_answers_after(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    fake_openai.responder(lambda request: text("answered"))
    spec = solo_spec(stack.tmp / "solo.toml")
    (worker,) = await stack.start_workers(stack.worker("Solo", spec))
    stack.server.stop()
    await asyncio.sleep(3)  # about 12 reconnect attempts
    stack.server.start()
    await stack.send("after-outage", "hello again")
    await stack.answered("after-outage", timeout=30)
    refused = [line for line in worker.output().splitlines() if "ConnectionRefusedError" in line]
    assert len(refused) <= 2, "\n".join(refused)
