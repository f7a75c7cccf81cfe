"""The give-up after ``max_attempts`` counts failures, not deliveries.

A worker ends a turn that keeps failing with an unexpected error with a ``system`` item,
"internal error after N attempts", once ``max_attempts`` deliveries of its notice have
failed (``Worker``'s ``max_attempts``).  The count was JetStream's delivery count, which
also counts the deliveries a worker handed back on a graceful shutdown (nak'd, never
failed) and the ones nak'd for a transient failure: a turn handed back once on SIGTERM
was given up on its first failure.  Real nats-server, the real log service and
in-process workers; only the model is faked (it fails once, unexpectedly).
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.worker.model import ModelReply
from services.worker.spec import parse_spec
from services.worker.worker import Worker
from shared.config import load_settings
from shared.messages import Envelope
from tests.support.eventually import assert_eventually
from tests.support.workerstack import SOLO_SPEC, WorkerStack, terminal_items


class _Model:
    """The first call hangs (the worker is stopped meanwhile), the second fails
    with an error no code expects, the rest answer."""

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, *, model: str, messages: Any, tools: Any) -> ModelReply:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(60)
        if self.calls == 2:
            raise RuntimeError("a one-off bug")
        return ModelReply(text="answered", model=model)


async def test_a_turn_handed_back_on_shutdown_is_not_given_up_on_its_first_failure(stack: WorkerStack) -> None:
    settings = load_settings({"nats_url": stack.server.url, "grace": 0, "data_dir": str(stack.tmp)}, environ={})
    spec = parse_spec(SOLO_SPEC)
    model = _Model()

    async def serve() -> tuple[Worker, asyncio.Task[None]]:
        worker = Worker(settings, spec, "Solo", model, max_attempts=2)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 20)
        return worker, task

    first, run1 = await serve()
    await stack.send("handed-back", "hello")

    async def asked() -> None:
        assert model.calls == 1

    await assert_eventually(asked, timeout=10)
    await first.shutdown()  # grace 0: the running turn is cancelled and handed back (nak)
    await run1
    assert first.tally.naks == 1

    second, run2 = await serve()
    try:
        async def ended() -> list[Envelope]:
            log = await stack.log("handed-back")
            assert terminal_items(log, log[0]), "not ended yet"
            return log

        log = await assert_eventually(ended, timeout=20)
        (end,) = terminal_items(log, log[0])
        # One failure (the second delivery) is under max_attempts=2: retried, then answered.
        assert end.agent == "Solo", end.data
        assert model.calls == 3
    finally:
        await second.shutdown()
        await run2


class _Broken:
    async def complete(self, *, model: str, messages: Any, tools: Any) -> ModelReply:
        raise RuntimeError("a bug every time")


async def test_a_turn_that_keeps_failing_is_given_up_after_max_attempts_failures(stack: WorkerStack) -> None:
    settings = load_settings({"nats_url": stack.server.url, "data_dir": str(stack.tmp)}, environ={})
    worker = Worker(settings, parse_spec(SOLO_SPEC), "Solo", _Broken(), max_attempts=2)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 20)
        await stack.send("broken", "hello")

        async def ended() -> list[Envelope]:
            log = await stack.log("broken")
            assert terminal_items(log, log[0]), "not ended yet"
            return log

        log = await assert_eventually(ended, timeout=20)
        (end,) = terminal_items(log, log[0])
        assert end.agent == "system"
        assert end.data["content"] == "Solo failed to answer: internal error after 2 attempts (RuntimeError)"
    finally:
        await worker.shutdown()
        await task


class _SlowBroken:
    """Takes a while, then fails with an error no code expects, every time."""

    async def complete(self, *, model: str, messages: Any, tools: Any) -> ModelReply:
        await asyncio.sleep(0.5)
        raise RuntimeError("a bug that stays")


# The part a worker gives up on took its time like any other: convlog_worker_turn_seconds
# recorded it as 0 s (timed from the moment it was given up), so the slowest parts pulled
# the turn-time histogram down instead of up.
async def test_a_given_up_turn_is_timed_from_its_start(stack: WorkerStack) -> None:
    from services.metrics import WORKER_REGISTRY

    def observed() -> tuple[float, float]:
        count = WORKER_REGISTRY.get_sample_value("convlog_worker_turn_seconds_count", {"agent": "Solo"}) or 0.0
        total = WORKER_REGISTRY.get_sample_value("convlog_worker_turn_seconds_sum", {"agent": "Solo"}) or 0.0
        return count, total

    settings = load_settings({"nats_url": stack.server.url, "data_dir": str(stack.tmp)}, environ={})
    worker = Worker(settings, parse_spec(SOLO_SPEC), "Solo", _SlowBroken(), max_attempts=1)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 20)
        count0, total0 = observed()
        await stack.send("slow-broken", "hello")

        async def ended() -> None:
            log = await stack.log("slow-broken")
            assert terminal_items(log, log[0]), "not ended yet"
            assert observed()[0] == count0 + 1

        await assert_eventually(ended, timeout=20)
        assert observed()[1] - total0 >= 0.5, observed()
    finally:
        await worker.shutdown()
        await task
