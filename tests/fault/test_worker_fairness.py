"""One busy session does not hold up the other sessions of a worker: the notices
queued behind a session's running turn do not use up what the worker may take
from the consumer, so another session's message is taken and answered in a free
slot while the busy session works through its queue."""

from __future__ import annotations

import threading
from typing import Any

from tests.support.fake_openai import Entry, FakeOpenAI, slow, text
from tests.support.workerstack import WorkerStack, is_user, solo_spec, terminal_items, user_texts


async def test_a_flooded_session_does_not_hold_up_another_session(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    spec = solo_spec(stack.tmp / "solo.toml")
    order: list[str] = []
    lock = threading.Lock()

    def respond(request: dict[str, Any]) -> Entry:
        last = user_texts(request)[-1]
        with lock:
            order.append(last)
        return slow(0.25, text(f"answer to {last}"))

    fake_openai.responder(respond)
    # --concurrency 2: a replica holds at most 8 sessions (it used to be 8 notices); one gets 16.
    await stack.start_workers(stack.worker("Solo", spec, args=["--concurrency", "2"]))
    for i in range(16):
        await stack.send("flood", f"flood {i}")
    await stack.requests_at_least(1)  # the flood's first turn runs; the rest queue behind it
    await stack.send("other", "other")
    await stack.answered("other", users=1, timeout=20)
    with lock:
        asked = list(order)
    # One slot stays free while the flood's turns run one after another: "other" is
    # asked at once, a turn or two into the flood, not after the flood's held notices.
    assert "other" in asked, asked
    before = asked.index("other")
    assert before <= 2, (f"'other' was asked after {before} of the flood's turns: {asked}\n"
                         + stack.outputs()[-2000:])
    log = await stack.answered("flood", users=16, timeout=30)
    # The flood's own messages are still answered one after another, in order.
    replies = [terminal_items(log, u)[0].item_order for u in log if is_user(u)]
    assert replies == sorted(replies), replies
