"""Which failures heal by themselves, and what a long-running loop does about each.

convlog's processes run background loops: the log service's outbox and
replier, a worker's pulls, heartbeats and session tasks.  One rule for all:

* **transient** (:func:`is_transient`): NATS is down, reconnecting, draining
  or slow (timeouts, no responders, a closed or stale connection), JetStream is
  briefly unavailable, the log service answers ``unavailable``, SQLite is busy.
  The loop backs off (:class:`Backoff`: exponential, capped, with jitter) and
  tries again for as long as it takes; a reconnect may cut the wait short.
* **fatal**: everything else.  A stream whose configuration no longer fits, a
  stream that belongs to another database, a refusal that resyncing cannot
  cure, a programming error (``TypeError``, ``AttributeError``, ...).  Retrying
  cannot fix these, and a process that keeps acknowledging appends while its
  outbox is stuck is a silent stall.  So the loop stops (:func:`supervise`),
  logs one line naming the cause, and the process shuts down and exits
  non-zero (``convlog log`` and ``convlog worker`` exit 1), so that its process
  manager restarts it and an operator sees why.

Calls that are retried have one policy per kind of call, each a tenacity
``AsyncRetrying``: log requests over NATS in :mod:`shared.client` (unknown
outcomes, same ids, until the deadline), model requests over HTTP in
:mod:`services.worker.model` (with ``Retry-After``; its backoff is a
:class:`Backoff`), and waiting at start for what the process needs
(:func:`wait_for`; :mod:`shared.startup` for the streams, buckets and
store every process sets up).  A worker's failed delivery comes back after a
:class:`Backoff` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import tenacity
from nats.js.api import StreamConfig

from .errors import UnavailableError
from .subjects import Subjects

__all__ = [
    "CONFLICT_BACKOFF",
    "LOOP_BACKOFF",
    "Backoff",
    "FatalError",
    "Loops",
    "StreamConfigError",
    "check_items_stream",
    "is_transient",
    "refused_publish",
    "supervise",
    "wait_for",
    "watch",
]

_T = TypeVar("_T")

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TimeoutError,  # asyncio's and nats-py's timeouts are TimeoutErrors
    ConnectionError,  # refused, reset, aborted, broken pipe; "disconnected from NATS"
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,  # and UnexpectedEOF
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.errors.SlowConsumerError,
    nats.js.errors.ServiceUnavailableError,  # JetStream not (yet) answering
    nats.js.errors.NoStreamResponseError,
    UnavailableError,  # the log service's own "try again"
)
# JetStream API errors that heal: 10008 "JetStream system temporarily
# unavailable"; 10070 "wrong last msg ID": the stream lost the tail of a
# publish window in a server restart, and a resync from the stream cures it;
# 10158 "duplicate message id is in process": the first publish of that id is
# still being replicated (seen on a cluster losing quorum); it settles.
_TRANSIENT_JS_ERR_CODES = frozenset({10008, 10070, 10158})
_TRANSIENT_JS_STATUS = frozenset({408, 503})
_TRANSIENT_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})


class FatalError(RuntimeError):
    """A failure that retrying cannot fix: the process must stop and exit non-zero.

    Raised by :func:`supervise` (wrapping the cause as ``__cause__``), and
    subclassed by conditions a loop recognises itself (a stream that belongs
    to another database, a stream configured for other subjects).
    """


class StreamConfigError(FatalError):
    """The items stream is gone, sealed, or does not capture the items subjects."""


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a trailing ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def check_items_stream(config: StreamConfig, subjects: Subjects) -> None:
    """Refuse an items stream that would not store what the log service publishes.

    Raises:
        StreamConfigError: the stream does not capture ``<prefix>.items.<sid>``
            (someone created or changed it), or it is sealed.
    """
    name = subjects.stream_name
    captured = list(config.subjects or [])
    probe = subjects.items("probe")  # session ids are one token
    if not any(_matches(pattern, probe) for pattern in captured):
        raise StreamConfigError(
            f"the items stream {name} captures {captured}, not {subjects.items_all}: "
            "it was created or changed by something else. Fix its subjects, or delete it "
            "(a restart of the log service creates it again and republishes every item)"
        )
    if config.sealed:
        raise StreamConfigError(f"the items stream {name} is sealed: it stores nothing more")


def is_transient(exc: BaseException) -> bool:
    """True if retrying ``exc`` later (with backoff) can succeed without a restart."""
    if isinstance(exc, FatalError):
        return False
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return exc.err_code in _TRANSIENT_JS_ERR_CODES or exc.code in _TRANSIENT_JS_STATUS
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        return "locked" in text or "busy" in text
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False


#: How nats-py reports nats-server's refusal of a publish (its ``-ERR``), lower-cased.
_REFUSED_PUBLISH = 'permissions violation for publish to "'


def refused_publish(exc: BaseException) -> str | None:
    """The subject nats-server refused this connection to publish to, as nats-py
    passes its ``-ERR`` to the error callback (lower-cased), or ``None``."""
    text = str(exc).lower()
    at = text.find(_REFUSED_PUBLISH)
    if at < 0:
        return None
    return text[at + len(_REFUSED_PUBLISH):].split('"', 1)[0]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with equal jitter: the wait before retry ``n`` (0-based).

    ``ceiling = min(maximum, initial * 2**n)``; the wait is at least half the
    ceiling (so replicas spread out but still wait) and at most all of it.

    Attributes:
        initial: the first ceiling, seconds.
        maximum: the cap, seconds.
    """

    initial: float
    maximum: float

    def delay(self, n: int, rng: Callable[[], float] = random.random) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(max(n, 0), 64))
        return ceiling / 2 + rng() * ceiling / 2


