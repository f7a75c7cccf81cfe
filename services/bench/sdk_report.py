"""The SDK bench's report: the side-by-side table, where a call's time goes, and JSON."""

from __future__ import annotations

import math
from typing import Any, TextIO

from .measure import plain
from .sdk_breakdown import ClientSplit, ServiceSplit
from .sdk_procs import PROCESSES

__all__ = ["LABELS", "as_json", "print_report"]

WRITERS = 16
READ_LIMIT = 50

LABELS = {
    "add_1": "add_items, 1 writer",
    "add_16": f"add_items, {WRITERS} writers",
    "get_1": f"get_items(limit={READ_LIMIT}), 1 reader",
    "get_16": f"get_items(limit={READ_LIMIT}), {WRITERS} readers",
}


def _ratio(convlog: float, sqlite: float) -> float | None:
    return round(convlog / sqlite, 3) if sqlite > 0 else None


def _ms(seconds: float, n: int) -> float:
    return seconds / n * 1000 if n else math.nan


def _breakdown_rows(client: ClientSplit, service: ServiceSplit | None) -> list[tuple[str, float]]:
    """(label, ms per call) rows for one phase of sequential calls."""
    n = client.calls
    timed = client.requests if client.before or client.round_trip else 0
    rows = [("call, start to return", _ms(client.total, n))]
    if timed:
        rows += [
            ("  prepare, encode, publish", _ms(client.before, timed)),
            ("  round trip (publish to reply)", _ms(client.round_trip, timed)),
        ]
        if service is not None and service.appends:
            in_service = service.append_s / service.appends
            rows.append(("    in the log service (arrival to reply queued)", in_service * 1000))
            if service.commits:  # a store that reports its commits
                rows += [
                    ("      its commit batch (decide, write, COMMIT)",
                     _ms(service.commit_s, service.commits)),
                    ("        of which the COMMIT (fsync)", _ms(service.fsync_s, service.commits)),
                ]
            rows.append(("    NATS and scheduling (the rest)",
                         _ms(client.round_trip, timed) - in_service * 1000))
        rows.append(("  reply decode, local copy update", _ms(client.after, timed)))
    return rows


def breakdown_json(client: ClientSplit, service: ServiceSplit | None) -> dict[str, Any]:
    out: dict[str, Any] = {"client": client.to_dict(), "service": service.to_dict() if service else None}
    out["ms_per_call"] = {label.strip(): round(v, 4) for label, v in _breakdown_rows(client, service)}
    if service is not None and service.commits:
        out["appends_per_commit"] = round(service.appends / service.commits, 2)
        out["items_per_commit"] = round(service.commit_items / service.commits, 2)
    return out


def _print_breakdown(results: dict[str, Any], out: TextIO) -> None:
    phases = [(k, v) for k, v in results.get("breakdown", {}).items() if v is not None]
    if not phases:
        return
    names = {"add_1": "1 writer", "processes": f"{PROCESSES} processes"}
    print("", file=out)
    print("Where a ConvlogSession.add_items call's time goes (mean ms per call, measured stamps):",
          file=out)
    tables = {k: _breakdown_rows(*v) for k, v in phases}
    labels = [label for label, _ in max(tables.values(), key=len)]
    width = max(len(label) for label in labels)
    print("  ".join([" " * width, *(f"{names.get(k, k):>12}" for k, _ in phases)]).rstrip(), file=out)
    for label in labels:
        cells = []
        for k, _ in phases:
            value = dict(tables[k]).get(label)
            cells.append(f"{value:12.3f}" if value is not None else " " * 12)
        print("  ".join([label.ljust(width), *cells]).rstrip(), file=out)
    for k, (_client, service) in phases:
        if service is not None and service.commits:
            print(f"  {names.get(k, k)}: {service.appends / service.commits:.2f} appends "
                  f"({service.commit_items / service.commits:.1f} items) per commit", file=out)


