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


async def test_every_dashboard_query_names_an_exported_metric(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"),
                              "metrics_port": 0}, environ={})
    service = LogService(settings)
    await service.start()
    try:
        names = {**exported(service.metrics.registry), **exported(WORKER_REGISTRY)}
    finally:
        await service.shutdown()
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
