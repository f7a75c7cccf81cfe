"""Prometheus metrics for the log service and the workers (``prometheus_client``).

Served on ``--metrics-port`` (``CONVLOG_METRICS_PORT``; off unless set) at
``/metrics``.  Names follow Prometheus conventions: counters end in
``_total``, durations are ``_seconds`` histograms, sizes are ``_bytes``.

**Log service** (:class:`LogMetrics`, one per :class:`~services.log.service.LogService`):
its append path runs at ~12k appends/s on one event loop, so it records with
plain integer arithmetic on pre-built objects (a counter is ``+= 1``, a
histogram is one ``bisect`` into a list) and builds the Prometheus families
only when scraped (:meth:`LogMetrics.collect`).  Per-commit figures (batch
size, commit and fsync time) are observed once per batch.  With metrics off
the service holds :data:`NO_LOG_METRICS`, whose methods do nothing.

The fan-out tracker (:class:`Fanout`) runs whether metrics are on or not:
``convlog health`` reads it from ``$SRV.STATS``, and it costs one deque
operation per commit batch.

**Workers** (module-level objects in :data:`WORKER_REGISTRY`): turns, model
calls, tools and handoffs happen hundreds of times a second at most, so they
use ``prometheus_client``'s own Counter/Histogram/Gauge, always counted;
only the HTTP endpoint depends on the setting.
"""

from __future__ import annotations

from .log import NO_LOG_METRICS, CommitTally, Fanout, LogMetrics, log_metrics, watch_store
from .server import MetricsServer, close, serve
from .worker import (
    UNKNOWN_TOOL,
    WORKER_REGISTRY,
    delivered,
    instrument_model,
    sample_consumer,
    tool_called,
    turn_done,
    turn_failed,
)

__all__ = [
    "NO_LOG_METRICS",
    "UNKNOWN_TOOL",
    "WORKER_REGISTRY",
    "CommitTally",
    "Fanout",
    "LogMetrics",
    "MetricsServer",
    "close",
    "delivered",
    "instrument_model",
    "log_metrics",
    "sample_consumer",
    "serve",
    "tool_called",
    "turn_done",
    "turn_failed",
    "watch_store",
]
