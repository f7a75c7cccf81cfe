"""``convlog bench --store jetstream``: the JetStream store next to SQLite and
to raw JetStream publishes, in one run.

Each store runs on its own private stack (an embedded nats-server with
``sync_interval: always``, so every acknowledged write is fsynced, and
``convlog log --store ...``), measured with the same phases as
``convlog bench`` (echo baseline, closed-loop appends, latency at half load,
replay).  The raw baseline publishes the same bodies straight to a R1 file
stream with ``js.publish`` (one PubAck per message) from the same number of
writers: the ceiling an append on JetStream cannot beat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.js.api import StorageType, StreamConfig

from .appends import payload, report, run_bench
from .measure import Run, closed_loop, open_loop
from .measure import say as _stderr

__all__ = ["cmd_store_bench"]

_SYNC_ALWAYS = "jetstream {\n  sync_interval: always\n}\n"


@contextlib.contextmanager
def store_stack(base: Path, store: str | None) -> Iterator[str]:
    """An embedded nats-server fsyncing every write, plus ``convlog log
    --store STORE`` unless ``store`` is None."""
    from services.cli.stack import EmbeddedNats, stop_process

    base.mkdir(parents=True, exist_ok=True)
    conf = base / "nats.conf"
    conf.write_text(_SYNC_ALWAYS)
    server = EmbeddedNats(base / "nats", port=-1, config=conf).start()
    log_proc = None
    try:
        if store is not None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
            log_proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "log", "--nats-url", server.url,
                 "--db", str(base / "bench.db"), "--store", store, "--no-embedded", "--log-level", "WARNING"],
                stdin=subprocess.DEVNULL, env=env,
            )
        yield server.url
    finally:
        if log_proc is not None:
            stop_process(log_proc)
        server.stop()


async def raw_publish(url: str, args: argparse.Namespace) -> dict[str, Run]:
    """Closed loop and half load of plain ``js.publish`` to a R1 file stream."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(StreamConfig(name="RAW", subjects=["raw.>"], storage=StorageType.FILE, num_replicas=1))
        body = msgspec.json.encode({"items": [{"agent": "user", "data": payload(args.item_size)}]})
        sessions = max(1, args.sessions)

        async def op(i: int) -> Any:
            return await js.publish(f"raw.s{i % sessions}", body)

        _stderr(f"raw JetStream publish: {args.writers} writers, {args.duration:.0f}s ...")
        full = await closed_loop("raw js.publish, R1, sync always", op, args.writers, args.duration)
        half = max(1.0, full.rate / 2)
        at_half = await open_loop(f"raw js.publish at half load ({half:.0f}/s)", op, half, args.duration)
        return {"raw": full, "raw_half": at_half}
    finally:
        await nc.close()


def _figures(r: Run) -> dict[str, Any]:
    out: dict[str, Any] = {"name": r.name, "ops_per_s": round(r.rate, 1), "errors": r.errors}
    if r.latencies:
        out.update(p50_ms=round(r.pct(0.5), 2), p99_ms=round(r.pct(0.99), 2), p999_ms=round(r.pct(0.999), 2))
    return out


async def cmd_store_bench(args: argparse.Namespace) -> int:
    stores = ["jetstream", "sqlite"] if args.store == "jetstream" else [args.store]
    tables: list[str] = []
    rates: dict[str, float] = {}
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="convlog-store-bench-") as tmp:
        with store_stack(Path(tmp) / "raw", None) as url:
            raw = await raw_publish(url, args)
        for store in stores:
            _stderr(f"-- store {store} --")
            with store_stack(Path(tmp) / store, store) as url:
                results = await run_bench(args, url)
            rates[store] = results["append"].rate
            measured[store] = {k: _figures(r) for k, r in results.items()}
            tables.append(f"[store: {store}]\n" + report(results, args))
    if args.json:
        summary_json = {s: round(rate / raw["raw"].rate, 3) for s, rate in rates.items()}
        print(json.dumps({
            "writers": args.writers, "sessions": args.sessions, "item_size": args.item_size,
            "duration_s": args.duration, "cores": os.cpu_count(),
            "raw": {k: _figures(r) for k, r in raw.items()}, "stores": measured,
            "appends_vs_raw_publish": summary_json,
        }, indent=2))
        return 0
    lines = [f"[raw JetStream publish baseline, sync_interval: always, {os.cpu_count()} cores]"]
    for r in raw.values():
        lines.append(
            f"{r.name:<44} {r.rate:>10.0f} {'':>10} {r.pct(0.5):8.2f} {r.pct(0.99):8.2f} {r.pct(0.999):8.2f} {r.errors:>6}"
        )
    out = ["\n".join(lines), *tables]
    base = raw["raw"].rate
    summary = [f"{s} appends/s / raw publish/s: {rate / base:.2f}" for s, rate in rates.items()]
    print("\n\n".join([*out, "\n".join(summary)]))
    return 0
