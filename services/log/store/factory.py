"""The one place a store is chosen from settings (``CONVLOG_STORE``)."""

from __future__ import annotations

from shared.client import connect_options
from shared.config import Settings

from .base import LogStore

__all__ = ["make_store"]


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