#: Background loops: 0.05-0.1 s after the first failure, doubling to 1-2 s.
LOOP_BACKOFF = Backoff(initial=0.1, maximum=2.0)

#: Optimistic-concurrency retries (an append refused with ``conflict`` because
#: another writer got in first: read again, decide again): short, since the
#: other writer is done; jittered, so racing writers spread out.  Retry ``n``
#: waits 1-2 ms doubling up to 0.25-0.5 s.
CONFLICT_BACKOFF = Backoff(initial=0.002, maximum=0.5)


async def wait_for(
    attempt: Callable[[], Awaitable[_T]],
    *,
    within: float,
    heals: Callable[[BaseException], bool],
    waiting: Callable[[int, float, BaseException], None],
    backoff: Backoff = LOOP_BACKOFF,
) -> _T:
    """Await ``attempt()`` until it returns, at start-up: a failure that
    ``heals`` is tried again after ``backoff`` (never past the deadline) for
    up to ``within`` seconds; anything else, or a failure at the deadline, is
    raised as it is.

    ``waiting(n, waited, failure)`` is called before each wait (``n`` from 0),
    so the caller decides which waits deserve a log line.
    """

    def wait(state: tenacity.RetryCallState) -> float:
        left = within - state.seconds_since_start
        return max(0.0, min(backoff.delay(state.attempt_number - 1), left))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        if failure is not None:
            waiting(state.attempt_number - 1, state.seconds_since_start, failure)

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(heals),
        stop=tenacity.stop_after_delay(within),
        wait=wait,
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(attempt)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], within: float) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait up to ``within`` seconds for them to end.

    A cancel can be lost in a library's own wait (one that lands as its
    timeout fires becomes that timeout), so the still-running ones are
    cancelled again every 0.1 s.  Returns the tasks still running at the end.
    """
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + within
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.1, left))
    return pending


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def supervise(
    run: Callable[[], Awaitable[None]],
    name: str,
    *,
    logger: logging.Logger,
    backoff: Backoff = LOOP_BACKOFF,
    wake: asyncio.Event | None = None,
    give_up: Callable[[], bool] = lambda: False,
    healthy_after: float = 10.0,
) -> None:
    """Run the loop ``run`` until it returns, applying the one failure rule.

    A transient failure is logged (one warning line) and ``run`` is called
    again after a backoff that grows while failures follow each other and
    starts over once an attempt ran for ``healthy_after`` seconds.  Setting
    ``wake`` ends a wait early (e.g. on a NATS reconnect).  Any other failure
    is logged as one critical line naming the loop and the cause (with the
    traceback when it is not a recognised :class:`FatalError`) and raised.

    Args:
        run: one attempt of the loop; returns when the loop is done.
        name: the loop's name, for the log lines.
        logger: where the lines go.
        backoff: the waits between attempts.
        wake: an event that cuts a wait short; cleared before each wait.
        give_up: checked after a transient failure; True ends the loop quietly
            (e.g. shutting down with NATS gone).
        healthy_after: seconds after which an attempt counts as recovered.

    Raises:
        FatalError: the loop met a failure that retrying cannot fix.
    """
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        started = loop.time()
        try:
            await run()
            return
        except Exception as e:
            if not is_transient(e):
                raise _fatal(name, e, logger) from e
            if give_up():
                return
            if loop.time() - started >= healthy_after:
                failures = 0
            delay = backoff.delay(failures)
            failures += 1
            logger.warning("%s: %s; retrying in %.2gs", name, _one_line(e), delay)
        if wake is None:
            await asyncio.sleep(delay)
        else:
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()


def _fatal(name: str, error: Exception, logger: logging.Logger) -> FatalError:
    """Log the one line for a loop that gave up and return the error to raise."""
    fatal = FatalError(f"{name} stopped: {_one_line(error)}")
    logger.critical(
        "%s; exiting so that the process manager restarts it",
        fatal,
        exc_info=None if isinstance(error, FatalError) else error,
    )
    return fatal


def watch(
    task: asyncio.Task[None],
    on_fatal: Callable[[FatalError], None],
    *,
    name: str | None = None,
    logger: logging.Logger | None = None,
) -> None:
    """Call ``on_fatal(error)`` when ``task`` ends with an exception (not when cancelled).

    A task run by :func:`supervise` ends with a :class:`FatalError` it already
    logged.  Any other exception (a task that is not a supervised loop died of
    a bug) is logged here as one critical line naming ``name``, and passed on
    as a :class:`FatalError`.
    """

    def done(t: asyncio.Task[None]) -> None:
        if t.cancelled():
            return
        error = t.exception()
        if error is None:
            return
        if not isinstance(error, FatalError):
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not ours
                return
            error = _fatal(name or t.get_name(), error, logger or logging.getLogger("convlog"))
        on_fatal(error)

    task.add_done_callback(done)


class Loops:
    """A process's background loops, under the one rule: the first fatal failure
    stops the process.

    Args:
        shutdown: the process's graceful, idempotent shutdown.
        logger: where the loops' lines go.
    """

    def __init__(self, shutdown: Callable[[], Awaitable[None]], logger: logging.Logger) -> None:
        self.fatal: FatalError | None = None
        self._shutdown = shutdown
        self._log = logger
        self._stopping: set[asyncio.Task[None]] = set()

    def start(
        self,
        run: Callable[[], Awaitable[None]],
        name: str,
        *,
        wake: asyncio.Event | None = None,
        give_up: Callable[[], bool] = lambda: False,
    ) -> asyncio.Task[None]:
        """Run ``run`` under :func:`supervise` in a task, and :meth:`watch` it."""
        task = asyncio.create_task(
            supervise(run, name, logger=self._log, wake=wake, give_up=give_up), name=name
        )
        self.watch(task)
        return task

    def watch(self, task: asyncio.Task[None], name: str | None = None) -> None:
        """Stop the process if ``task`` dies of an exception (see :func:`watch`)."""
        watch(task, self._fail, name=name, logger=self._log)

    def raise_if_failed(self) -> None:
        """Raise the first fatal failure, if any (after shutdown)."""
        if self.fatal is not None:
            raise self.fatal

    def _fail(self, error: FatalError) -> None:
        if self.fatal is None:
            self.fatal = error
            task = asyncio.get_running_loop().create_task(self._shutdown())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
