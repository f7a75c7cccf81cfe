"""Wait for a condition by retrying an assertion, never by a bare sleep.

``fn`` states the condition with ``assert``; it is called until it stops
raising (its return value is handed back) or the timeout passes (the last
failure is re-raised, chained, with the elapsed time in the message)::

    async def delivered() -> None:
        assert len(received) == 3, received

    await assert_eventually(delivered, timeout=5)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["assert_eventually", "wait_until"]

T = TypeVar("T")

RetryOn = type[BaseException] | tuple[type[BaseException], ...]


def _timed_out(last: BaseException | None, timeout: float, attempts: int) -> AssertionError:
    detail = f"{type(last).__name__}: {last}" if last is not None else "no attempt finished"
    error = AssertionError(f"not true after {timeout}s ({attempts} attempts); last: {detail}")
    error.__cause__ = last
    return error


def _not_false(result: T) -> T:
    """``fn`` returned: done -- unless it returned ``False``, a condition written as an
    expression (``lambda: x == y``), which never raises, so never waits: a misuse."""
    if result is False:
        raise TypeError("the condition returned False instead of failing an assert: "
                        "state it with assert (a lambda returning False never waits)")
    return result


async def assert_eventually(
    fn: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a retry deadline, not a cancel scope
    interval: float = 0.05,
    *,
    retry_on: RetryOn = AssertionError,
) -> T:
    """Call ``fn`` (sync or async) until it returns without raising ``retry_on``.

    An async ``fn`` is also bounded by the remaining time, so a hung await
    counts as a failed attempt rather than blocking past ``timeout``.

    Args:
        fn: zero-argument callable; may return an awaitable.
        timeout: total seconds to keep trying.
        interval: seconds to sleep between attempts.
        retry_on: exception types meaning "not yet" (default ``AssertionError``);
            anything else propagates at once.

    Returns:
        What ``fn`` returned on the first successful attempt.

    Raises:
        AssertionError: still failing at the deadline; ``__cause__`` is the last failure.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            result = fn()
            if inspect.isawaitable(result):
                remaining = max(deadline - time.monotonic(), 0.001)
                async with asyncio.timeout(remaining):
                    result = await result
            return _not_false(result)  # type: ignore[return-value]
        except retry_on as exc:
            last = exc
        except TimeoutError as exc:
            if time.monotonic() < deadline:
                raise  # fn's own timeout, not ours
            last = last or exc
        if time.monotonic() >= deadline:
            raise _timed_out(last, timeout, attempts)
        await asyncio.sleep(interval)


def wait_until(
    fn: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    *,
    retry_on: RetryOn = AssertionError,
) -> T:
    """Blocking twin of :func:`assert_eventually` for sync code (threads, log files).

    Do not call it from a coroutine: it sleeps the thread, and so the event loop.

    Raises:
        AssertionError: still failing at the deadline; ``__cause__`` is the last failure.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            return _not_false(fn())
        except retry_on as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise _timed_out(last, timeout, attempts)
        time.sleep(interval)
