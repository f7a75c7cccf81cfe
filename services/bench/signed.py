"""``convlog bench --signed``: signed vs unsigned appends in the same run.

A private stack (embedded nats-server and ``convlog log`` with a fresh
keyring, signatures checked but not required) takes alternating phases of
unsigned and signed one-item appends from ``--writers`` concurrent writers
(default 64), so both see the same machine load; the report gives each
phase's acks/s and the signed/unsigned ratio (target >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shared.client import LogClient
from shared.config import Settings
from shared.signing import Signer

from .appends import payload
from .measure import Run, closed_loop, figures, to_json

__all__ = ["run_signed_bench"]


@contextlib.contextmanager
def _signed_stack(base: Path) -> Iterator[str]:
    from services.cli.keys_cmds import make_keys
    from services.cli.stack import EmbeddedNats, stop_process

    make_keys(base / "keys", ["Bench"])
    server = EmbeddedNats(base / "nats", port=-1).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update({"CONVLOG_KEYRING": str(base / "keys" / "keyring.json"),
                "CONVLOG_SIGNING_KEY": str(base / "keys" / "log.nk")})
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "log", "--nats-url", server.url,
         "--db", str(base / "bench.db"), "--no-embedded", "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL, env=env,
    )
    try:
        yield server.url
    finally:
        stop_process(proc)
        server.stop()


async def _phases(url: str, keys: Path, args: argparse.Namespace) -> list[tuple[str, Run]]:
    plain = await LogClient.connect(url, name="convlog-bench-unsigned", settings=Settings(nats_url=url))
    signed = await LogClient.connect(url, name="convlog-bench-signed", settings=Settings(nats_url=url))
    signed.signer = Signer.load(keys / "Bench.nk")
    data = payload(args.item_size)
    run_id = f"{random.getrandbits(32):08x}"
    sids = [f"bench-{run_id}-{i}" for i in range(args.sessions)]
    try:
        for _ in range(200):  # the service is up when a read answers
            with contextlib.suppress(Exception):
                await plain.read("bench-ready", tail=0)
                break
            await asyncio.sleep(0.1)
        runs: list[tuple[str, Run]] = []
        each = max(1.0, args.duration / 2)
        for rnd in range(2):  # unsigned, signed, unsigned, signed: the same load for both
            for kind, client in (("unsigned", plain), ("signed", signed)):
                def op(i: int, client: LogClient = client) -> object:
                    return client.append(sids[i % len(sids)], [{"agent": "Bench", "data": data}])

                print(f"{kind} appends, round {rnd + 1}: {args.writers} writers, {each:.0f}s ...",
                      file=sys.stderr, flush=True)
                runs.append((kind, await closed_loop(f"{kind} appends", op, args.writers, each)))
        return runs
    finally:
        await plain.close()
        await signed.close()


async def run_signed_bench(args: argparse.Namespace) -> str:
    """Run the comparison on a private stack; return the report."""
    with tempfile.TemporaryDirectory(prefix="convlog-sign-bench-") as tmp, _signed_stack(Path(tmp)) as url:
        runs = await _phases(url, Path(tmp) / "keys", args)
    total = {k: (sum(r.ops for n, r in runs if n == k), sum(r.seconds for n, r in runs if n == k))
             for k in ("unsigned", "signed")}
    rate = {k: ops / secs if secs else 0.0 for k, (ops, secs) in total.items()}
    lines = [f"convlog bench --signed: {args.writers} writers x {args.sessions} sessions, "
             f"{args.item_size}-byte items, {os.cpu_count()} cores (one item per append)",
             f"{'phase':<24} {'acks/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"]
    for kind, r in runs:
        lines.append(f"{kind + ' appends':<24} {r.rate:>10.0f} {r.pct(0.5):8.2f} {r.pct(0.99):8.2f} {r.errors:>6}")
    ratio = rate["signed"] / rate["unsigned"] if rate["unsigned"] else 0.0
    if getattr(args, "json", False):
        return to_json("signed", [{"kind": kind, **figures(r)} for kind, r in runs], writers=args.writers,
                       sessions=args.sessions, item_size=args.item_size,
                       acks_per_s={k: round(v, 1) for k, v in rate.items()}, signed_vs_unsigned=round(ratio, 3))
    lines.append(f"signed / unsigned acks/s: {ratio:.2f} (unsigned {rate['unsigned']:.0f}/s, "
                 f"signed {rate['signed']:.0f}/s; target >= 0.80)")
    return "\n".join(lines)
