"""Following a session live: :meth:`LogClient.follow <shared.client.LogClient.follow>`.

Live items come from ``<prefix>.items.<sid>`` through a JetStream consumer
(never a core subscription on a captured subject, nats-py #678); history and
any gap come from the log service.  The follower tracks the last order it
yielded and after any gap, reconnect, server restart or a consumer that went
quiet while the log grew (nats-py #504/#510) it fills the gap from the log
and resubscribes, so nothing is skipped or repeated.

It checks what it is delivered (a loose NATS configuration lets anyone
publish on the items subject): it keeps the hash of the last envelope it
took, and a delivered envelope that does not continue that chain (or whose
predecessor's hash it does not know) is not taken -- it logs that at WARNING
(once) and reads the log instead.  A forgery that does continue the chain
cannot be told at once; the next real item then does not continue it (or
disagrees with it at the same order): the follower logs at ERROR that the
item as delivered was not the log's and yields the log's items from there,
orders it yielded before included.

A NATS user that may not use the JetStream API (one that may only send and
read, e.g. the gateway of ``nats-users.conf``) cannot create that consumer:
once the server refuses the client such a request
(:attr:`LogClient.consumers_denied <shared.client.LogClient.consumers_denied>`),
the follower reads the log instead, every 0.1 s while items come and up to
every second while none do.
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

from .chain import GENESIS_HASH, envelope_hash
from .codec import decode
from .errors import BadRequestError, UnavailableError
from .failures import LOOP_BACKOFF, is_transient
from .messages import Envelope
from .requester import raise_if_cancelled
from .subjects import validate_session_id

__all__ = ["follow", "unless_denied"]

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
    prev: str | None = GENESIS_HASH if after == 0 else None  # the hash of item ``last``, when known
    taken: dict[int, str] = {}  # orders taken from deliveries, not yet confirmed by the log: their hashes
    warned = False

    def refuse(order: int) -> None:
        nonlocal warned
        log.log(logging.DEBUG if warned else logging.WARNING,
                "follow %s: item %d as delivered does not continue the hash chain; not taken, "
                "reading the log instead", session_id, order)
        warned = True

    async def from_log(upto: int | None = None) -> AsyncIterator[Envelope]:
        """The log's envelopes after ``last`` (up to ``upto``), after checking the
        deliveries taken since the log last confirmed them: from the first the log
        disagrees with, the log's own are yielded again."""
        nonlocal last, prev
        start = last
        if taken:
            rep = await client.read(session_id, after=last - 1, limit=1, raw=True)
            if rep.items and rep.items[0].item_order == last and rep.items[0].hash == prev:
                taken.clear()  # the chain through ``last`` is the log's
            else:
                start = next(iter(taken)) - 1  # find where they part
        elif prev is None and last > 0:
            start = last - 1  # learn the hash of ``last``
        async for env in client.iter_items(session_id, after=start):
            order = env.item_order
            if upto is not None and order > upto:
                break
            if order <= last:
                held = taken.pop(order, None)
                if held is None:
                    if order == last and prev is None:
                        prev = env.hash
                    continue
                if held == env.hash:
                    continue
                log.error("follow %s: item %d as delivered was not the log's; following the log's "
                          "items from there", session_id, order)
                taken.clear()
            last, prev = order, env.hash
            yield env
    js = client.nc.jetstream()
    subject = client.subjects.items(session_id)
    denied: asyncio.Event | None = getattr(client, "consumers_denied", None)
    failures = 0
    poll = _POLL_MIN
    while True:
        raise_if_cancelled()
        sub = None
        try:
            async for env in from_log():
                failures = 0
                poll = _POLL_MIN
                yield env
            if denied is not None and denied.is_set():  # no consumer for this user: poll the log
                await asyncio.sleep(poll)
                poll = min(poll * 2, _POLL_MAX)
                continue
            sub = await _subscribe(js, subject, idle_check, denied)
            if sub is None:
                log.info("follow %s: this NATS user may not use the JetStream API; following by "
                         "reading the log (every %gs to %gs)", session_id, _POLL_MIN, _POLL_MAX)
                continue
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
                order = env.item_order
                if env.session_id != session_id:
                    continue
                if order <= last:
                    held = taken.get(order)
                    if held is None or held == env.hash:
                        continue  # already yielded (or the log's: never replaced by a delivery)
                    refuse(order)  # two deliveries of one order disagree: the log decides
                elif order == last + 1 and prev is not None:
                    if envelope_hash(env, prev) == env.hash:
                        last = order
                        prev = taken[order] = env.hash
                        failures = 0
                        yield env
                        if len(taken) < _TAKEN_MAX:
                            continue
                        order = last  # many taken: have the log confirm them
                    else:
                        refuse(order)
                async for gap in from_log(upto=order):
                    yield gap
        except Exception as e:
            # Transient failures, and JetStream refusals a fresh subscription
            # may not meet (a restart, a consumer gone), are waited out; any
            # other error (the log refusing the read, a bug) is the caller's.
            if not (is_transient(e) or isinstance(e, nats.js.errors.Error)):
                raise
            if not wait_out and isinstance(e, UnavailableError):
                raise
            if client.nc.is_closed:  # (client.close()): a closed connection never reopens
                raise UnavailableError(f"follow {session_id}: the client's connection is closed") from e
            delay = LOOP_BACKOFF.delay(failures)
            failures += 1
            log.info("follow %s: %s; resuming after %d in %.2gs",
                     session_id, type(e).__name__, last, delay)
            await asyncio.sleep(delay)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


