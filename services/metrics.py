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

import asyncio
import contextlib
import logging
import sqlite3
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from shared import tracing

__all__ = [
    "NO_LOG_METRICS",
    "WORKER_REGISTRY",
    "close",
    "delivered",
    "Fanout",
    "LogMetrics",
    "MetricsServer",
    "instrument_model",
    "log_metrics",
    "sample_consumer",
    "serve",
    "tool_called",
    "turn_done",
    "turn_failed",
    "watch_store",
]

log = logging.getLogger("convlog.metrics")

ENDPOINTS = ("append", "read", "sessions", "in")
# Request and commit durations, in nanoseconds (converted to seconds when scraped).
_NS_BOUNDS = tuple(int(s * 1e9) for s in (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
))
_BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class MetricsServer:
    """The ``/metrics`` HTTP endpoint (a thread of ``prometheus_client``)."""

    def __init__(self, port: int, addr: str, registry: Collector) -> None:
        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(settings: Any, registry: Collector, what: str) -> MetricsServer | None:
    """Serve ``registry`` when ``settings.metrics_port`` is set; log where."""
    port = getattr(settings, "metrics_port", None)
    if port is None:
        return None
    try:
        server = MetricsServer(port, "0.0.0.0", registry)
    except OSError as e:
        # Serving the log matters more than exposing metrics: say so loudly and go on.
        log.error("%s: cannot serve metrics on port %d (CONVLOG_METRICS_PORT / --metrics-port; "
                  "each process needs its own port): %s; running without metrics", what, port, e)
        return None
    log.info("%s metrics on http://0.0.0.0:%d/metrics", what, server.port)
    return server


def close(server: MetricsServer | None) -> None:
    """Stop serving (``None``: metrics were off)."""
    if server is not None:
        server.close()


# -- the log service ------------------------------------------------------------------------------


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

    def on_commit(self, committed: Sequence[Any]) -> None:
        now = time.monotonic()
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
    """Sessions and bytes on disk of a SQLite store (read-only, from the scrape thread)."""
    if path is None:
        return
    size = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            size += Path(f"{path}{suffix}").stat().st_size
    yield GaugeMetricFamily("convlog_log_store_bytes", "Size of the store on disk (with its WAL)", size)
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            (n,) = conn.execute("SELECT count(*) FROM sessions").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        log.debug("metrics: cannot count sessions: %s", e)
        return
    yield GaugeMetricFamily("convlog_log_sessions", "Sessions in the log", n)


def watch_store(store: Any, metrics: _NoLogMetrics) -> None:
    """Have the store's group committer report each batch to ``metrics`` (both
    stores commit through :class:`~services.log.store.committer.GroupCommitter`)."""
    committer = getattr(store, "_committer", None)
    if committer is not None and hasattr(committer, "observe_commit"):
        committer.observe_commit = metrics.commit


def log_metrics(settings: Any) -> _NoLogMetrics:
    """:class:`LogMetrics` when ``settings.metrics_port`` is set, else the no-op."""
    return LogMetrics(settings) if getattr(settings, "metrics_port", None) is not None else NO_LOG_METRICS


# -- workers --------------------------------------------------------------------------------------

WORKER_REGISTRY = CollectorRegistry(auto_describe=True)
_TURN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

TURNS = Counter("convlog_worker_turns", "Turn parts this worker ran, by agent and outcome "
                "(replied, handed_off, failed, done, retry, error)", ["agent", "outcome"],
                registry=WORKER_REGISTRY)
TURN_SECONDS = Histogram("convlog_worker_turn_seconds", "One agent's part of a turn, start to end",
                         ["agent"], buckets=_TURN_BUCKETS, registry=WORKER_REGISTRY)
MODEL_SECONDS = Histogram("convlog_worker_model_call_seconds", "One model call, retries included",
                          ["agent", "model", "outcome"], buckets=_TURN_BUCKETS,
                          registry=WORKER_REGISTRY)
MODEL_TOKENS = Counter("convlog_worker_model_tokens", "Tokens the model server reported, by kind",
                       ["agent", "model", "kind"], registry=WORKER_REGISTRY)
