"""``convlog bench --sdk``: ``ConvlogSession`` side by side with the Agents SDK's ``SQLiteSession``.

One run measures both stores on the same machine with the same items:

* ``add_items`` throughput with 1 writer and with 16 concurrent writers (16
  session objects on one session id in one process);
* ``get_items(limit=50)`` throughput with 1 and with 16 concurrent readers;
* one session id written by 4 OS processes at once (each call adds a
  user/assistant pair), then read back and checked: items lost or doubled,
  a process's items out of its own order, pairs torn apart, calls that failed.

Like with like: the same items (a ~150-byte user message, and in the
process scenario a user/assistant pair per call) and both durable when a call
returns.  ``SQLiteSession`` is file-backed in a temporary directory (the
SDK's own multi-process story; WAL, and SQLite's default ``synchronous=FULL``,
so every commit is fsynced); ``ConvlogSession`` goes over NATS to a log
service that commits to SQLite the same way (WAL, ``synchronous=FULL``) and
hash-chains every item.  Each phase starts after one untimed call per session
object (opening the file, connecting, seeding the local copy).  Ratios are
ConvlogSession / SQLiteSession throughput, so above 1 means convlog is faster.

After the table, where a ConvlogSession call's time goes, for the single
writer and for the 4 processes (:mod:`.sdk_breakdown`); ``--json`` prints
every figure as one JSON object instead.

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
import json
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
from shared.config import Settings

from .measure import nearest_rank
from .sdk_breakdown import CallClock, ClientSplit, ServiceSplit, service_delta, service_sample
from .sdk_procs import PROCESSES, Workers, run_processes
from .sdk_report import READ_LIMIT, WRITERS, as_json, print_report
from .sdk_stores import ConvlogSessions, Sessions, SQLiteSessions, bench_item

__all__ = ["Measure", "main", "run_sdk_bench"]

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
        return nearest_rank(xs, q) * 1000


# -- measurements -------------------------------------------------------------


async def _timed(workers: int, calls: int, op: Callable[[int, int], Awaitable[Any]]) -> Measure:
    """Run ``workers`` concurrent loops of ``op(worker, i)``, ``calls`` calls in all
    (the first ``calls % workers`` loops make one more)."""
    latencies: list[float] = []
    errors = 0

    async def loop(w: int) -> None:
        nonlocal errors
        for i in range(calls // workers + (w < calls % workers)):
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


async def _in_process(
    stores: dict[str, Sessions], ops: int, run_id: str, stats_nc: Any = None
) -> tuple[dict[str, dict[str, Measure]], tuple[ClientSplit, ServiceSplit | None] | None]:
    """add_items and get_items throughput, 1 and 16 at a time, per store.

    Phase by phase, the stores back to back (in the order given), so a change
    in the machine's load between phases hits both sides of a ratio.  With
    ``stats_nc``, also where a single ConvlogSession writer's call goes.
    """
    out: dict[str, dict[str, Measure]] = {key: {} for key in stores}
    ones = {key: store.session(f"{run_id}-one") for key, store in stores.items()}
    manys = {key: [store.session(f"{run_id}-many") for _ in range(WRITERS)] for key, store in stores.items()}
    for key in stores:  # connect / open before the clock starts
        for s in [ones[key], *manys[key]]:
            await s.get_items(limit=1)
    split = None
    for key, one in ones.items():
        clock = CallClock()
        client = getattr(one, "client", None)
        if client is not None:
            client.observer = clock.observe
        before = await service_sample(stats_nc) if client is not None and stats_nc is not None else None
        out[key]["add_1"] = await _timed(
            1, ops, lambda w, i, one=one, clock=clock: clock.timed(lambda: one.add_items([bench_item("w0", i)])))
        if client is not None:
            client.observer = None
            after = await service_sample(stats_nc) if stats_nc is not None else None
            split = (clock.split, service_delta(before, after))
    for key, many in manys.items():
        out[key]["add_16"] = await _timed(
            WRITERS, ops, lambda w, i, many=many: many[w].add_items([bench_item(f"w{w}", i)]))
    # One read before the clock, as for the writes: a copy that stopped following
    # while nobody read (see shared.session_copy) follows again and seeds here.
    for key in stores:
        for s in [ones[key], *manys[key]]:
            await s.get_items(limit=READ_LIMIT)
    for key, one in ones.items():
        out[key]["get_1"] = await _timed(1, ops, lambda w, i, one=one: one.get_items(limit=READ_LIMIT))
    for key, many in manys.items():
        out[key]["get_16"] = await _timed(
            WRITERS, ops, lambda w, i, many=many: many[w].get_items(limit=READ_LIMIT))
    return out, split


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


async def _wait_for_log_service(url: str, timeout: float = 20.0, settings: Settings | None = None) -> None:  # noqa: ASYNC109
    client = await LogClient.connect(url, settings=settings)
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


async def run_sdk_bench(
    url: str | None, ops: int, out: TextIO, *, as_json_out: bool = False, settings: Settings | None = None
) -> dict[str, Any]:
    """Measure ConvlogSession against SQLiteSession and print the table to ``out``.

    Args:
        url: NATS URL of a running log service, or ``None`` to start a local
            nats-server and ``convlog log`` for the run.
        ops: calls per scenario (split across writers/processes where there are several).
        out: where the table goes.
        as_json_out: print the figures as one JSON object instead of the table.
        settings: the subject prefix and credentials of the log service at ``url``
            (its ``nats_url`` is not used; ignored without ``url``).

    Returns:
        ``{"sqlite": {...}, "convlog": {...}, "ops": ops, "sdk_version": ...,
        "breakdown": {...}}``: :class:`Measure` per in-process scenario and
        :class:`Mixing` under ``"processes"``; the breakdown of a
        ConvlogSession call, client and service side, for ``add_1`` and
        ``processes`` (see :mod:`.sdk_breakdown`).

    Raises:
        ImportError: the Agents SDK is missing (names ``pip install 'convlog[agents]'``).
    """
    agents = require_agents_sdk()
    run_id = f"sdkbench-{int(time.time() * 1000)}"
    results: dict[str, Any] = {"ops": ops, "sdk_version": getattr(agents, "__version__", "?")}
    with tempfile.TemporaryDirectory(prefix="convlog-sdk-bench-") as tmp:
        base = Path(tmp)
        workers = Workers()
        async with contextlib.AsyncExitStack() as stack:
            await workers.start()  # they import the SDK while the stack starts
            stack.push_async_callback(workers.stop)
            if url is None:
                url, settings = await stack.enter_async_context(_local_stack(base)), None
            else:
                await _wait_for_log_service(url, timeout=5, settings=settings)
            await workers.run_ready()
            stats = await LogClient.connect(url, name="convlog-sdk-bench-stats", settings=settings)
            stack.push_async_callback(stats.close)
            breakdown: dict[str, Any] = {}
            stores: dict[str, Sessions] = {"sqlite": SQLiteSessions(base / "sdk_sessions.db"),
                                           "convlog": ConvlogSessions(url, settings)}
            try:
                measured, breakdown["add_1"] = await _in_process(stores, ops, run_id, stats.nc)
            finally:
                for store in stores.values():
                    await store.close()
            results.update(measured)
            results["sqlite"]["processes"], _ = await run_processes(
                workers, "sqlite", str(base / "sdk_shared.db"), f"{run_id}-procs", ops)
            before = await service_sample(stats.nc)
            results["convlog"]["processes"], split_p = await run_processes(
                workers, "convlog", url, f"{run_id}-procs", ops, settings)
            breakdown["processes"] = (split_p, service_delta(before, await service_sample(stats.nc)))
            results["breakdown"] = breakdown
    if as_json_out:
        print(json.dumps(as_json(results), indent=2), file=out)
        out.flush()
    else:
        print_report(results, out)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.bench.sdk",
                                description="ConvlogSession vs the Agents SDK's SQLiteSession")
    p.add_argument("--url", help="NATS URL of a running log service (default: start a local stack)")
    p.add_argument("--ops", type=int, default=1000, help="calls per scenario (default 1000)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.ops < PROCESSES:
        p.error(f"--ops must be at least {PROCESSES}")
    started = time.monotonic()
    asyncio.run(run_sdk_bench(args.url, args.ops, sys.stdout, as_json_out=args.json))
    print(f"(run took {time.monotonic() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