def print_report(results: dict[str, Any], out: TextIO) -> None:
    """The table of both stores side by side, then the breakdown."""
    sq, cv = results["sqlite"], results["convlog"]
    rows: list[tuple[str, str, str, str]] = []
    for key, label in LABELS.items():
        a, b = sq[key], cv[key]
        r = _ratio(b.rate, a.rate)
        rows.append((label + " (calls/s)", f"{a.rate:,.0f}", f"{b.rate:,.0f}", f"{r:.2f}x" if r else "n/a"))
        rows.append(("  latency p50 / p99 (ms)", f"{a.pct_ms(0.5):.2f} / {a.pct_ms(0.99):.2f}",
                     f"{b.pct_ms(0.5):.2f} / {b.pct_ms(0.99):.2f}", ""))
        if a.errors or b.errors:
            rows.append(("  failed calls", str(a.errors), str(b.errors), ""))
    a, b = sq["processes"], cv["processes"]
    r = _ratio(b.rate, a.rate)
    rows.append((f"add_items, {PROCESSES} processes (calls/s)", f"{a.rate:,.0f}", f"{b.rate:,.0f}",
                 f"{r:.2f}x" if r else "n/a"))
    rows.append(("  items found / expected", f"{a.found} / {a.expected}", f"{b.found} / {b.expected}", ""))
    rows.append(("  lost / doubled", f"{a.lost} / {a.doubled}", f"{b.lost} / {b.doubled}", ""))
    rows.append(("  out of order / torn pairs", f"{a.out_of_order} / {a.torn}",
                 f"{b.out_of_order} / {b.torn}", ""))
    rows.append(("  failed calls", str(a.failed_calls), str(b.failed_calls), ""))
    head = ("scenario", "SQLiteSession", "ConvlogSession", "convlog/sqlite")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

    def line(r: tuple[str, str, str, str]) -> str:
        cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        return "  ".join(cells).rstrip()

    print(f"Agents SDK sessions, {results['ops']} calls per scenario "
          f"(openai-agents {results['sdk_version']}; SQLiteSession on a local file, "
          "ConvlogSession over NATS to the log service; both commit with fsync)", file=out)
    print(line(head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)
    _print_breakdown(results, out)
    out.flush()


def _measure_json(m: Any) -> dict[str, Any]:
    return {"calls": m.calls, "seconds": round(m.seconds, 4), "calls_per_s": round(m.rate, 1),
            "p50_ms": round(m.pct_ms(0.5), 4), "p99_ms": round(m.pct_ms(0.99), 4), "errors": m.errors}


def _mixing_json(m: Any) -> dict[str, Any]:
    return {"calls": m.calls, "seconds": round(m.seconds, 4), "calls_per_s": round(m.rate, 1),
            "expected": m.expected, "found": m.found, "lost": m.lost, "doubled": m.doubled,
            "out_of_order": m.out_of_order, "torn": m.torn, "failed_calls": m.failed_calls}


def as_json(results: dict[str, Any]) -> dict[str, Any]:
    """The figures of :func:`print_report` as one JSON object (``ratio`` = convlog / sqlite;
    a figure with nothing to measure, such as the p50 of a scenario whose calls all failed, is null)."""
    sq, cv = results["sqlite"], results["convlog"]
    scenarios: dict[str, Any] = {}
    for key in LABELS:
        scenarios[key] = {"sqlite": _measure_json(sq[key]), "convlog": _measure_json(cv[key]),
                          "ratio": _ratio(cv[key].rate, sq[key].rate)}
    scenarios["processes"] = {"sqlite": _mixing_json(sq["processes"]), "convlog": _mixing_json(cv["processes"]),
                              "ratio": _ratio(cv["processes"].rate, sq["processes"].rate)}
    return plain({
        "bench": "sdk",
        "ops": results["ops"],
        "sdk_version": results["sdk_version"],
        "writers": WRITERS,
        "read_limit": READ_LIMIT,
        "processes": PROCESSES,
        "scenarios": scenarios,
        "ratios": {k: v["ratio"] for k, v in scenarios.items()},
        "breakdown": {k: breakdown_json(*v) if v is not None else None
                      for k, v in results.get("breakdown", {}).items()},
    })
