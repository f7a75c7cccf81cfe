"""The one place a store is chosen from settings (``CONVLOG_STORE``), and opened."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.js.errors

from shared.client import connect_options
from shared.config import Settings
from shared.errors import UnavailableError
from shared.startup import START_WAIT, heals_at_start, refused, wait_at_start

from .base import LogStore

__all__ = ["OPEN_WAIT", "make_store", "open_store"]

log = logging.getLogger("convlog.log")

#: Seconds :func:`open_store` waits for a store that is briefly unavailable (a
#: JetStream cluster started with the service, still electing its leaders).
OPEN_WAIT = START_WAIT


def make_store(settings: Settings, *, stop: asyncio.Event | None = None) -> LogStore:
    """The store ``settings.store`` names: ``sqlite`` (default) or ``jetstream``
    (``stop`` set ends its first connect to NATS: a shutdown begun)."""
    if settings.store == "jetstream":
        from .jetstream import JetStreamStore

        return JetStreamStore(
            connect_options(settings, name="convlog-log-store"),
            subjects=settings.subjects,
            replicas=settings.stream_replicas,
            shards=settings.shards,
            max_batch=settings.commit_batch,
            timeout=settings.request_timeout,
            nats_seam=settings.nats_seam,
            stop=stop,
        )
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.db_path, max_batch=settings.commit_batch)


async def open_store(store: LogStore, wait: float = OPEN_WAIT, *,
                     stopping: Callable[[], bool] = lambda: False) -> None:
    """Open ``store``, trying again for up to ``wait`` seconds while it is
    unavailable for a reason that heals by itself (the cause is transient, see
    :func:`shared.failures.is_transient`, or the cluster's peers are still
    starting, see :func:`shared.failures.heals_at_start`); anything else is
    raised at once, and so is any failure once ``stopping()`` is true.

    Raises:
        UnavailableError: still unavailable after ``wait`` seconds.
        ConfigError: JetStream refused to set up the store for a reason that does not
            heal (replicas on a server that is not clustered, subjects another stream
            takes).
    """

    def heals(e: BaseException) -> bool:
        return isinstance(e, UnavailableError) and e.__cause__ is not None and heals_at_start(e.__cause__)

    try:
        await wait_at_start(store.open, what="the store", log=log, within=wait, heals=heals, stopping=stopping)
    except UnavailableError as e:
        cause = e.__cause__
        if isinstance(cause, nats.js.errors.APIError) and not heals_at_start(cause):
            raise refused("the store", cause) from cause  # JetStream refused: a setting, exit 2
        raise
