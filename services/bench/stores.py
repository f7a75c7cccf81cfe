"""``convlog bench --store jetstream``: the JetStream store next to SQLite and
to raw JetStream publishes, in one run.

Every case runs on its own private stack of embedded nats-servers with
``sync_interval: always`` (every acknowledged write is fsynced), one node
(R1) or three local nodes in a cluster (R3), plus ``convlog log --store
...``, measured with the same phases as ``convlog bench`` (echo baseline,
closed-loop appends, latency at half load, replay).  The raw baselines
publish the same bodies straight to a file stream with ``js.publish`` (one
PubAck per message) from the same number of writers: the R1 one is what
every figure is a ratio to; the R3 one is shown next to the R3 cases.

Cases (``--store jetstream``): raw R1, raw R3, SQLite, JetStream R1 on 1 and
2 shards, JetStream R3 on 1 and 2 shards.  ``--store sqlite``: raw R1 and
SQLite only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.js.api import StorageType, StreamConfig

from .appends import payload, report, run_bench
from .measure import Run, closed_loop, figures, fsync_latency, open_loop, to_json
from .measure import say as _stderr

__all__ = ["cmd_store_bench"]

_SYNC_ALWAYS = "jetstream {\n  sync_interval: always\n}\n"


@dataclass(frozen=True)
class Case:
    """One stack to measure: a store (None: raw publishes), nodes and shards."""

    key: str
    label: str
    store: str | None
    nodes: int = 1
    shards: int = 1


CASES = [
    Case("raw", "raw js.publish R1", None),
    Case("raw_r3", "raw js.publish R3 (3 local nodes)", None, nodes=3),
    Case("sqlite", "SQLite store", "sqlite"),
    Case("jetstream_r1", "JetStream store R1, 1 shard", "jetstream"),
    Case("jetstream_r1_2shards", "JetStream store R1, 2 shards", "jetstream", shards=2),
    Case("jetstream_r3", "JetStream store R3, 1 shard", "jetstream", nodes=3),
    Case("jetstream_r3_2shards", "JetStream store R3, 2 shards", "jetstream", nodes=3, shards=2),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _servers(base: Path, nodes: int) -> Iterator[list[str]]:
    """``nodes`` embedded nats-servers fsyncing every write (a cluster when > 1)."""
    from services.cli.stack import EmbeddedNats

    started: list[EmbeddedNats] = []
    cluster_ports = [_free_port() for _ in range(nodes)] if nodes > 1 else []
    try:
        for n in range(nodes):
            d = base / f"n{n + 1}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "nats.conf"
            text = _SYNC_ALWAYS
            if nodes > 1:
                routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cluster_ports)
                text += (f"server_name: bench-n{n + 1}\ncluster {{\n  name: bench\n"
                         f"  listen: 127.0.0.1:{cluster_ports[n]}\n  routes: [{routes}]\n}}\n")
            conf.write_text(text)
            started.append(EmbeddedNats(d / "nats", port=-1, config=conf).start())
        yield [s.url for s in started]
    finally:
        for s in started:
            s.stop()


async def _jetstream_ready(urls: list[str], within: float = 30.0) -> None:
    """Wait until JetStream answers on every node (a cluster elects its meta leader)."""
    end = time.monotonic() + within
    for url in urls:
        while True:
            try:
                nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
                try:
                    await nc.jetstream(timeout=2).account_info()
                    break
                finally:
                    await nc.close()
            except Exception:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.25)


@contextlib.contextmanager
def _log_service(base: Path, url: str, case: Case) -> Iterator[None]:
    from services.cli.stack import stop_process

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update(CONVLOG_SHARDS=str(case.shards), CONVLOG_STREAM_REPLICAS=str(case.nodes))
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "log", "--nats-url", url,
         "--db", str(base / "bench.db"), "--store", str(case.store), "--no-embedded", "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL, env=env,
    )
    try:
        yield
    finally:
        stop_process(proc)


async def raw_publish(urls: list[str], args: argparse.Namespace, label: str) -> dict[str, Run]:
    """Closed loop and half load of plain ``js.publish`` to a file stream."""
    nc = await nats.connect(urls)
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(StreamConfig(
            name="RAW", subjects=["raw.>"], storage=StorageType.FILE, num_replicas=len(urls)))
        body = msgspec.json.encode({"items": [{"agent": "user", "data": payload(args.item_size)}]})
        sessions = max(1, args.sessions)

        async def op(i: int) -> Any:
            return await js.publish(f"raw.s{i % sessions}", body)

        _stderr(f"{label}: {args.writers} writers, {args.duration:.0f}s ...")
        full = await closed_loop(f"{label}, sync always", op, args.writers, args.duration)
        half = max(1.0, full.rate / 2)
        at_half = await open_loop(f"{label} at half load ({half:.0f}/s)", op, half, args.duration)
        return {"append": full, "half": at_half}
    finally:
        await nc.close()


async def _measure(case: Case, base: Path, args: argparse.Namespace) -> dict[str, Run]:
    with _servers(base, case.nodes) as urls:
        await _jetstream_ready(urls)
        if case.store is None:
            return await raw_publish(urls, args, case.label)
        with _log_service(base, ",".join(urls), case):
            return await run_bench(args, urls[0])


def _row(label: str, r: Run, base: float) -> str:
    lat = f"{r.pct(0.5):8.2f} {r.pct(0.99):8.2f}" if r.latencies else f"{'':>8} {'':>8}"
    return f"{label:<36} {r.rate:>9.0f} {r.rate / base:>7.2f} {lat} {r.errors:>6}"


async def cmd_store_bench(args: argparse.Namespace) -> int:
    wanted = {"raw", "sqlite"} if args.store == "sqlite" else {c.key for c in CASES}
    if getattr(args, "cases", None):
        wanted = {"raw", *args.cases}
    cases = [c for c in CASES if c.key in wanted]
    measured: dict[str, dict[str, Run]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="convlog-store-bench-") as tmp:
        fsync_before = fsync_latency(tmp)
        for case in cases:
            _stderr(f"-- {case.label} --")
            measured[case.key] = await _measure(case, Path(tmp) / case.key, args)
        fsync_after = fsync_latency(tmp)
    load_after = os.getloadavg()
    base = measured["raw"]["append"].rate or 1.0
    ratios = {k: round(r["append"].rate / base, 3) for k, r in measured.items()}
    if args.json:
        print(to_json(
            "store", {k: {phase: figures(r) for phase, r in runs.items()} for k, runs in measured.items()},
            writers=args.writers, sessions=args.sessions, item_size=args.item_size, duration_s=args.duration,
            cases={c.key: {"label": c.label, "store": c.store, "nodes": c.nodes, "shards": c.shards} for c in cases},
            appends_vs_raw_r1=ratios, load_average={"before": load_before[0], "after": load_after[0]},
            fsync_us={"before": fsync_before, "after": fsync_after},
        ))
        return 0
    lines = [
        f"convlog bench --store {args.store}: {args.writers} writers x {args.sessions} sessions, "
        f"{args.item_size}-byte items, {args.duration:g}s phases, sync_interval: always, {os.cpu_count()} cores, "
        f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}, this disk's fsync p50 "
        f"{fsync_before['p50_us']:.0f} -> {fsync_after['p50_us']:.0f} µs",
        f"{'case':<36} {'acks/s':>9} {'x raw':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}   (closed loop)",
    ]
    for case in cases:
        lines.append(_row(case.label, measured[case.key]["append"], base))
    lines.append(f"\n{'at half load':<36} {'acks/s':>9} {'x raw':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for case in cases:
        lines.append(_row(case.label, measured[case.key]["half"], base))
    lines.append("load generator: each half-load append started late by at most (p99 / max ms) "
                 + ", ".join(f"{c.key} {measured[c.key]['half'].pct(0.99, measured[c.key]['half'].late):.1f} / "
                             f"{measured[c.key]['half'].pct(1.0, measured[c.key]['half'].late):.1f}" for c in cases))
    lines.append(f"\n{'replay':<36} {'items/s':>9}")
    for case in cases:
        if "replay" in measured[case.key]:
            lines.append(f"{case.label:<36} {measured[case.key]['replay'].rate:>9.0f}")
    details = [f"[{c.label}]\n" + report(measured[c.key], args) for c in cases if c.store is not None]
    print("\n".join(lines) + "\n\n" + "\n\n".join(details))
    return 0
