"""What every convlog bench measures with: a phase's operations and latencies,
closed-loop and open-loop load generators, and their figures as JSON (``--json``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Run", "closed_loop", "figures", "fsync_latency", "losses_exit_code", "nearest_rank", "open_loop", "plain",
           "say", "to_json"]


def nearest_rank(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (sorted, not empty) by nearest rank: the smallest
    value with at least ``q`` of the values at or below it, so the p99 of 100
    values is the 99th, not the largest, and the p50 of 1..4 is 2."""
    return xs[max(0, min(len(xs), math.ceil(q * len(xs) - 1e-9)) - 1)]


@dataclass
class Run:
    """One measured phase: completed operations and their latencies (seconds)."""

    name: str
    ops: int
    seconds: float
    latencies: list[float]
    errors: int = 0
    #: open loop only: how late each operation started after its scheduled
    #: time (seconds): the load generator's own lag, if it could not keep up
    late: list[float] = field(default_factory=list)
    #: seconds waited before the phase for the previous one's work to finish
    #: (the items stream's copies, the notice reconciler), if it was waited for
    settled_after: float | None = None

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def pct(self, q: float, of: list[float] | None = None) -> float:
        """The ``q`` quantile of the latencies (or of ``of``), in ms."""
        xs = sorted(self.latencies if of is None else of)
        if not xs:
            return float("nan")
        return nearest_rank(xs, q) * 1000


def fsync_latency(directory: str | os.PathLike[str], writes: int = 200) -> dict[str, float]:
    """This disk's fsync latency (µs): ``writes`` appends of a few hundred
    bytes to a scratch file in ``directory``, each followed by an fsync.

    With ``sync_interval: always`` a JetStream server fsyncs every message it
    stores (the log, the items stream's copy), so on a shared machine its
    latency figures follow this disk's from one run to the next: the store
    bench reports it next to the load average.
    """
    if writes < 1:
        raise ValueError("writes must be at least 1")
    times: list[float] = []
    fd, path = tempfile.mkstemp(prefix="convlog-fsync-", dir=directory)
    try:
        for _ in range(writes):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 300)
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    return {"p50_us": round(nearest_rank(times, 0.5) * 1e6), "p90_us": round(nearest_rank(times, 0.9) * 1e6)}


#: seconds the open loop waits, after its last send, for operations still running
OPEN_LOOP_DRAIN_S = 30.0


def say(msg: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(msg, file=sys.stderr, flush=True)


def losses_exit_code(counts: dict[str, int]) -> int:
    """The exit code of a bench that counted what it lost (``counts``: {"lost": n, ...}):
    1, with one line naming the non-zero counts on stderr, when any is non-zero (the
    figures are printed, but a script must not take the run for a success); else 0."""
    bad = [f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if v]
    if not bad:
        return 0
    print(f"convlog bench: {', '.join(bad)}", file=sys.stderr, flush=True)
    return 1


async def closed_loop(
    name: str, op: Callable[[int], Awaitable[Any]], writers: int, duration: float
) -> Run:
    """``writers`` coroutines each issuing ``op`` back to back for ``duration`` s."""
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def writer(w: int) -> None:
        nonlocal errors
        i = 0
        task = asyncio.current_task()
        while time.perf_counter() < stop_at:
            if task is not None and task.cancelling():
                # A cancel (SIGTERM) that an op swallowed: Python 3.11's wait_for, inside
                # nats-py's request, returns a reply that lands with the cancel and drops it.
                raise asyncio.CancelledError
            t0 = time.perf_counter()
            try:
                await op(w * 1_000_000 + i)
            except Exception:
                errors += 1
                continue
            lat.append(time.perf_counter() - t0)
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return Run(name, len(lat), time.perf_counter() - t0, lat, errors)


async def open_loop(name: str, op: Callable[[int], Awaitable[Any]], rate: float, duration: float) -> Run:
    """Issue ``op`` at a fixed ``rate`` per second (latency at a given load).

    Latency runs from each operation's scheduled time, not from when it was
    sent, so a stalled service is not hidden by the generator waiting for it
    (no coordinated omission); how late each operation actually started is
    kept too (:attr:`Run.late`), so a generator that cannot keep up shows.
    """
    lat: list[float] = []
    late: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, t_sched: float) -> None:
        nonlocal errors
        late.append(time.perf_counter() - t_sched)
        try:
            await op(i)
        except Exception:
            errors += 1
            return
        lat.append(time.perf_counter() - t_sched)

    start = time.perf_counter()
    n = int(rate * duration)
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one(i, due))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=OPEN_LOOP_DRAIN_S)
        # Not done by then: failed operations, stopped here rather than left
        # running into the next phase (and out of every figure).
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        errors += len(pending)
    return Run(name, len(lat), time.perf_counter() - start, lat, errors, late)


def figures(r: Run) -> dict[str, Any]:
    """One phase's figures: rate, errors and latency percentiles (ms)."""
    out: dict[str, Any] = {"name": r.name, "ops_per_s": round(r.rate, 1), "ops": r.ops, "errors": r.errors}
    if r.latencies:
        out.update(p50_ms=round(r.pct(0.5), 2), p99_ms=round(r.pct(0.99), 2), p999_ms=round(r.pct(0.999), 2))
    if r.late:
        out.update(sent_late_p99_ms=round(r.pct(0.99, r.late), 2), sent_late_max_ms=round(r.pct(1.0, r.late), 2))
    if r.settled_after is not None:
        out["settled_after_s"] = round(r.settled_after, 2)
    return out


def plain(obj: Any) -> Any:
    """``obj`` as JSON can hold it: phases as :func:`figures`, a non-finite float as ``None``."""
    if isinstance(obj, Run):
        return figures(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "latencies"}
        out = {k: plain(v) for k, v in fields.items()}
        lat = getattr(obj, "latencies", None)
        if lat:
            xs = sorted(lat)
            for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms")):
                out[key] = round(nearest_rank(xs, q) * 1000, 2)
        if hasattr(obj, "rate"):
            out["ops_per_s"] = round(obj.rate, 1)
        return out
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(bench: str, results: Any, **meta: Any) -> str:
    """A bench's results as one JSON document (phases as :func:`figures`)."""
    return json.dumps({"bench": bench, "cores": os.cpu_count(), **plain(meta), "results": plain(results)},
                      indent=2)
