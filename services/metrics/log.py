"""The log service's metrics: cheap enough for the append path (see :mod:`services.metrics`)."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from services.cli.storage import read_only_uri

from .server import MetricsServer, serve

__all__ = ["NO_LOG_METRICS", "CommitTally", "Fanout", "LogMetrics", "log_metrics", "watch_store"]

log = logging.getLogger("convlog.metrics")

ENDPOINTS = ("append", "read", "sessions", "in")
# Request and commit durations, in nanoseconds (converted to seconds when scraped).
_NS_BOUNDS = tuple(int(s * 1e9) for s in (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
))
_BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _Hist:
    """A histogram cheap enough for the append path: one bisect, two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[int]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0

    def observe(self, value: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self, scale: float) -> tuple[list[tuple[str, float]], float]:
        counts = list(self.counts)  # one snapshot: the loop thread keeps adding
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound * scale), total))
        return out, self.sum * scale


class Fanout:
    """How far the items subjects are behind the log (outbox lag).

    A commit listener notes each batch's last global position and when it
    committed; ``published()`` gives the outbox's position.  Lag is the
    positions committed but not yet published, and the age of the oldest of
    them.  Batches committed within 0.1 s of each other share one entry, so
    a stuck outbox grows this by at most ten entries a second.
    """

    def __init__(self, published: Callable[[], int]) -> None:
        self._published = published
        self._committed = 0
        self._batches: deque[list[float]] = deque()  # [last position, monotonic time]
        # lag() is also called from the scrape thread: both trim, and without the lock
        # one popped from a deque the other had just emptied (IndexError: a failed
        # scrape, or a commit listener's error, which stops the log service).
        self._lock = threading.Lock()

    def on_commit(self, committed: Sequence[Any]) -> None:
        now = time.monotonic()
        with self._lock:
            self._committed = committed[-1].position
            batches = self._batches
            if batches and now - batches[-1][1] < 0.1:
                batches[-1][0] = self._committed
            else:
                batches.append([self._committed, now])
            published = self._published()
            while batches and batches[0][0] <= published:
                batches.popleft()

    def lag(self) -> tuple[int, float]:
        """(items, seconds) the items subjects are behind the log."""
        with self._lock:
            published = self._published()
            batches = self._batches
            while batches and batches[0][0] <= published:
                batches.popleft()
            if not batches:
                return 0, 0.0
            return max(0, self._committed - published), time.monotonic() - batches[0][1]

    def stats(self) -> dict[str, Any]:
        items, seconds = self.lag()
        return {"fanout_lag_items": items, "fanout_lag_seconds": round(seconds, 3),
                "committed_position": self._committed, "published_position": self._published()}


class _NoLogMetrics:
    """Metrics off: every hook is a no-op."""

    port: int | None = None

    def request(self, endpoint: str, ns: int) -> None:
        pass

    def replied(self, endpoint: str, headers: dict[str, str] | None) -> None:
        pass

    def commit(self, items: int, commit_ns: int, fsync_ns: int | None) -> None:
        pass

    def start(self, service: Any, fanout: Fanout) -> None:
        pass

    def stop(self) -> None:
        pass


NO_LOG_METRICS = _NoLogMetrics()


