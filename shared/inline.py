"""Hand a nats-py subscription's messages to a plain function as they are parsed.

nats-py puts every parsed message into the subscription's pending queue, and
a task per subscription awaits the callback for each: a queue put and get, a
task switch and a coroutine per message.  Where the handling is a plain
function that never waits (resolve a reply's future, submit an append to the
store), all of that is overhead, on the two busiest paths of convlog: the
client's replies and the log service's appends.

:func:`deliver_inline` puts an object in the queue's place that calls the
function at once.  It relies on two nats-py internals (``_pending_queue``,
``_pending_size``); where they differ it changes nothing and returns False,
and the subscription's callback keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg

__all__ = ["InlineDelivery", "deliver_inline"]

log = logging.getLogger("convlog.inline")


class InlineDelivery(asyncio.Queue):  # type: ignore[type-arg]
    """Stands in for a subscription's pending queue.  Nothing is ever queued,
    so the subscription's task waits forever and a drain finds nothing
    pending."""

    def __init__(self, sub: Any, deliver: Callable[[Msg], None]) -> None:
        super().__init__()
        self._sub = sub
        self._deliver = deliver

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)  # nats-py added it before the put
        try:
            self._deliver(msg)
        except Exception:  # never into nats-py's read loop
            log.exception("handling a message on %s failed", msg.subject[:200])


def deliver_inline(sub: Any, deliver: Callable[[Msg], None]) -> bool:
    """Have ``deliver(msg)`` called for each message of ``sub`` as it is parsed.

    ``deliver`` runs inside nats-py's read loop: it must not block, and what
    it raises is logged, not propagated.

    Returns:
        False (nothing changed) when the subscription lacks the internals.
    """
    if not isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue) or not hasattr(sub, "_pending_size"):
        return False
    sub._pending_queue = InlineDelivery(sub, deliver)
    return True
