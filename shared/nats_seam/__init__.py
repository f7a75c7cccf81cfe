"""The one place convlog touches nats-py's private names.

Two busy paths of convlog go faster than nats-py's public API lets them:

* **inline delivery** — nats-py puts every parsed message into a
  subscription's pending queue, and a task per subscription awaits the
  callback for each: a queue put and get, a task switch and a coroutine per
  message.  Where the handling is a plain function that never waits (resolve a
  reply's future, submit an append to the store) all of that is overhead, on
  the client's replies and the log service's appends.  The fast seam puts an
  object in the queue's place that calls the function at once
  (``Subscription._pending_queue``, ``_pending_size``).
* **burst writes** — ``Client.publish`` spends several microseconds of Python
  per message; the log service publishes in bursts (the replies of one group
  commit, the envelopes of one outbox window), which the fast seam queues as
  one write (``Client._send_command``, ``_flush_pending``, ``_flush_queue``,
  the calls ``publish`` itself ends with).

* **raw frames** — a JetStream store's batch direct get is thousands of
  messages whose bodies are all it wants; nats-py's parser builds a ``Msg``
  (and parses headers) for each.  The fast seam hands the complete frames of
  one subscription straight to a function as bytes, ahead of nats-py's own
  parse of the rest (``Client._ps``: its ``parse``, ``buf``, ``state``,
  ``needed``, ``header_needed``, ``msg_arg``; ``Subscription._id``).

* **ordered flush** — nats-py's ``Client.flush`` writes its PING ahead of
  commands still queued for the flusher task, so it can return before the
  server has seen a SUB queued just before it.  :func:`flush` first waits for
  the flusher to have written the queue: the fast seam puts its own future in
  the flusher's queue (``Client._flush_queue``), the public one watches
  ``pending_data_size`` fall to 0.

and the log service needs two things nats-py's ``micro`` has no public name
for: a request's reply subject, so replies can join such a burst
(``Request._msg``), and an endpoint's subscription, to deliver appends inline
and to *drain* it at shutdown (``Service._endpoints``, ``Endpoint._name``,
``_subscription``; ``Service.stop`` only unsubscribes).

:func:`probe` checks every one of those names once per process, on real
nats-py objects built without a connection, and checks that the installed
nats-py is a version the test suite ran on (:data:`TESTED_NATS_PY`, the same
range ``pyproject.toml`` declares).  The choice is all or nothing: either
every fast path is used (:data:`FAST`) or none is (:data:`PUBLIC`, nats-py's
public API only: ``publish``, subscription callbacks, micro's handler path and
``Request.respond``).  The public seam is slower, never wrong.

The seam is chosen per connection: :func:`bind` records the mode configured
for a connection (``CONVLOG_NATS_SEAM=auto|public`` through
:class:`~shared.config.Settings`), :func:`seam_for` answers it (``auto`` for a
connection nobody bound).
"""


from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Request
from nats.micro.service import Service

from .frames import InlineDelivery, RawDeliver, RawFrames
from .probing import TESTED_NATS_PY, Probe, probe

__all__ = [
    "FAST",
    "MODES",
    "PUBLIC",
    "TESTED_NATS_PY",
    "InlineDelivery",
    "NatsSeam",
    "Probe",
    "RawDeliver",
    "RawFrames",
    "bind",
    "flush",
    "probe",
    "seam_for",
    "select",
]

log = logging.getLogger("convlog.nats_seam")

#: ``CONVLOG_NATS_SEAM`` values: ``auto`` (fast when the probe passes), ``public``.
MODES = ("auto", "public")


