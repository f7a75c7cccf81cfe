"""A worker's SIGTERM hands back a notice taken off its session queue but still
waiting for a concurrency slot (nak'd at once for another replica), rather than
starting its turn in the grace period and cancelling it at the end of grace."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from tests.support.fake_openai import Entry, FakeOpenAI, slow, text
from tests.support.workerstack import WorkerStack, solo_spec, user_texts


async def test_a_notice_waiting_for_a_slot_is_handed_back_at_sigterm_not_started(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    spec = solo_spec(stack.tmp / "solo.toml")
    asked: list[tuple[str, float]] = []

    def respond(request: dict[str, Any]) -> Entry:
        last = user_texts(request)[-1]
        asked.append((last, time.monotonic()))
        if last == "first":
            return slow(2.0, text("first answer"))
        return slow(60, text("never delivered"))

    fake_openai.responder(respond)
    (worker,) = await stack.start_workers(
        stack.worker("Solo", spec, args=["--concurrency", "1", "--grace", "6"]))
    await stack.send("slot-a", "first")
    await stack.requests_at_least(1)  # "first" holds the only slot
    await stack.send("slot-b", "second")  # its notice waits for the slot
    await asyncio.sleep(0.7)
    os.kill(worker.pid, signal.SIGTERM)
    sigterm = time.monotonic()
    code = await asyncio.to_thread(worker.wait, 20)
    assert code == 0, worker.output()
    started_after = [t - sigterm for m, t in asked if m == "second"]
    # Module docstring: "nak what was fetched but not started (another replica takes it now)".
    assert not started_after, (
        f"the waiting turn was started {started_after} s after SIGTERM (then cancelled at grace)\n"
        + worker.output()[-1500:])
    # The operator's line counts the turn that runs, not the notice handed back unstarted.
    assert "waiting up to 6s for 1 running turn(s)" in worker.output(), worker.output()[-1500:]
