"""``convlog bench --turns``: what convlog adds to an agent turn.

A private stack (embedded nats-server, ``convlog log``, two worker processes
of one agent) answers with the offline rules model, which replies in-process
without a network call, so the measured time is convlog's own: user message
published -> log append -> JetStream delivery to a worker -> history read ->
model call -> reply appended -> reply delivered back.  The baseline measured
in the same run is one bare ``append`` round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.client import LogClient, new_item_id
from shared.config import Settings

from .measure import Run, closed_loop, to_json
from .stack import local_stack, wait_service

__all__ = ["cmd_turn_bench", "run_turn_bench"]

# One agent, no handoffs: every user message is one model call and one reply.
BENCH_SPEC = """\
entry = "L1Billing"

[[agents]]
name = "L1Billing"
instructions = "You handle routine billing questions: balances, charges, payment methods."
"""

MESSAGE = "What is the balance on my account?"

_item_id = msgspec.json.Decoder(dict[str, Any])


class ReplyWatcher:
    """Resolves a future per turn when the turn's terminal item is committed.

    One JetStream consumer on every items subject (new items only) serves all
    sessions of the bench, instead of one follower per session.
    """

    def __init__(self, client: LogClient) -> None:
        self.client = client
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self._sub: Any = None

    async def start(self) -> None:
        from services.worker.turn_ids import parse_turn_item_id

        async def on_item(msg: Any) -> None:
            tid = parse_turn_item_id(_item_id.decode(msg.data).get("item_id", ""))
            if tid is not None and tid.terminal:
                fut = self.waiting.pop(tid.turn, None)
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())

        js = self.client.nc.jetstream()
        self._sub = await js.subscribe(
            self.client.subjects.items_all, cb=on_item, ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def turn(self, session_id: str, within: float = 30.0) -> float:
        """Send one user message; return seconds until its reply was delivered."""
        from services.worker.turn_ids import turn_key

        item_id = new_item_id()
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[turn_key(item_id)] = fut
        t0 = time.perf_counter()
        await self.client.send(session_id, MESSAGE, item_id=item_id)
        return await asyncio.wait_for(fut, within) - t0


async def _wait_ready(client: LogClient, watcher: ReplyWatcher, within: float = 60.0) -> None:
    """Until the log service answers and a worker completes a turn."""
    end = time.monotonic() + within
    while True:
        try:
            await watcher.turn("bench-warmup", within=5.0)
            return
        except (TimeoutError, Exception):
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


async def run_turn_bench(url: str, args: argparse.Namespace) -> list[Run]:
    client = await LogClient.connect(url, name="convlog-turn-bench", settings=Settings(nats_url=url))
    watcher = ReplyWatcher(client)
    runs: list[Run] = []
    try:
        print("waiting for the log service and both workers ...", file=sys.stderr, flush=True)
        await wait_service(client)  # it creates the items stream the watcher reads
        await watcher.start()
        await _wait_ready(client, watcher)
        tag = f"{random.getrandbits(32):08x}"
        # Not authored by "user", so the workers leave these items alone.
        data = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}
        runs.append(await closed_loop(
            "append round trip (baseline)",
            lambda i: client.append(f"tb-{tag}-append", [{"agent": "bench", "data": data}]),
            1, args.duration / 2,
        ))
        for level in args.levels:
            print(f"turns: {level} concurrent sessions for {args.duration:.0f}s ...",
                  file=sys.stderr, flush=True)

            async def one(i: int, level: int = level) -> float:
                # Each closed-loop writer owns one session: one turn at a time in it.
                return await watcher.turn(f"tb-{tag}-{level}-{i // 1_000_000}")

            runs.append(await closed_loop(f"turns, {level} concurrent sessions", one, level,
                                          args.duration))
    finally:
        await watcher.stop()
        await client.close()
    return runs


def report(runs: list[Run], args: argparse.Namespace) -> str:
    base = runs[0]
    lines = [
        f"convlog bench --turns: 2 workers of one agent, offline rules model (answers in-process), "
        f"{args.duration:.0f}s phases, {os.cpu_count()} cores",
        f"{'phase':<36} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50/append p50':>15} {'errors':>6}",
    ]
    for r in runs:
        ratio = r.pct(0.5) / base.pct(0.5) if base.latencies else float("nan")
        lines.append(f"{r.name:<36} {r.rate:>8.0f} {r.pct(0.5):>8.2f} {r.pct(0.99):>8.2f} "
                     f"{ratio:>15.1f} {r.errors:>6}")
    return "\n".join(lines)


async def cmd_turn_bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="convlog-turn-bench-") as tmp:
        spec = Path(tmp) / "bench-agents.toml"
        spec.write_text(BENCH_SPEC)
        saved = os.environ.pop("OPENAI_API_KEY", None)  # the instant model, not a real one
        try:
            workers = [["L1Billing", "--agents", str(spec)]] * 2
            with local_stack(workers=workers) as url:
                runs = await run_turn_bench(url, args)
        finally:
            if saved is not None:
                os.environ["OPENAI_API_KEY"] = saved
    if args.json:
        print(to_json("turns", runs, levels=args.levels, duration_s=args.duration))
    else:
        print(report(runs, args))
    return 0
