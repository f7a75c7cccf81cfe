"""``cancelled_by_signals``: a SIGTERM'd command exits 128+15, however its coroutine ended."""

from __future__ import annotations

import asyncio
import os
import signal

from services.cli.common import cancelled_by_signals


async def _swallowing_command() -> int:
    """What a command does when a cancel lands with a reply: Python 3.11's
    ``asyncio.wait_for`` (under nats-py's ``request``) returns the reply and drops
    the cancel, and the command runs on to its own ``return 0``."""
    loop = asyncio.get_running_loop()
    reply = loop.create_future()

    def answer_and_signal() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the SIGTERM, and the reply in the same loop turn
        loop.call_soon(reply.set_result, b"reply")

    loop.call_soon(answer_and_signal)
    await asyncio.wait_for(reply, 5)  # as nats-py waits for a reply
    return 0


# The coroutine swallowed the cancellation (Python 3.11's wait_for): the command
# exited 0 after a SIGTERM, as if it had finished, instead of 128+15.
def test_a_sigterm_the_command_swallowed_still_exits_128_plus_15() -> None:
    assert asyncio.run(cancelled_by_signals(_swallowing_command())) == 128 + signal.SIGTERM