class LogMetrics(_NoLogMetrics):
    """The log service's metrics, collected on scrape (see the module docstring).

    Hooks, called on the service's event loop: :meth:`request` (each answered
    request's seconds by endpoint), :meth:`replied` (each reply: appends by
    outcome, errors by endpoint and code), :meth:`commit` (once per store
    commit batch).
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = {name: _Hist(_NS_BOUNDS) for name in ENDPOINTS}
        self.appends_ok = 0
        self.errors: dict[tuple[str, str], int] = {}  # (endpoint, code) -> replies
        self.batch_items = _Hist(_BATCH_BOUNDS)
        self.commit_ns = _Hist(_NS_BOUNDS)
        self.fsync_ns = _Hist(_NS_BOUNDS)
        self._service: Any = None
        self._fanout: Fanout | None = None
        self._server: MetricsServer | None = None
        self._published_base = 0
        self.registry.register(self)

    # -- hooks (hot) --
    def request(self, endpoint: str, ns: int) -> None:
        hist = self.requests.get(endpoint)
        if hist is not None:
            hist.observe(ns)

    def replied(self, endpoint: str, headers: dict[str, str] | None) -> None:
        if not headers:
            if endpoint == "append":
                self.appends_ok += 1
            return
        from shared.errors import ERROR_HEADER

        key = (endpoint, headers.get(ERROR_HEADER, "unavailable").partition(":")[0])
        self.errors[key] = self.errors.get(key, 0) + 1

    def commit(self, items: int, commit_ns: int, fsync_ns: int | None) -> None:
        self.batch_items.observe(items)
        self.commit_ns.observe(commit_ns)
        if fsync_ns is not None:
            self.fsync_ns.observe(fsync_ns)

    # -- lifecycle --
    def start(self, service: Any, fanout: Fanout) -> None:
        self._service, self._fanout = service, fanout
        # Count positions, not publishes: a window republished after a lost
        # ack is deduplicated by the stream and must not count twice.
        outbox = getattr(service, "outbox", None)
        self._published_base = outbox.published_position if outbox is not None else 0
        self._server = serve(self.settings, self.registry, "log service")
        self.port = self._server.port if self._server else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # -- scrape (prometheus_client's HTTP thread) --
    def collect(self) -> Iterator[Any]:
        appends = CounterMetricFamily(
            "convlog_log_appends", "Append requests answered, by outcome and error code",
            labels=["outcome", "code"])
        appends.add_metric(["ok", ""], self.appends_ok)
        errors = CounterMetricFamily(
            "convlog_log_request_errors", "Error replies, by endpoint and error code",
            labels=["endpoint", "code"])
        for (endpoint, code), n in sorted(self.errors.items()):
            errors.add_metric([endpoint, code], n)
            if endpoint == "append":
                appends.add_metric(["error", code], n)
        yield appends
        yield errors
        seconds = HistogramMetricFamily(
            "convlog_log_request_seconds",
            "From a request's arrival to its reply being queued, by endpoint", labels=["endpoint"])
        for name, hist in self.requests.items():
            buckets, total = hist.buckets(1e-9)
            seconds.add_metric([name], buckets, total)
        yield seconds
        for name, doc, hist, scale in (
            ("convlog_log_commit_batch_items", "Items written per store commit batch",
             self.batch_items, 1.0),
            ("convlog_log_commit_seconds", "One commit batch: decide, write, COMMIT",
             self.commit_ns, 1e-9),
            ("convlog_log_fsync_seconds", "The COMMIT (its fsync) of one batch", self.fsync_ns, 1e-9),
        ):
            fam = HistogramMetricFamily(name, doc)
            buckets, total = hist.buckets(scale)
            fam.add_metric([], buckets, total)
            yield fam
        if self._fanout is not None:
            items, lag = self._fanout.lag()
            yield GaugeMetricFamily("convlog_log_fanout_lag_items",
                                    "Committed items not yet published on the items subjects", items)
            yield GaugeMetricFamily("convlog_log_fanout_lag_seconds",
                                    "Age of the oldest committed item not yet published", lag)
        outbox = getattr(self._service, "outbox", None)
        if outbox is not None:
            yield CounterMetricFamily("convlog_log_published_items",
                                      "Committed envelopes the items stream confirmed, since start",
                                      max(0, outbox.published_position - self._published_base))
        yield from _store_gauges(getattr(getattr(self._service, "store", None), "path", None))


def _store_gauges(path: Path | None) -> Iterator[Any]:
    """Sessions and bytes on disk of a SQLite store (read-only, from the scrape thread);
    nothing for another store (the JetStream store's ``path`` is a label, not a file)."""
    if not isinstance(path, Path):
        return
    size = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            size += Path(f"{path}{suffix}").stat().st_size
    yield GaugeMetricFamily("convlog_log_store_bytes", "Size of the store on disk (with its WAL)", size)
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True, timeout=1.0)
        try:
            (n,) = conn.execute("SELECT count(*) FROM sessions").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        log.debug("metrics: cannot count sessions: %s", e)
        return
    yield GaugeMetricFamily("convlog_log_sessions", "Sessions in the log", n)


class CommitTally:
    """Running totals of the store's commit batches (always on: a few adds per batch).

    Shown in ``$SRV.STATS`` as the append endpoint's data, so a bench can
    tell, from two samples, how many commits a phase took, how many items
    each carried and how long the writes and their fsyncs took.
    """

    def __init__(self, forward: Callable[[int, int, int | None], None]) -> None:
        self._forward = forward
        self.commits = 0
        self.items = 0
        self.commit_ns = 0
        self.fsync_ns = 0

    def __call__(self, items: int, commit_ns: int, fsync_ns: int | None) -> None:
        self.commits += 1
        self.items += items
        self.commit_ns += commit_ns
        if fsync_ns is not None:
            self.fsync_ns += fsync_ns
        self._forward(items, commit_ns, fsync_ns)

    def stats(self) -> dict[str, int]:
        return {"commits": self.commits, "commit_items": self.items,
                "commit_ns": self.commit_ns, "fsync_ns": self.fsync_ns}


def watch_store(store: Any, metrics: _NoLogMetrics) -> CommitTally:
    """Have the store's group committer report each batch to ``metrics`` (both
    stores commit through :class:`~services.log.store.committer.GroupCommitter`),
    through the :class:`CommitTally` returned."""
    tally = CommitTally(metrics.commit)
    committer = getattr(store, "_committer", None)
    if committer is not None and hasattr(committer, "observe_commit"):
        committer.observe_commit = tally
    return tally


def log_metrics(settings: Any) -> _NoLogMetrics:
    """:class:`LogMetrics` when ``settings.metrics_port`` is set, else the no-op."""
    return LogMetrics(settings) if getattr(settings, "metrics_port", None) is not None else NO_LOG_METRICS
