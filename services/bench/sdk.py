"""``convlog bench --sdk``: ``ConvlogSession`` side by side with the Agents SDK's ``SQLiteSession``.

One run measures both stores on the same machine with the same items:

* ``add_items`` throughput with 1 writer and with 16 concurrent writers (16
  session objects on one session id in one process);
* ``get_items(limit=50)`` throughput with 1 and with 16 concurrent readers;
* one session id written by 4 OS processes at once (each call adds a
  user/assistant pair), then read back and checked: items lost or doubled,
  a process's items out of its own order, pairs torn apart, calls that failed.

``SQLiteSession`` is file-backed in a temporary directory (the SDK's own
multi-process story); ``ConvlogSession`` goes over NATS to a log service that
commits durably to SQLite and hash-chains every item.  Ratios are
ConvlogSession / SQLiteSession throughput, so above 1 means convlog is faster.

With no URL, the bench starts its own embedded nats-server (port picked by the
server) and a ``convlog log`` subprocess on a temporary database, and stops
both afterwards.  Run it as ``python -m services.bench.sdk [--url URL]
[--ops N]``.  The four writer processes are :mod:`services.bench.sdk_procs`;
they start first, so their imports overlap the stack's start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from shared.agents_session import require_agents_sdk
from shared.client import LogClient

from .sdk_procs import PROCESSES, Workers, run_processes
from .sdk_stores import ConvlogSessions, Sessions, SQLiteSessions, bench_item

__all__ = ["Measure", "main", "run_sdk_bench"]

WRITERS = 16
READ_LIMIT = 50


@dataclass
class Measure:
    """Completed calls of one scenario, their wall time and per-call latencies (s)."""

    calls: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def pct_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


# -- measurements -------------------------------------------------------------


async def _timed(workers: int, calls_each: int, op: Callable[[int, int], Awaitable[Any]]) -> Measure:
    """Run ``workers`` concurrent loops of ``calls_each`` calls of ``op(worker, i)``."""
    latencies: list[float] = []
    errors = 0

    async def loop(w: int) -> None:
        nonlocal errors
        for i in range(calls_each):
            t0 = time.perf_counter()
            try:
                await op(w, i)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(workers)))
    return Measure(calls=len(latencies), seconds=time.perf_counter() - start,
                   latencies=latencies, errors=errors)


async def _in_process(store: Sessions, ops: int, run_id: str) -> dict[str, Measure]:
    """add_items and get_items throughput, 1 and 16 at a time, on one store."""
    out: dict[str, Measure] = {}
    one = store.session(f"{run_id}-one")
    await one.get_items(limit=1)  # connect / open before the clock starts
    out["add_1"] = await _timed(1, ops, lambda w, i: one.add_items([bench_item("w0", i)]))
    many = [store.session(f"{run_id}-many") for _ in range(WRITERS)]
    for s in many:
        await s.get_items(limit=1)
    per = max(1, ops // WRITERS)
    out["add_16"] = await _timed(WRITERS, per, lambda w, i: many[w].add_items([bench_item(f"w{w}", i)]))
    out["get_1"] = await _timed(1, ops, lambda w, i: one.get_items(limit=READ_LIMIT))
    out["get_16"] = await _timed(WRITERS, per, lambda w, i: many[w].get_items(limit=READ_LIMIT))
    return out


# -- the stack ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _local_stack(base: Path) -> AsyncIterator[str]:
    """An embedded nats-server and a ``convlog log`` subprocess; yields the NATS URL."""
    from services.cli.stack import EmbeddedNats, stop_process

    nats_server = EmbeddedNats(base / "nats", port=-1).start()
    log_proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "services.cli.main", "log", "--nats-url", nats_server.url,
         "--db", str(base / "convlog.db"), "--no-embedded", "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL,
    )
    try:
        await _wait_for_log_service(nats_server.url)
        yield nats_server.url
    finally:
        await asyncio.to_thread(stop_process, log_proc)
        nats_server.stop()


async def _wait_for_log_service(url: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    client = await LogClient.connect(url)
    client.deadline = 0.5
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                await client.read("sdk-bench-ready", tail=0)
                return
            except Exception:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await client.close()


# -- the report -----------------------------------------------------------------


def _ratio(convlog: float, sqlite: float) -> str:
    return f"{convlog / sqlite:.2f}x" if sqlite > 0 else "n/a"


def _report(results: dict[str, Any], out: TextIO) -> None:
    sq, cv = results["sqlite"], results["convlog"]
    rows: list[tuple[str, str, str, str]] = []
    labels = {
        "add_1": "add_items, 1 writer",
        "add_16": f"add_items, {WRITERS} writers",
        "get_1": f"get_items(limit={READ_LIMIT}), 1 reader",
        "get_16": f"get_items(limit={READ_LIMIT}), {WRITERS} readers",
    }
    for key, label in labels.items():
        a, b = sq[key], cv[key]
        rows.append((label + " (calls/s)", f"{a.rate:,.0f}", f"{b.rate:,.0f}", _ratio(b.rate, a.rate)))
        rows.append(("  latency p50 / p99 (ms)", f"{a.pct_ms(0.5):.2f} / {a.pct_ms(0.99):.2f}",
                     f"{b.pct_ms(0.5):.2f} / {b.pct_ms(0.99):.2f}", ""))
        if a.errors or b.errors:
            rows.append(("  failed calls", str(a.errors), str(b.errors), ""))
    a, b = sq["processes"], cv["processes"]
    rows.append((f"add_items, {PROCESSES} processes (calls/s)", f"{a.rate:,.0f}", f"{b.rate:,.0f}",
                 _ratio(b.rate, a.rate)))
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
          "ConvlogSession over NATS to the log service)", file=out)
    print(line(head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)
    out.flush()


async def run_sdk_bench(url: str | None, ops: int, out: TextIO) -> dict[str, Any]:
    """Measure ConvlogSession against SQLiteSession and print the table to ``out``.

    Args:
        url: NATS URL of a running log service, or ``None`` to start a local
            nats-server and ``convlog log`` for the run.
        ops: calls per scenario (split across writers/processes where there are several).
        out: where the table goes.

    Returns:
        ``{"sqlite": {...}, "convlog": {...}, "ops": ops, "sdk_version": ...}``:
        :class:`Measure` per in-process scenario and :class:`Mixing` under ``"processes"``.

    Raises:
        ImportError: the Agents SDK is missing (names ``pip install 'convlog[agents]'``).
    """
    agents = require_agents_sdk()
    run_id = f"sdkbench-{int(time.time() * 1000)}"
    per_process = max(1, ops // PROCESSES)
    results: dict[str, Any] = {"ops": ops, "sdk_version": getattr(agents, "__version__", "?")}
    with tempfile.TemporaryDirectory(prefix="convlog-sdk-bench-") as tmp:
        base = Path(tmp)
        workers = Workers()
        async with contextlib.AsyncExitStack() as stack:
            await workers.start()  # they import the SDK while the stack starts
            stack.push_async_callback(workers.stop)
            if url is None:
                url = await stack.enter_async_context(_local_stack(base))
            else:
                await _wait_for_log_service(url, timeout=5)
            await workers.run_ready()
            for key, store in (("sqlite", SQLiteSessions(base / "sdk_sessions.db")),
                               ("convlog", ConvlogSessions(url))):
                try:
                    results[key] = await _in_process(store, ops, run_id)
                finally:
                    await store.close()
            results["sqlite"]["processes"] = await run_processes(
                workers, "sqlite", str(base / "sdk_shared.db"), f"{run_id}-procs", per_process)
            results["convlog"]["processes"] = await run_processes(
                workers, "convlog", url, f"{run_id}-procs", per_process)
    _report(results, out)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.bench.sdk",
                                description="ConvlogSession vs the Agents SDK's SQLiteSession")
    p.add_argument("--url", help="NATS URL of a running log service (default: start a local stack)")
    p.add_argument("--ops", type=int, default=1000, help="calls per scenario (default 1000)")
    args = p.parse_args(argv)
    if args.ops < PROCESSES:
        p.error(f"--ops must be at least {PROCESSES}")
    started = time.monotonic()
    asyncio.run(run_sdk_bench(args.url, args.ops, sys.stdout))
    print(f"(run took {time.monotonic() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