class NatsSeam:
    """nats-py's public API only: what every path falls back to."""

    fast = False
    name = "public"

    def deliver_inline(self, sub: Subscription | None, deliver: Callable[[Msg], None]) -> bool:
        """Have ``deliver(msg)`` called for each message of ``sub`` as nats-py
        parses it, inside its read loop (``deliver`` must not block; what it
        raises is logged).  False (nothing changed): the subscription's own
        callback keeps serving."""
        return False

    def delivers_inline(self, sub: Subscription | None) -> bool:
        """True when ``sub``'s messages go to a function as they are parsed."""
        return False

    def deliver_raw(self, nc: Client, sub: Subscription | None, deliver: RawDeliver) -> bool:
        """Have ``deliver(subject, payload, headers)`` called with the bytes of
        each frame of ``sub`` on ``nc``, ahead of nats-py's parsing (no ``Msg``;
        ``headers`` raw, None without).  False (nothing changed): it is not."""
        return False

    def can_write(self, nc: Client) -> bool:
        """True when :meth:`write` may queue raw protocol frames on ``nc``."""
        return False

    async def write(self, nc: Client, frames: bytes, count: int, payload_bytes: int) -> None:
        """Queue ``count`` framed messages as one write, as ``publish`` queues one."""
        raise RuntimeError("the public seam has no raw writes; use publish")

    def write_now(self, nc: Client, frames: bytes, count: int, payload_bytes: int) -> bool:
        """Hand framed messages to the socket at once, from the caller (no flusher task
        turn), when nothing is queued before them, so the connection's order holds.
        False: not written (use :meth:`write`)."""
        return False

    def reply_to(self, req: Request) -> str | Request:
        """Where a micro request's reply goes: its reply subject ("" for none),
        or the request itself, to be answered through ``Request.respond``."""
        return req

    def reply_subject(self, req: Request) -> str | None:
        """A micro request's reply subject, where it can be read (None: not readable).

        micro has no public name for it, but the service must not answer on a
        subject of its own (see ``services.log.replies.answerable``) on this seam
        either: it is read where ``Request.respond`` reads it, if that is there."""
        reply = getattr(getattr(req, "_msg", None), "reply", None)
        return reply if type(reply) is str else None

    def endpoint_subscription(self, service: Service, name: str) -> Subscription | None:
        """The subscription behind a micro endpoint (None: not reachable)."""
        return None

    async def flush(self, nc: Client, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - as Client.flush
        """Return once the server has processed every command queued on ``nc``
        before this call (a ``subscribe``'s SUB, a ``publish``).

        ``Client.flush`` alone does not promise that on nats-py 2.16: it writes
        its PING straight to the socket, ahead of what still waits for the
        flusher task, so its PONG can come back before the server has seen a
        SUB queued just before it. The public way waits (within ``timeout``)
        until the flusher has written the queue, then flushes. A connection
        publishing without pause from other tasks can keep that queue from
        emptying; the fast seam does not wait on other tasks' messages.

        Raises:
            nats.errors.FlushTimeoutError: no PONG within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        spins = 0
        while nc.pending_data_size and nc.is_connected and loop.time() < deadline:
            spins += 1
            await asyncio.sleep(0 if spins < 16 else 0.001)  # the flusher's turn, or its drain
        await nc.flush(max(deadline - loop.time(), 0.001))

    async def stop_service(self, service: Service) -> None:
        """Stop intake: the public way unsubscribes the endpoints, so requests
        nats-py has queued but micro not yet handled get no reply (their
        senders retry; appends carry item ids, so nothing doubles)."""
        await service.stop()


class _FastSeam(NatsSeam):
    """The fast paths, on nats-py's private names (checked by :func:`probe`)."""

    fast = True
    name = "fast"

    def deliver_inline(self, sub: Subscription | None, deliver: Callable[[Msg], None]) -> bool:
        if sub is None:
            return False
        sub._pending_queue = InlineDelivery(sub, deliver)
        return True

    def delivers_inline(self, sub: Subscription | None) -> bool:
        return sub is not None and isinstance(sub._pending_queue, InlineDelivery)

    def deliver_raw(self, nc: Client, sub: Subscription | None, deliver: RawDeliver) -> bool:
        if sub is None:
            return False
        frames = getattr(nc._ps.parse, "__self__", None)
        if not isinstance(frames, RawFrames):
            frames = RawFrames(nc)
            nc._ps.parse = frames.parse  # type: ignore[method-assign]
        frames.routes[sub._id] = deliver
        return True

    def can_write(self, nc: Client) -> bool:
        # not reconnecting, draining its publishes or closed: publish's own path (and
        # errors) apply there (nats-py's is_connected is True while draining)
        return nc.is_connected and not nc.is_draining_pubs

    async def write(self, nc: Client, frames: bytes, count: int, payload_bytes: int) -> None:
        nc.stats["out_msgs"] += count
        nc.stats["out_bytes"] += payload_bytes
        await nc._send_command(frames)
        if nc._flush_queue is not None and nc._flush_queue.empty():  # as publish does
            await nc._flush_pending()

    def write_now(self, nc: Client, frames: bytes, count: int, payload_bytes: int) -> bool:
        if not nc.is_connected or nc.is_draining_pubs or nc._pending or nc._transport is None:
            return False
        nc._transport.writelines([frames])  # what the flusher task does with the queued frames
        nc.stats["out_msgs"] += count
        nc.stats["out_bytes"] += payload_bytes
        return True

    async def flush(self, nc: Client, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - as Client.flush
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queue = nc._flush_queue
        if nc.is_connected and queue is not None and not queue.full():
            written: asyncio.Future[None] = loop.create_future()
            queue.put_nowait(written)  # the flusher serves its queue in order: this after all before it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(written)
        await nc.flush(max(deadline - loop.time(), 0.001))

    def reply_to(self, req: Request) -> str | Request:
        return req._msg.reply

    def reply_subject(self, req: Request) -> str | None:
        return req._msg.reply

    def endpoint_subscription(self, service: Service, name: str) -> Subscription | None:
        for ep in service._endpoints:
            if ep._name == name:
                return ep._subscription
        return None

    async def stop_service(self, service: Service) -> None:
        """Drain every endpoint's subscription (what was delivered gets
        handled), then stop the service's discovery subscriptions."""
        for ep in list(service._endpoints):
            sub = ep._subscription
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.drain()
                ep._subscription = None
        service._endpoints = []  # Service.stop would unsubscribe them again
        await service.stop()


FAST: NatsSeam = _FastSeam()
PUBLIC: NatsSeam = NatsSeam()

_bound: weakref.WeakKeyDictionary[Client, NatsSeam] = weakref.WeakKeyDictionary()


def select(mode: str = "auto") -> NatsSeam:
    """The seam for ``mode``: ``public``, or ``auto`` (fast when :func:`probe` passes).

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"nats seam mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "public":
        return PUBLIC
    return FAST if probe().ok else PUBLIC


@functools.cache
def _log_fallback_once(reason: str) -> None:
    log.warning("nats-py: using its public API only (slower): %s", reason)


def bind(nc: Client, mode: str = "auto") -> NatsSeam:
    """Choose the seam for connection ``nc`` (see :func:`select`) and return it."""
    seam = select(mode)
    if mode == "auto" and not seam.fast:
        _log_fallback_once(probe().reason())
    _bound[nc] = seam
    return seam


def seam_for(nc: Client) -> NatsSeam:
    """The seam bound to ``nc``, else the ``auto`` choice."""
    seam = _bound.get(nc)
    return seam if seam is not None else bind(nc)


async def flush(nc: Client, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - as Client.flush
    """``nc.flush()`` that what was queued before it cannot overtake: once it
    returns, the server has processed every SUB, UNSUB and PUB queued on ``nc``
    before the call (see :meth:`NatsSeam.flush`)."""
    await seam_for(nc).flush(nc, timeout)
