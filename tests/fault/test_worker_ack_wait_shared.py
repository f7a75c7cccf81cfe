"""The replicas of an agent share one consumer, so its ``ack_wait`` is the one the
replica that bound it last asked for (``--ack-wait``).  A worker sent its in-progress
acks every third of its *own* ``ack_wait``: a replica started with a shorter one (a
rolling change of ``--ack-wait``) made JetStream redeliver every turn the older replicas
ran for longer than that, so a slow model was asked twice (and a tool run twice) by two
replicas.  The worker reads the consumer's ``ack_wait`` back and beats by the shorter.
Real nats-server, the real log service, in-process workers; the model is the fake
OpenAI server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.worker import intake
from services.worker.model import make_model_client
from services.worker.spec import parse_spec
from services.worker.worker import Worker
from shared.config import load_settings
from tests.support.fake_openai import FakeOpenAI, slow, text
from tests.support.workerstack import SOLO_SPEC, WorkerStack, terminal_items, user_texts


async def test_a_replica_with_a_shorter_ack_wait_does_not_get_the_older_replicas_turns_redelivered(
    stack: WorkerStack, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake, "_CONSUMER_CHECK", 0.5, raising=False)
    fake_openai.responder(lambda r: slow(4.0, text(f"answer: {user_texts(r)[-1]}")))
    settings = load_settings({"nats_url": stack.server.url, "grace": 0, "data_dir": str(stack.tmp)}, environ={})
    spec = parse_spec(SOLO_SPEC)
    models: list[Any] = []
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def serve(ack_wait: float) -> Worker:
        model = make_model_client("test", fake_openai.base_url, max_retries=0)
        models.append(model)
        worker = Worker(settings, spec, "Solo", model, ack_wait=ack_wait)
        running.append((worker, asyncio.create_task(worker.run())))
        await asyncio.wait_for(worker.ready.wait(), 20)
        return worker

    try:
        old = await serve(30.0)  # beats every 10 s
        new = await serve(2.0)  # binds last: the shared consumer now redelivers after 2 s
        await new.shutdown()
        await asyncio.sleep(2.5)  # the old replica reads the consumer again meanwhile

        await stack.send("slow", "hello")  # only the old replica pulls now
        log = await stack.answered("slow", users=1, timeout=20)
        assert len(terminal_items(log, log[0])) == 1
        await asyncio.sleep(0.5)
        # Delivered once: not handed out again while the old replica still ran the turn
        # (with another replica running, it would have called the model a second time).
        assert old.tally.delivered == 1, old.tally
        assert len(fake_openai.requests) == 1
    finally:
        for worker, task in running:
            await worker.shutdown()
            await task
        for model in models:
            await model.client.close()