_POLL_MIN = 0.1  # seconds between reads of the log while items come (no consumer)
_POLL_MAX = 1.0  # ... and while none do
_TAKEN_MAX = 1_000  # deliveries taken before the log is asked to confirm them (one small read)


async def _subscribe(js: Any, subject: str, idle_check: float, denied: asyncio.Event | None) -> Any:
    """The ordered consumer on ``subject``, or ``None`` once ``denied`` is set
    (the server refused this user a JetStream API request: nats-py would wait
    out the request's timeout).  A create still out then is left to finish
    and is dropped.

    Cancelled while the consumer is being made, the create is waited out
    (nats-py bounds it by its JetStream timeout) and what it made unsubscribed
    before the cancellation goes on.  Left to finish on its own, the
    subscription it made could land after the caller had gone on to close the
    connection: the close's drain then waited 30 s (nats-py's drain timeout)
    for the consumer's first message, which nobody would read.
    """
    attempt = asyncio.ensure_future(js.subscribe(
        subject,
        ordered_consumer=True,
        idle_heartbeat=max(idle_check, 1.0),
        config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT),
    ))
    try:
        done = await unless_denied(attempt, denied)
    except asyncio.CancelledError:
        await _settle(attempt)
        raise
    if done:
        return attempt.result()
    attempt.add_done_callback(_drop)
    return None


async def unless_denied(attempt: asyncio.Future[Any], denied: asyncio.Event | None) -> bool:
    """Wait for ``attempt`` (a JetStream API request) or until ``denied`` is set: the
    server refused this user such a request, and nats-py would wait out the request's
    timeout.  True when ``attempt`` is done; else it is still out (the caller's)."""
    refused = asyncio.ensure_future(denied.wait()) if denied is not None else None
    try:
        await asyncio.wait({attempt} if refused is None else {attempt, refused},
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if refused is not None:
            refused.cancel()
    return attempt.done()


async def _settle(attempt: asyncio.Future[Any]) -> None:
    """Wait for a consumer create nobody wants any more, then unsubscribe what it
    made.  Cancelled again meanwhile, it is left to :func:`_drop`."""
    try:
        await asyncio.wait({attempt})
    except asyncio.CancelledError:
        attempt.add_done_callback(_drop)
        raise
    if not attempt.cancelled() and attempt.exception() is None:
        with contextlib.suppress(Exception):
            await attempt.result().unsubscribe()


def _drop(attempt: asyncio.Future[Any]) -> None:
    """A consumer create nobody waits for: unsubscribe what it made, if anything."""
    if attempt.cancelled() or attempt.exception() is not None:
        return
    task = asyncio.ensure_future(attempt.result().unsubscribe())
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