TOOL_CALLS = Counter("convlog_worker_tool_calls", "Function tool calls, by tool and outcome",
                     ["agent", "tool", "outcome"], registry=WORKER_REGISTRY)
HANDOFFS = Counter("convlog_worker_handoffs", "Handoffs written, from one agent to another",
                   ["from_agent", "to_agent"], registry=WORKER_REGISTRY)
REDELIVERIES = Counter("convlog_worker_redeliveries", "Envelopes delivered to this worker again "
                       "(JetStream redelivery)", ["agent"], registry=WORKER_REGISTRY)
CONSUMER_PENDING = Gauge("convlog_worker_consumer_pending", "The agent consumer's envelopes not "
                         "yet delivered", ["agent"], registry=WORKER_REGISTRY)
CONSUMER_ACK_PENDING = Gauge("convlog_worker_consumer_ack_pending", "The agent consumer's envelopes "
                             "delivered and not yet acked", ["agent"], registry=WORKER_REGISTRY)
CONSUMER_REDELIVERED = Gauge("convlog_worker_consumer_redelivered", "The agent consumer's envelopes "
                             "redelivered and not yet acked", ["agent"], registry=WORKER_REGISTRY)


def turn_done(agent: str, result: Any, started: float) -> None:
    """A part of a turn ended with ``result`` (a :class:`~services.worker.turn.TurnResult`)."""
    TURNS.labels(agent, result.outcome).inc()
    TURN_SECONDS.labels(agent).observe(time.perf_counter() - started)
    if result.handoff_to:
        HANDOFFS.labels(agent, result.handoff_to).inc()


def turn_failed(agent: str, outcome: str) -> None:
    """A delivery ended without a result: ``retry`` (nak'd) or ``error`` (unexpected)."""
    TURNS.labels(agent, outcome).inc()


def delivered(agent: str, msg: Any) -> None:
    """Count a redelivery (``num_delivered`` > 1) of a JetStream message."""
    with contextlib.suppress(Exception):
        if (msg.metadata.num_delivered or 1) > 1:
            REDELIVERIES.labels(agent).inc()


def tool_called(agent: str, tool: str, output: str) -> None:
    """A function tool returned ``output`` (failures are outputs starting ``error:``)."""
    outcome = "ok"
    if output.startswith("error:"):
        outcome = "timeout" if "did not finish within" in output else "error"
    TOOL_CALLS.labels(agent, tool, outcome).inc()


class _TimedModel:
    """A :class:`~services.worker.model.ModelClient` that records each call."""

    def __init__(self, model: Any, agent: str) -> None:
        self._model = model
        self._agent = agent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    async def complete(self, *, model: str, messages: Any, tools: Any) -> Any:
        started = time.perf_counter()
        outcome = "error"
        try:
            reply = await tracing.traced("convlog.model_call", None, self._model.complete(
                model=model, messages=messages, tools=tools), agent=self._agent, model=model)
            outcome = "ok"
        finally:
            MODEL_SECONDS.labels(self._agent, model, outcome).observe(time.perf_counter() - started)
        for kind in ("input", "output"):
            n = getattr(reply, f"{kind}_tokens", None)
            if n:
                MODEL_TOKENS.labels(self._agent, model, kind).inc(n)
        return reply


def instrument_model(model: Any, agent: str) -> Any:
    """``model`` with each ``complete`` call timed and its tokens counted."""
    return _TimedModel(model, agent)


def sample_consumer(settings: Any, nc: Any, stream: str, consumer: str, agent: str,
                    interval: float = 5.0) -> asyncio.Task[None]:
    """A task refreshing the consumer gauges every ``interval`` s while metrics are
    served; it ends when the connection closes."""

    async def run() -> None:
        if getattr(settings, "metrics_port", None) is None:
            return
        js = nc.jetstream()
        while not nc.is_closed:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(stream, consumer)
                CONSUMER_PENDING.labels(agent).set(info.num_pending or 0)
                CONSUMER_ACK_PENDING.labels(agent).set(info.num_ack_pending or 0)
                CONSUMER_REDELIVERED.labels(agent).set(info.num_redelivered or 0)
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(run(), name=f"metrics-consumer-{agent}")
