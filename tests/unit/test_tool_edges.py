"""``run_tool`` keeps its promise, "every exception or timeout becomes an ``error:``
output", also for a tool that raises a CancelledError of its own (it escaped, and the
turn was redelivered forever), and a sync tool that hangs keeps a thread of its own
(hung tools filled the loop's shared executor and made instant ones time out)."""

from __future__ import annotations

import asyncio
import os

from services.worker.spec import parse_spec
from services.worker.tools import run_tool

SPEC = """
entry = "Clerk"

[[agents]]
name = "Clerk"
instructions = "Use your tools."
tools = ["tests.support.odd_tools:cancelled_inside", "tests.support.odd_tools:hangs",
         "tests.support.odd_tools:quick", "tests.support.odd_tools:fails_unprintably",
         "tests.support.odd_tools:gives_up_on_upstream", "tests.support.odd_tools:retries_through_cancel"]
"""
CLERK = parse_spec(SPEC).agent("Clerk")


async def call(name: str, n: float, limit: float) -> str:
    return await run_tool("Clerk", CLERK.tool_for(name), name, f'{{"n": {n}}}', key="k", time_limit=limit)


async def test_a_tool_raising_cancelled_error_of_its_own_becomes_an_error_output() -> None:
    # The worker task is not being cancelled; the CancelledError is the tool's.  It escapes
    # run_tool (except Exception), finish_calls and the turn; handle() takes it for a shutdown
    # and naks with no delay, and the give-up after max_attempts is never reached (it is under
    # `except Exception`): the delivery comes back forever and the tool runs every time.
    task = asyncio.create_task(call("cancelled_inside", 1, 5))
    done, _ = await asyncio.wait([task])
    assert not task.cancelled(), "run_tool let the tool's CancelledError out"
    assert task.result().startswith("error:")


async def test_hung_sync_tools_do_not_make_an_instant_one_time_out() -> None:
    # Sync tools run via asyncio.to_thread in the loop's default executor (min(32, cpus+4)
    # threads).  A timed-out sync tool keeps its thread; once that many have hung, every
    # sync tool (and anything else of the worker using the default executor, e.g.
    # getaddrinfo when NATS reconnects by host name) waits behind them.
    workers = min(32, (os.cpu_count() or 1) + 4)
    hung = await asyncio.gather(*(call("hangs", 3, 0.2) for _ in range(workers)))
    assert all(h.startswith("error: hangs did not finish") for h in hung)
    out = await call("quick", 7, 1.0)
    assert out == "quick 7", out


async def test_an_exception_whose_message_fails_still_becomes_an_error_output() -> None:
    # The error text was f"{type(e).__name__}: {e}" inside the except clause: a __str__ that
    # raises (a message read from a response that lacks it) escaped run_tool, the turn failed
    # and was redelivered, and the tool ran again on every delivery until the give-up.
    out = await call("fails_unprintably", 1, 5)
    assert out.startswith("error: fails_unprintably failed: ApiError"), out


async def test_a_timeout_error_of_the_tools_own_is_not_the_time_limit() -> None:
    # Every TimeoutError was taken for the worker's time limit: a tool whose own upstream
    # request timed out after 0.05 s was written to the log as "did not finish within 30s",
    # and counted as outcome="timeout" in convlog_worker_tool_calls_total (README: timeout
    # is the time limit; a tool that failed is an error).
    from services.metrics.worker import TOOL_CALLS, tool_called

    out = await call("gives_up_on_upstream", 0.05, 30)
    assert out.startswith("error: gives_up_on_upstream failed: TimeoutError"), out

    def counted(outcome: str) -> float:
        return TOOL_CALLS.labels("Clerk", "gives_up_on_upstream", outcome)._value.get()

    before = counted("error"), counted("timeout")
    tool_called("Clerk", "gives_up_on_upstream", out)
    assert (counted("error"), counted("timeout")) == (before[0] + 1, before[1])
    # Nor is a failure whose own message happens to say so.
    tool_called("Clerk", "gives_up_on_upstream",
                "error: gives_up_on_upstream failed: RuntimeError: the export did not finish within 5s")
    assert (counted("error"), counted("timeout")) == (before[0] + 2, before[1])
    # Its own time limit is still a timeout.
    late = await call("gives_up_on_upstream", 5, 0.05)
    assert late == "error: gives_up_on_upstream did not finish within 0.05s", late
    tool_called("Clerk", "gives_up_on_upstream", late)
    assert counted("timeout") == before[1] + 1


async def test_an_async_tool_that_swallows_its_cancellation_still_times_out() -> None:
    # The time limit cancelled the tool's coroutine in the turn's own task and waited for
    # it: a tool that takes the cancellation for one more failure to retry (a bare except)
    # ran on past its limit, the turn with it (its notice kept in progress by the
    # heartbeats), and its late result was stored as if it were in time; one that never
    # gives up held its session forever.
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await call("retries_through_cancel", 3, 0.3)
    assert out == "error: retries_through_cancel did not finish within 0.3s", out
    assert loop.time() - t0 < 1.5
