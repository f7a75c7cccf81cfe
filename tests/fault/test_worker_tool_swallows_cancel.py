"""SIGTERM while an async function tool swallows its cancellation (a bare
``except:`` around a retry): the turn is cancelled at the end of grace and its
notice handed back, and the worker exits within its shutdown bound, instead of
``asyncio.run`` waiting at exit for the abandoned tool's task to end by itself
(forever, for a tool that never does). The turn is not lost: a worker started
afterwards runs it to its reply."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Entry, FakeOpenAI, text, tool_call
from tests.support.workerstack import WorkerStack, terminal_items, write_spec

SPEC = """\
entry = "Clerk"

[[agents]]
name = "Clerk"
instructions = "Use your tool."
tools = ["tests.support.odd_tools:retries_through_cancel"]
"""

TOOL_SECONDS = 15  # the tool ignores cancellation for this long (then returns "late")
GRACE = 2


async def test_sigterm_during_a_tool_that_swallows_its_cancellation_exits_within_grace(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    spec = write_spec(stack.tmp / "clerk.toml", SPEC)

    def respond(request: dict[str, Any]) -> Entry:
        if any(m.get("role") == "tool" for m in request["messages"]):
            return text("done")
        return tool_call("retries_through_cancel", {"n": TOOL_SECONDS})

    fake_openai.responder(respond)
    (first,) = await stack.start_workers(
        stack.worker("Clerk", spec, args=["--grace", str(GRACE)], name="worker-first"))
    ack = await stack.send("swallow", "go")

    async def tool_started() -> None:  # the call is in the log: the tool runs after it
        assert any(e.data.get("type") == "function_call" for e in await stack.log("swallow"))

    await assert_eventually(tool_started, timeout=10)
    await asyncio.sleep(0.5)
    os.kill(first.pid, signal.SIGTERM)
    sigterm = time.monotonic()
    code = await asyncio.to_thread(first.wait, TOOL_SECONDS + 10)
    took = time.monotonic() - sigterm
    assert code == 0, first.output()[-2000:]
    assert took < GRACE + 6, f"exited {took:.1f} s after SIGTERM (grace {GRACE} s)\n" + first.output()[-2000:]
    # Not lost: the notice was handed back, and the next worker plays the turn to its reply.
    await stack.start_workers(stack.worker("Clerk", spec, args=["--grace", str(GRACE)], name="worker-second"))

    async def replied() -> None:
        log = await stack.log("swallow")
        user = next(e for e in log if e.item_order == ack.first_order)
        assert [e.data["content"][0]["text"] for e in terminal_items(log, user)] == ["done"], log

    await assert_eventually(replied, timeout=TOOL_SECONDS + 20)
