"""The cheap parts of the log service's metrics: histogram buckets and the fan-out tracker."""

from __future__ import annotations

import sys
import threading
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from services.log.store.base import Committed
from services.metrics.log import Fanout, _Hist


def test_cheap_histogram_buckets_match_prometheus_client() -> None:
    bounds = (1, 2, 5, 10)
    values = [0, 1, 1, 2, 3, 5, 7, 10, 11, 1000]
    ours = _Hist(bounds)
    registry = CollectorRegistry()
    theirs = Histogram("h", "h", buckets=bounds, registry=registry)
    for v in values:
        ours.observe(v)
        theirs.observe(v)
    buckets, total = ours.buckets(1.0)
    expected = {s.labels["le"]: s.value for s in next(iter(registry.collect())).samples
                if s.name == "h_bucket"}
    assert {float(le) if le != "+Inf" else le: n for le, n in buckets} == \
        {float(le) if le != "+Inf" else le: n for le, n in expected.items()}
    assert total == sum(values)
    assert b'h_bucket{le="1.0"} 3.0' in generate_latest(registry)  # le is inclusive: 0, 1, 1


def test_fanout_lag_follows_the_outbox_and_coalesces_batches() -> None:
    published = 0
    fanout = Fanout(lambda: published)
    assert fanout.lag() == (0, 0.0)

    fanout.on_commit([Committed(1, "s", 1, b"{}"), Committed(2, "s", 2, b"{}")])
    fanout.on_commit([Committed(3, "t", 1, b"{}")])  # within 0.1 s: the same entry
    assert len(fanout._batches) == 1
    items, seconds = fanout.lag()
    assert items == 3 and seconds >= 0.0

    published = 2  # the outbox is inside the entry: its age still counts
    assert fanout.lag()[0] == 1
    published = 3
    assert fanout.lag() == (0, 0.0)
    assert not fanout._batches

    time.sleep(0.12)
    fanout.on_commit([Committed(4, "s", 3, b"{}")])
    time.sleep(0.12)
    before = time.monotonic()
    fanout.on_commit([Committed(5, "s", 4, b"{}")])
    assert len(fanout._batches) == 2
    published = 4  # the older entry is trimmed on the next commit or look
    items, seconds = fanout.lag()
    assert items == 1 and seconds <= time.monotonic() - before  # the age of item 5's entry
    stats = fanout.stats()
    assert stats.pop("fanout_lag_seconds") >= 0
    assert stats == {"fanout_lag_items": 1, "committed_position": 5, "published_position": 4}


def test_fanout_lag_read_by_scrape_threads_while_commits_trim_it() -> None:
    # A scrape (prometheus_client's HTTP thread) reads the lag while the event loop
    # commits: both trimmed the deque, and one popped from or indexed a deque the other
    # had just emptied (IndexError: a scrape answered 500, or a commit listener failed).
    state = {"published": 0}
    fanout = Fanout(lambda: state["published"])
    errors: list[BaseException] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            try:
                fanout.lag()
                fanout.stats()
            except Exception as e:  # noqa: BLE001 - any failure of a scrape is the bug
                errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as a busy machine may
    scrapers = [threading.Thread(target=scrape) for _ in range(2)]
    for t in scrapers:
        t.start()
    try:
        end = time.monotonic() + 2.0
        position = 0
        while time.monotonic() < end and not errors:
            position += 1
            state["published"] = position - 1  # the outbox just behind: each commit trims
            try:
                fanout.on_commit([Committed(position, "s", position, b"{}")])
            except Exception as e:  # noqa: BLE001
                errors.append(e)
    finally:
        stop.set()
        for t in scrapers:
            t.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
