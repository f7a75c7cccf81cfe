"""``convlog bench --metrics-cost``: durable appends/s with metrics off vs on, same run.

One private nats-server and two ``convlog log`` processes on it, identical
but for ``CONVLOG_METRICS_PORT`` (prefixes ``benchoff`` and ``benchon``, each
its own SQLite file and items stream).  The same closed-loop load
(``--writers`` over ``--sessions``) alternates between them, off-on then
on-off, ``--rounds`` times, so drift on a shared machine hits both alike; during
every "on" phase ``/metrics`` is scraped once a second, more often than a
Prometheus server would.  Reports each phase, the ratio of the mean
appends/s, and (on Linux) each log service's CPU time per append, which a
busy shared machine disturbs far less than throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from shared.client import LogClient
from shared.config import Settings

from .appends import payload
from .measure import Run, closed_loop, say, to_json
from .stack import wait_service

__all__ = ["run_metrics_cost"]

_PORT_LINE = re.compile(r"log service metrics on http://[^:]+:(\d+)/metrics")


@contextlib.contextmanager
def _two_services(base: Path) -> Iterator[tuple[str, int, dict[str, int]]]:
    """nats-server + a log service per prefix; yields (NATS URL, the "on" service's
    metrics port, {prefix: PID})."""
    from services.cli.stack import EmbeddedNats, stop_process

    nats_server = EmbeddedNats(base / "nats", port=-1).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for prefix in ("benchoff", "benchon"):
            extra = {"CONVLOG_METRICS_PORT": "0"} if prefix == "benchon" else {}
            with open(base / f"{prefix}.log", "wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "services.cli.main", "log", "--nats-url", nats_server.url,
                     "--prefix", prefix, "--db", str(base / f"{prefix}.db"), "--no-embedded"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env={**env, **extra},
                ))
        deadline = time.monotonic() + 20
        while not (m := _PORT_LINE.search((base / "benchon.log").read_text(errors="replace"))):
            if time.monotonic() > deadline or procs[1].poll() is not None:
                raise RuntimeError("the metrics-on log service did not start:\n"
                                   + (base / "benchon.log").read_text(errors="replace"))
            time.sleep(0.05)
        yield nats_server.url, int(m.group(1)), {"benchoff": procs[0].pid, "benchon": procs[1].pid}
    finally:
        for proc in procs:
            stop_process(proc)
        nats_server.stop()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _scraping(port: int, stop: asyncio.Event) -> int:
    scrapes = 0
    while not stop.is_set():
        def get() -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                r.read()

        await asyncio.to_thread(get)
        scrapes += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await stop.wait()
    return scrapes


async def run_metrics_cost(args: argparse.Namespace) -> str:
    """Run the comparison; returns the report text."""
    data = payload(args.item_size)
    phase = max(1.0, args.duration / 2)
    with tempfile.TemporaryDirectory(prefix="convlog-metrics-bench-") as tmp, \
            _two_services(Path(tmp)) as (url, port, pids):
        clients = {}
        for prefix in ("benchoff", "benchon"):
            clients[prefix] = await LogClient.connect(
                url, name=f"convlog-bench-{prefix}", settings=Settings(nats_url=url, prefix=prefix))
            await wait_service(clients[prefix])
        sids = [f"m-{i}" for i in range(args.sessions)]
        runs: dict[str, list[Run]] = {"benchoff": [], "benchon": []}
        scrapes = 0
        cpu: dict[str, list[float]] = {"benchoff": [], "benchon": []}  # service CPU s per append
        warm_up = min(2.0, phase)
        try:
            for rnd in range(args.rounds + 1):  # round 0 warms both up and is not counted
                # off-on, then on-off: neither side always runs right after the other
                for prefix in ("benchoff", "benchon")[:: 1 if rnd % 2 else -1]:
                    client = clients[prefix]

                    def op(i: int, client: LogClient = client) -> object:
                        return client.append(sids[i % len(sids)], [{"agent": "user", "data": data}])

                    cpu_before = _cpu_seconds(pids[prefix])
                    stop = asyncio.Event()
                    scraper = asyncio.create_task(_scraping(port, stop)) if prefix == "benchon" else None
                    label = "warm-up" if rnd == 0 else f"round {rnd}"
                    say(f"{label}: metrics {'on ' if scraper else 'off'}, {args.writers} writers, "
                            f"{phase if rnd else warm_up:.0f}s ...")
                    run = await closed_loop(f"metrics {'on' if scraper else 'off'}, {label}", op,
                                            args.writers, phase if rnd else warm_up)
                    stop.set()
                    if scraper is not None:
                        scrapes += await scraper
                    cpu_after = _cpu_seconds(pids[prefix])
                    if rnd:
                        runs[prefix].append(run)
                        if cpu_before is not None and cpu_after is not None and run.ops:
                            cpu[prefix].append((cpu_after - cpu_before) / run.ops)
        finally:
            for client in clients.values():
                await client.close()
    off = statistics.mean(r.rate for r in runs["benchoff"])
    on = statistics.mean(r.rate for r in runs["benchon"])
    if not off:  # the ratio's baseline
        raise RuntimeError(f"the metrics-off log service acknowledged no append "
                           f"({sum(r.errors for r in runs['benchoff'])} failed): no ratio to report")
    if getattr(args, "json", False):
        cpu_us = {k: round(sum(v) / len(v) * 1e6, 2) if v else None for k, v in cpu.items()}
        return to_json("metrics-cost", {"off": runs["benchoff"], "on": runs["benchon"]}, writers=args.writers,
                       sessions=args.sessions, rounds=args.rounds, on_vs_off=round(on / off, 3) if off else None,
                       scrapes=scrapes, cpu_us_per_append={"off": cpu_us["benchoff"], "on": cpu_us["benchon"]})
    lines = [f"convlog bench --metrics-cost: {args.writers} writers x {args.sessions} sessions, "
             f"{args.item_size}-byte items, {args.rounds} rounds of {phase:.0f}s per side, "
             f"{os.cpu_count()} cores",
             f"{'phase':<28} {'appends/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"]
    for off_run, on_run in zip(runs["benchoff"], runs["benchon"], strict=True):
        for r in (off_run, on_run):
            lines.append(f"{r.name:<28} {r.rate:>10.0f} {r.pct(0.5):>8.2f} {r.pct(0.99):>8.2f} "
                         f"{r.errors:>6}")
    lines.append(f"mean appends/s: metrics off {off:.0f}, on {on:.0f}: on / off = {on / off:.3f} "
                 f"({(1 - on / off) * 100:+.1f}% fewer with metrics on; {scrapes} scrapes)")
    if cpu["benchoff"] and cpu["benchon"]:
        off_us = sum(cpu["benchoff"]) / len(cpu["benchoff"]) * 1e6
        on_us = sum(cpu["benchon"]) / len(cpu["benchon"]) * 1e6
        lines.append(f"log service CPU per append: metrics off {off_us:.1f} us, on {on_us:.1f} us: "
                     f"on / off = {on_us / off_us:.3f}")
    return "\n".join(lines)
