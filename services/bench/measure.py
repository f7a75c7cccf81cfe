"""What every convlog bench measures with: a phase's operations and latencies,
closed-loop and open-loop load generators."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Run", "closed_loop", "open_loop", "say"]


@dataclass
class Run:
    """One measured phase: completed operations and their latencies (seconds)."""

    name: str
    ops: int
    seconds: float
    latencies: list[float]
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def say(msg: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(msg, file=sys.stderr, flush=True)


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
        while time.perf_counter() < stop_at:
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
    """Issue ``op`` at a fixed ``rate`` per second (latency at a given load)."""
    lat: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, t_sched: float) -> None:
        nonlocal errors
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
        await asyncio.wait(tasks, timeout=30)
    return Run(name, len(lat), time.perf_counter() - start, lat, errors)
