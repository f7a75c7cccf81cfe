"""The one place a store is chosen from settings (``CONVLOG_STORE``), and opened."""

from __future__ import annotations

import logging

import nats.js.errors

from shared.client import connect_options
from shared.config import Settings
from shared.errors import UnavailableError
from shared.failures import is_transient, wait_for

from .base import LogStore

__all__ = ["OPEN_WAIT", "make_store", "open_store"]

log = logging.getLogger("convlog.log")

#: Seconds :func:`open_store` waits for a store that is briefly unavailable (a
#: JetStream cluster started with the service, still electing its leaders).
OPEN_WAIT = 60.0

#: JetStream's "no suitable peers for placement, peer offline": a replicated
#: stream cannot be placed until the cluster's other servers are up.
_PEERS_OFFLINE = 10005


def _heals(cause: BaseException | None) -> bool:
    """Worth waiting for at start: a transient failure, or peers still starting."""
    if cause is None:
        return False
    if isinstance(cause, nats.js.errors.APIError) and cause.err_code == _PEERS_OFFLINE:
        return True
    return is_transient(cause)


def make_store(settings: Settings) -> LogStore:
    """The store ``settings.store`` names: ``sqlite`` (default) or ``jetstream``."""
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
        )
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.db_path, max_batch=settings.commit_batch)


async def open_store(store: LogStore, wait: float = OPEN_WAIT) -> None:
    """Open ``store``, trying again for up to ``wait`` seconds while it is
    unavailable for a reason that heals by itself (the cause is transient, see
    :func:`shared.failures.is_transient`, or the cluster's peers are still
    starting); anything else is raised at once.

    Raises:
        UnavailableError: still unavailable after ``wait`` seconds.
    """

    def waiting(n: int, waited: float, failure: BaseException) -> None:
        if n == 0:
            log.warning("waiting for the store (up to %.0f s): %s", wait, failure)

    await wait_for(store.open, within=wait, waiting=waiting,
                   heals=lambda e: isinstance(e, UnavailableError) and _heals(e.__cause__))
