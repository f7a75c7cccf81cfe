"""Following a session live: :meth:`LogClient.follow <shared.client.LogClient.follow>`.

Live items come from ``<prefix>.items.<sid>`` through a JetStream consumer
(never a core subscription on a captured subject, nats-py #678); history and
any gap come from the log service.  The follower tracks the last order it
yielded and after any gap, reconnect, server restart or a consumer that went
quiet while the log grew (nats-py #504/#510) it fills the gap from the log
and resubscribes, so nothing is skipped or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from .codec import decode
from .errors import BadRequestError, UnavailableError
from .failures import LOOP_BACKOFF, is_transient
from .messages import Envelope
from .requester import raise_if_cancelled
from .subjects import validate_session_id

__all__ = ["follow"]

log = logging.getLogger("convlog.client")


async def follow(
    client: Any, session_id: str, *, after: int = 0, idle_check: float = 2.0, wait_out: bool = True
) -> AsyncIterator[Envelope]:
    """Yield every envelope of ``session_id`` with ``item_order > after``, in order, forever.

    ``client`` is the :class:`~shared.client.LogClient` that reads the log and
    whose connection carries the consumer.  With ``wait_out=False`` a read of
    the log that found no log service until the client's deadline raises
    (``UnavailableError``) instead of being tried again.
    """
    validate_session_id(session_id)
    last = after
    js = client.nc.jetstream()
    subject = client.subjects.items(session_id)
    failures = 0
    while True:
        raise_if_cancelled()
        sub = None
        try:
            async for env in client.iter_items(session_id, after=last):
                last = env.item_order
                failures = 0
                yield env
            sub = await js.subscribe(
                subject,
                ordered_consumer=True,
                idle_heartbeat=max(idle_check, 1.0),
                config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT),
            )
            while True:
                raise_if_cancelled()
                try:
                    msg = await sub.next_msg(timeout=idle_check)
                except (TimeoutError, nats.errors.TimeoutError):
                    if await client.last_order(session_id) > last:
                        break  # the consumer fell behind the log: refill, resubscribe
                    continue
                try:
                    env = decode(msg.data, Envelope)
                except BadRequestError as e:  # a stray publish on the subject (a loose NATS configuration)
                    log.warning("follow %s: not an envelope on %s, skipped: %s", session_id, subject, e.message)
                    continue
                if env.session_id != session_id or env.item_order <= last:
                    continue
                if env.item_order > last + 1:
                    async for gap in client.iter_items(session_id, after=last):
                        if gap.item_order > env.item_order:
                            break
                        last = gap.item_order
                        yield gap
                    continue
                last = env.item_order
                failures = 0
                yield env
        except Exception as e:
            # Transient failures, and JetStream refusals a fresh subscription
            # may not meet (a restart, a consumer gone), are waited out; any
            # other error (the log refusing the read, a bug) is the caller's.
            if not (is_transient(e) or isinstance(e, nats.js.errors.Error)):
                raise
            if not wait_out and isinstance(e, UnavailableError):
                raise
            delay = LOOP_BACKOFF.delay(failures)
            failures += 1
            log.info("follow %s: %s; resuming after %d in %.2gs",
                     session_id, type(e).__name__, last, delay)
            await asyncio.sleep(delay)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
