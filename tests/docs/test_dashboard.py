"""``deploy/grafana/convlog.json`` queries only metrics the code exports, and shows all of them.

The exported names come from a real log service (metrics on, port 0) and the
workers' registry, as ``prometheus_client`` exposes them (``_total`` for
counters; ``_bucket``/``_sum``/``_count`` for histograms).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.registry import CollectorRegistry

from services.log.service import LogService
from services.metrics import WORKER_REGISTRY
from shared.config import load_settings
from tests.support.natsd import NatsServer

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "convlog.json"
METRIC = re.compile(r"\bconvlog_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            yield panel["title"], target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            yield f"variable {var['name']}", var["definition"]


def exported(registry: CollectorRegistry) -> dict[str, str]:
    """Sample name -> family name, for every family the registry collects."""
    out = {}
    for family in registry.collect():
        for suffix in SUFFIXES[family.type]:
            out[family.name + suffix] = family.name
    return out


async def log_service_exports(options: dict[str, Any]) -> dict[str, str]:
    """:func:`exported` of a real log service (these settings, metrics on) and the workers."""
    service = LogService(load_settings({**options, "metrics_port": 0}, environ={}))
    await service.start()
    try:
        return {**exported(service.metrics.registry), **exported(WORKER_REGISTRY)}
    finally:
        await service.shutdown()


async def test_every_dashboard_query_names_an_exported_metric(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    names = await log_service_exports({"nats_url": nats_server.url, "db": str(tmp_path / "log.db")})
    assert len({f for f in names.values()}) >= 20

    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for where, expr in queries(dashboard):
        found = METRIC.findall(expr)
        assert found, f"{where}: {expr!r} names no convlog metric"
        for name in found:
            assert name in names, f"{where}: {name} is not exported (exported: {sorted(names)})"
            used.add(names[name])
    # ...and the dashboard leaves none out.
    assert sorted(set(names.values()) - used) == []


def test_dashboard_panels_use_the_datasource_variable_and_do_not_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "convlog"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps another panel"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


SQLITE_ONLY = "SQLite store only"


async def test_what_the_jetstream_store_does_not_export_is_said_so_and_no_panel_is_left_empty(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A log service on the JetStream store exports no outbox counter and no SQLite file
    gauges: the README's metrics table says so on each such row, and every log-service
    panel still draws something there, or says it is the SQLite store's.

    The "Published items / s" panel queried only ``convlog_log_published_items_total``,
    which the JetStream store never exports (no outbox): it showed "No data" there, and
    the README row did not say why."""
    names = await log_service_exports({"nats_url": nats_server.url, "data_dir": str(tmp_path),
                                       "store": "jetstream"})
    assert "convlog_log_appends_total" in names

    readme = (DASHBOARD.parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `convlog_log_")]
    assert len(rows) >= 5
    for row in rows:
        cell = row.split("|")[1]
        missing = [m for m in re.findall(r"`(convlog_[a-z0-9_]+)`", cell)
                   if m not in names and m not in set(names.values())]
        if missing:
            assert SQLITE_ONLY in row, f"README: {missing} are not exported with the JetStream store: {row}"

    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] == "row" or "convlog_log_" not in json.dumps(panel["targets"]):
            continue
        drawn = [t["expr"] for t in panel["targets"] if all(m in names for m in METRIC.findall(t["expr"]))]
        assert drawn or SQLITE_ONLY in panel.get("description", ""), (
            f"panel {panel['title']!r} shows no data with the JetStream store and does not say so")
