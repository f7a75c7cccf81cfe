"""What every convlog process does once at start, on NATS JetStream: open its
store, create the streams and buckets it needs if missing, and wait while a
cluster started with it is still electing leaders or placing them.

One rule (:func:`wait_at_start`): a failure that heals (:func:`heals_at_start`:
transient, or the cluster's peers still starting) is tried again with backoff
for up to :data:`START_WAIT` seconds, with one log line when the wait begins
and one when it ends; a refusal that does not heal is one clear line
(``ConfigError``, exit 2), and NATS still failing at the end is
``UnavailableError`` (exit 3).  Creating what may already exist goes through
:func:`create_or_find`, so a refusal is reported as itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from .config import ConfigError
from .errors import UnavailableError
from .failures import is_transient, wait_for

__all__ = ["PEERS_OFFLINE", "START_WAIT", "create_or_find", "heals_at_start", "require_jetstream", "wait_at_start"]

_T = TypeVar("_T")


#: JetStream's "no suitable peers for placement, peer offline": a replicated
#: stream or bucket cannot be placed until the cluster's other servers are up.
PEERS_OFFLINE = 10005

#: JetStream's "jetstream not enabled for account" (a 503, so it looks transient).
JS_NOT_ENABLED_FOR_ACCOUNT = 10039

#: Seconds a process waits at start for what it needs on NATS JetStream (a
#: cluster started with it, still electing its leaders or placing a stream).
START_WAIT = 60.0


def heals_at_start(exc: BaseException) -> bool:
    """Worth waiting for while a process starts: a transient failure
    (:func:`is_transient`; a JetStream API request that timed out while the
    cluster elects its leaders is one), or a cluster whose peers are still
    starting."""
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == PEERS_OFFLINE:
        return True
    return is_transient(exc)


async def wait_at_start(
    attempt: Callable[[], Awaitable[_T]], *, what: str, log: logging.Logger, within: float = START_WAIT,
    heals: Callable[[BaseException], bool] = heals_at_start, stopping: Callable[[], bool] = lambda: False,
) -> _T:
    """:func:`wait_for` with one warning at the first wait
    (``waiting for WHAT (up to N s): cause``) and one when it is there.
    For the setup every process does once at start: ``attempt`` must be safe
    to run again after a failure (create-if-missing, open), and a coroutine
    function (tenacity calls anything else without awaiting what it returns).
    Once ``stopping()`` is true (a shutdown began), a failure ends the wait.

    Raises:
        UnavailableError: NATS still failing after ``within`` seconds.
        ConfigError: JetStream refused for a reason that does not heal (a
            replicated stream on a server that is not clustered, a limit).
        whatever else ``attempt`` raises, as it is (its own errors, bugs).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    waited = False

    def waiting(n: int, _waited: float, failure: BaseException) -> None:
        nonlocal waited
        if n == 0:
            waited = True
            log.warning("waiting for %s (up to %.0f s): %s", what, within, _describe(failure))

    try:
        result = await wait_for(attempt, within=within, heals=lambda e: not stopping() and heals(e),
                                waiting=waiting)
    except nats.js.errors.APIError as e:
        if heals(e):  # it would have healed: out of time
            raise UnavailableError(f"cannot set up {what} within {within:g} s: {_describe(e)}") from e
        raise refused(what, e) from e
    except (nats.errors.Error, TimeoutError, ConnectionError) as e:
        raise UnavailableError(f"cannot set up {what}: NATS did not answer within {within:g} s "
                               f"({_describe(e)})") from e
    if waited:
        log.warning("%s: ready after %.1f s", what, loop.time() - started)
    return result


#: What to do about a refusal at start, by JetStream error code.
_REFUSAL_HINTS = {
    10074: "; CONVLOG_STREAM_REPLICAS above 1 needs a NATS cluster (set it to 1 for one server)",
}


def refused(what: str, e: nats.js.errors.APIError) -> ConfigError:
    """JetStream's refusal to set up ``what``, as the configuration error it is (exit 2),
    with what to do about it where that is known."""
    return ConfigError(f"cannot set up {what}: {e.description} (JetStream error {e.err_code})"
                       f"{_REFUSAL_HINTS.get(e.err_code or 0, '')}")


async def require_jetstream(nc: Client, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a request's
    """Ask JetStream for this account's information; refuse, as the configuration
    error it is (exit 2), a NATS server without JetStream or an account without it,
    which no wait heals (both look like "service unavailable").

    Raises:
        ConfigError: the server has no JetStream (nobody answers its API), or
            JetStream is not enabled for this account.
        nats.errors.Error / nats.js.errors.Error: anything else (a cluster still
            starting), for :func:`wait_at_start` to wait out.
    """
    try:
        await nc.jetstream(timeout=timeout).account_info()
    except nats.js.errors.ServiceUnavailableError as e:
        url = nc.connected_url.netloc if nc.connected_url else "?"
        if e.err_code == JS_NOT_ENABLED_FOR_ACCOUNT:
            raise ConfigError(f"JetStream is not enabled for this account on the NATS server at {url}: "
                              "enable it for the account in the server's configuration") from e
        # No responders: a server with JetStream answers its API even while its cluster
        # elects (an error with a code, waited out); nobody answering means none is on.
        if e.err_code is None:
            raise ConfigError(f"the NATS server at {url} has no JetStream: start it with -js "
                              "(or a jetstream block in its configuration)") from e
        raise


def _describe(exc: BaseException) -> str:
    """``Type: message`` (a timeout's message is often empty)."""
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


async def create_or_find(create: Callable[[], Awaitable[_T]], find: Callable[[], Awaitable[_T]]) -> _T:
    """``create()`` a stream or bucket; if JetStream refuses it as a bad request
    (another process created it meanwhile, perhaps with another configuration),
    what ``find()`` finds.  When there is nothing to find, the refusal itself
    is raised (an R3 stream on a server that is not clustered, peers offline),
    not a "not found" that hides why."""
    try:
        return await create()
    except nats.js.errors.BadRequestError as refused:
        try:
            return await find()
        except nats.js.errors.NotFoundError:
            raise refused from None
