"""The model windows a worker keeps between turns are bounded by bytes, not only by
sessions: 2,000 windows of 50 items with 32k-char tool outputs held gigabytes.

Real nats-server, the real log service and an in-process worker (so its kept
windows can be weighed); only the model is faked.  The bound is made small for
the test (``_WINDOW_BYTES``), to need a few sessions rather than thousands.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from services.worker import parts
from services.worker.model import ModelReply
from services.worker.spec import parse_spec
from services.worker.worker import Worker
from shared.config import load_settings
from tests.support.workerstack import SOLO_SPEC, WorkerStack

BOUND = 120_000


class _Model:
    async def complete(self, *, model: str, messages: Any, tools: Any) -> ModelReply:
        return ModelReply(text="ok", model=model)


async def test_the_windows_kept_between_turns_are_bounded_by_bytes(
    stack: WorkerStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parts, "_WINDOW_BYTES", BOUND, raising=False)
    settings = load_settings({"nats_url": stack.server.url, "data_dir": str(stack.tmp)}, environ={})
    worker = Worker(settings, parse_spec(SOLO_SPEC), "Solo", _Model())
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 20)
        sessions = [f"big-{i}" for i in range(6)]
        for sid in sessions:  # one after another: the last played is the last kept
            await stack.send(sid, "x" * 50_000)
            await stack.answered(sid, users=1)
        assert worker.finder is not None
        kept = worker.finder._windows
        size = sum(len(msgspec.json.encode(e)) for _, items in kept.values() for e in items)
        # Six windows of one 50k message each: at most two fit (a little over the text: ids, hash).
        assert size <= BOUND + 2_000, f"{len(kept)} windows kept, {size} bytes: {list(kept)}"
        assert list(kept)[-2:] == sessions[-2:], list(kept)  # the most recently played stay
    finally:
        await worker.shutdown()
        await task
