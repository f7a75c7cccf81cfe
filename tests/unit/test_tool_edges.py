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
         "tests.support.odd_tools:quick", "tests.support.odd_tools:fails_unprintably"]
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
