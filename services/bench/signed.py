"""``convlog bench --signed``: signed vs unsigned appends in the same run.

A private stack (embedded nats-server and ``convlog log`` with a fresh
keyring, signatures checked but not required) takes alternating phases of
unsigned and signed one-item appends from ``--writers`` concurrent writers
(default 64), so both see the same machine load; the report gives each
phase's acks/s and the signed/unsigned ratio (target >= 0.8).

It also says where the time goes: the CPU each process spent per ack in each
phase (the bench's own writers, which sign in the signed phases; nats-server;
the log service, which verifies), read from ``/proc`` on Linux, and what one
Ed25519 signature and one verification cost on this machine just then.  The
writers share one client, so the appends started in one event-loop turn share
one batch signature (``shared.signing.sign_batch``), as any busy client's do:
the report also gives the appends per signature the phase saw.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.client import LogClient
from shared.config import Settings
from shared.signing import Signer, item_signing_input, verify_signature

from .appends import payload
from .measure import Run, closed_loop, figures, to_json

__all__ = ["run_signed_bench"]


@dataclass
class _Stack:
    url: str
    pids: dict[str, int]  # process name -> pid, for the CPU breakdown
    signatures: int = 0  # made by the signed writers


class _CountingSigner(Signer):
    """A signer that counts its signatures (appends per signature = batching)."""

    made = 0

    def sign(self, message: bytes) -> str:
        self.made += 1
        return super().sign(message)


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU (user + system) each process has used so far; empty where ``/proc`` is missing."""
    out = {"bench": time.process_time()}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for name, pid in pids.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _crypto_costs(signer: Signer, data: dict[str, object], n: int = 500) -> tuple[float, float]:
    """Microseconds for one item signature (input included) and one verification."""
    msg = item_signing_input("bench-1", "0" * 26, "Bench", "message", data)
    t0 = time.thread_time()
    for i in range(n):
        sig = signer.sign(item_signing_input("bench-1", f"{i:026d}", "Bench", "message", data))
    t1 = time.thread_time()
    sig = signer.sign(msg)
    for _ in range(n):
        verify_signature(signer.key_id, msg, sig)
    t2 = time.thread_time()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


@contextlib.contextmanager
def _signed_stack(base: Path) -> Iterator[_Stack]:
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
    pids = {"log service": proc.pid}
    if server.proc is not None:
        pids["nats-server"] = server.proc.pid
    try:
        yield _Stack(server.url, pids)
    finally:
        stop_process(proc)
        server.stop()


@dataclass
class _Phase:
    kind: str
    run: Run
    cpu: dict[str, float]  # process -> CPU seconds used during the phase


async def _phases(stack: _Stack, keys: Path, args: argparse.Namespace) -> list[_Phase]:
    url = stack.url
    plain = await LogClient.connect(url, name="convlog-bench-unsigned", settings=Settings(nats_url=url))
    signed = await LogClient.connect(url, name="convlog-bench-signed", settings=Settings(nats_url=url))
    signer = signed.signer = _CountingSigner((keys / "Bench.nk").read_bytes())
    data = payload(args.item_size)
    run_id = f"{random.getrandbits(32):08x}"
    sids = [f"bench-{run_id}-{i}" for i in range(args.sessions)]
    try:
        for _ in range(200):  # the service is up when a read answers
            with contextlib.suppress(Exception):
                await plain.read("bench-ready", tail=0)
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the bench's log service did not answer within 20 s")
        runs: list[_Phase] = []
        each = max(1.0, args.duration / 2)
        for rnd in range(2):  # unsigned, signed, unsigned, signed: the same load for both
            for kind, client in (("unsigned", plain), ("signed", signed)):
                def op(i: int, client: LogClient = client) -> object:
                    return client.append(sids[i % len(sids)], [{"agent": "Bench", "data": data}])

                print(f"{kind} appends, round {rnd + 1}: {args.writers} writers, {each:.0f}s ...",
                      file=sys.stderr, flush=True)
                before = _cpu_seconds(stack.pids)
                run = await closed_loop(f"{kind} appends", op, args.writers, each)
                after = _cpu_seconds(stack.pids)
                runs.append(_Phase(kind, run, {k: after[k] - before[k] for k in after if k in before}))
        stack.signatures = signer.made
        return runs
    finally:
        await plain.close()
        await signed.close()


async def run_signed_bench(args: argparse.Namespace) -> str:
    """Run the comparison on a private stack; return the report."""
    with tempfile.TemporaryDirectory(prefix="convlog-sign-bench-") as tmp, _signed_stack(Path(tmp)) as stack:
        runs = await _phases(stack, Path(tmp) / "keys", args)
        sign_us, verify_us = _crypto_costs(Signer.load(Path(tmp) / "keys" / "Bench.nk"), payload(args.item_size))
    kinds = ("unsigned", "signed")
    total = {k: (sum(p.run.ops for p in runs if p.kind == k), sum(p.run.seconds for p in runs if p.kind == k))
             for k in kinds}
    rate = {k: ops / secs if secs else 0.0 for k, (ops, secs) in total.items()}
    lines = [f"convlog bench --signed: {args.writers} writers x {args.sessions} sessions, "
             f"{args.item_size}-byte items, {os.cpu_count()} cores (one item per append), "
             f"load average {os.getloadavg()[0]:.1f}",
             f"{'phase':<24} {'acks/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}   CPU us per ack"]
    for p in runs:
        cpu = ", ".join(f"{name} {secs / p.run.ops * 1e6:.0f}" for name, secs in p.cpu.items()) if p.run.ops else ""
        lines.append(f"{p.kind + ' appends':<24} {p.run.rate:>10.0f} {p.run.pct(0.5):8.2f} "
                     f"{p.run.pct(0.99):8.2f} {p.run.errors:>6}   {cpu}")
    ratio = rate["signed"] / rate["unsigned"] if rate["unsigned"] else 0.0
    if getattr(args, "json", False):
        phases = [{"kind": p.kind, **figures(p.run),
                   "cpu_us_per_ack": {n: round(c / p.run.ops * 1e6, 1) for n, c in p.cpu.items()} if p.run.ops else {}}
                  for p in runs]
        return to_json("signed", phases, writers=args.writers, sessions=args.sessions, item_size=args.item_size,
                       acks_per_s={k: round(v, 1) for k, v in rate.items()}, signed_vs_unsigned=round(ratio, 3),
                       appends_per_signature=round(total["signed"][0] / max(1, stack.signatures), 1),
                       ed25519_us={"sign": round(sign_us, 1), "verify": round(verify_us, 1)})
    lines.append(f"signed / unsigned acks/s: {ratio:.2f} (unsigned {rate['unsigned']:.0f}/s, "
                 f"signed {rate['signed']:.0f}/s; target >= 0.80)")
    per_ack = {k: sum(sum(p.cpu.values()) for p in runs if p.kind == k) / total[k][0] * 1e6
               for k in kinds if total[k][0]}
    if "unsigned" in per_ack:
        lines.append(f"Ed25519 here: sign {sign_us:.0f} us (the writer), verify {verify_us:.0f} us (the log "
                     f"service), {total['signed'][0] / max(1, stack.signatures):.1f} appends per signature; CPU per ack, all "
                     f"processes: unsigned {per_ack['unsigned']:.0f} us, signed {per_ack.get('signed', 0):.0f} us")
    return "\n".join(lines)
