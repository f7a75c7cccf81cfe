"""cancel_and_wait: a task whose first cancel is lost still ends."""

from __future__ import annotations

import asyncio

from shared.failures import cancel_and_wait


async def test_a_task_that_swallows_one_cancel_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:  # the second cancel is honoured
                    raise
                swallowed += 1  # a library turning the first cancel into a timeout

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait({task}, within=2.0) == set()
    assert task.cancelled() and swallowed == 1
