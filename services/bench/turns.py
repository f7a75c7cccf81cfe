"""``convlog bench --turns``: what convlog adds to an agent turn, and where it goes.

A private stack (embedded nats-server, ``convlog log``, two worker processes
of ``L1Billing`` and one of ``Triage``) answers with the offline rules model,
which replies in-process without a network call, so the measured time is
convlog's own: user message published -> log append -> turn notice delivered
to one worker -> routing check and history read (concurrent) -> model call ->
reply appended -> reply back to the client on ``convlog.items.<sid>``.  The
baseline measured in the same run is one bare ``append`` round trip.

The spec has 20 agents; the other 18 (L2Support and 17 idle specialists) run
as workers nobody addresses inside the bench process (the real worker code,
each with its durable consumer), so the deliveries per turn show what idle
agents cost: nothing.  A short second
stack with a 3-agent spec gives the same figure for 3 agents.

Phases: plain turns in 1 session; handoff turns (Triage -> L1Billing, each a
new session) one at a time; the two alternating, one turn of each in turn, so
both meet the same load (two phases' ratio moves with the load of each
moment, an alternating one's does not); plain turns at each ``--levels`` count of
concurrent sessions; and the last level again while one of the two L1Billing
workers is killed with SIGKILL a third of the way in.  Every phase counts
turns never answered (lost) and answered twice (doubled).  Workers record
per-phase timings (``--publish-timings``), shown as a breakdown per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.client import LogClient
from shared.config import Settings

from .measure import Run, closed_loop, losses_exit_code, nearest_rank, open_loop, plain, say
from .stack import local_stack, wait_service
from .turns_watch import ReplyWatcher, Timings, deliveries

__all__ = ["cmd_turn_bench", "run_turn_bench"]

PLAIN = "What is the balance on my account?"  # L1Billing answers at once
HANDOFF = "I have a question about a charge on my bill."  # Triage routes it to L1Billing
_ACTIVE = ("Triage", "L1Billing", "L2Support")


def bench_spec(agents: int) -> str:
    """Triage (entry) -> L1Billing -> L2Support, plus idle agents up to ``agents``."""
    text = ['entry = "Triage"\n',
            '[[agents]]\nname = "Triage"\ninstructions = "Greet the user. Route to billing for payment issues."\n',
            '[[agents.handoffs]]\ntarget = "L1Billing"\ntool_name = "route_to_billing"\n'
            'tool_description = "Route to billing support"\n',
            '[[agents]]\nname = "L1Billing"\ninstructions = "You handle routine billing questions: '
            'balances, charges, payment methods."\n',
            '[[agents.handoffs]]\ntarget = "L2Support"\ntool_name = "escalate_to_senior"\n'
            'tool_description = "Escalate to senior support"\n',
            '[[agents]]\nname = "L2Support"\ninstructions = "You are senior support."\n']
    for i in range(len(_ACTIVE), agents):
        text.append(f'[[agents]]\nname = "Agent{i + 1:02d}"\ninstructions = "An idle specialist."\n')
    return "\n".join(text)


class Phase(Run):
    """A :class:`Run` with exactly-once counts, deliveries and the time breakdown."""

    lost: int = 0
    doubled: int = 0
    deliveries_per_turn: float = float("nan")
    breakdown: dict[str, list[float]] | None = None


async def _phase(name: str, watcher: ReplyWatcher, timings: Timings | None, client: LogClient,
                 writers: int, duration: float, op: Any, *, during: Any = None,
                 rate: float | None = None) -> Phase:
    """``writers`` closed-loop writers, or with ``rate`` that many turns a second (open loop)."""
    before_keys = set(watcher.sent)
    before = await deliveries(client)
    lost = 0

    async def counted(i: int) -> float:
        nonlocal lost
        try:
            return float(await op(i))
        except TimeoutError:
            lost += 1
            raise
        except asyncio.CancelledError:
            # The open loop's drain ended first: a turn still waiting for its reply, or
            # for a free session to be sent to, was never answered: lost, not an error.
            lost += 1
            raise

    side = asyncio.create_task(during()) if during is not None else None
    if rate is None:
        run = await closed_loop(name, counted, writers, duration)
    else:
        run = await open_loop(name, counted, rate, duration)
    if side is not None:
        await side
    # A lost turn's TimeoutError (or its cancel at the open loop's drain) is an exception of
    # its op, which the loop counted as an error too: it is lost, not also an error (as in
    # the alternating phases).
    phase = Phase(run.name, run.ops, run.seconds, run.latencies, run.errors - lost)
    phase.lost = lost
    keys = set(watcher.sent) - before_keys
    await asyncio.sleep(0.5)  # a second terminal item of a turn would have arrived by now
    phase.doubled = watcher.doubled(keys)
    if keys:  # every turn sent was delivered, answered or not (failed, lost)
        phase.deliveries_per_turn = (await deliveries(client) - before) / len(keys)
    if timings is not None:
        await asyncio.sleep(0.2)
        phase.breakdown = timings.breakdown(_turn_times(watcher, keys))
    return phase


async def _alternating(watcher: ReplyWatcher, timings: Timings | None, agents: int, duration: float,
                       plain: Any, handoff: Any) -> list[Phase]:
    """A plain turn, then a handoff turn, and again, for ``duration`` seconds: two phases
    (plain, handoff) whose p50s met the same load."""
    kinds = {"plain": plain, "handoff": handoff}
    lat: dict[str, list[float]] = {k: [] for k in kinds}
    lost = dict.fromkeys(kinds, 0)
    errors = dict.fromkeys(kinds, 0)
    keys: dict[str, set[str]] = {k: set() for k in kinds}
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < duration:
        for kind, op in kinds.items():
            sent = len(watcher.sent)
            try:
                lat[kind].append(float(await op(i)))
            except TimeoutError:
                lost[kind] += 1
            except Exception:
                errors[kind] += 1
            if len(watcher.sent) > sent:  # not when its send failed: the last turn is then the other kind's
                keys[kind].add(next(reversed(watcher.sent)))  # the turn just sent
        i += 1
    seconds = time.perf_counter() - start
    await asyncio.sleep(0.5)  # a second terminal item of a turn would have arrived by now
    phases = []
    for kind in kinds:
        phase = Phase(f"{kind} turns, alternating, 1 at a time, {agents} agents", len(lat[kind]), seconds,
                      lat[kind], errors[kind])
        phase.lost, phase.doubled = lost[kind], watcher.doubled(keys[kind])
        phases.append(phase)
    if timings is not None:
        await asyncio.sleep(0.2)
        for kind, phase in zip(kinds, phases, strict=True):
            phase.breakdown = timings.breakdown(_turn_times(watcher, keys[kind]))
    return phases


def _turn_times(watcher: ReplyWatcher, keys: set[str]) -> dict[str, tuple[float, float]]:
    return {k: (watcher.sent[k], watcher.totals.get(k, 0.0)) for k in keys if k in watcher.totals}


async def _idle_workers(url: str, spec_path: Path, agents: list[str]) -> list[Any]:
    """Real workers for agents nobody addresses, inside this process."""
    import logging

    from services.worker.model import make_model_client
    from services.worker.spec import load_spec
    from services.worker.worker import Worker

    logging.getLogger("convlog.worker").setLevel(logging.WARNING)  # 18 "ready" lines say nothing
    spec = load_spec(str(spec_path))
    settings = Settings(nats_url=url)
    workers = [Worker(settings, spec, a, make_model_client(None, None), concurrency=4) for a in agents]
    for w in workers:
        await w.start()
    async with asyncio.timeout(30):
        await asyncio.gather(*(w.ready.wait() for w in workers))
    return workers


async def _wait_ready(watcher: ReplyWatcher, within: float = 60.0) -> None:
    end = time.monotonic() + within
    while True:
        try:
            await watcher.turn(f"bench-warmup-{random.getrandbits(32):x}", HANDOFF, within=5.0)
            await watcher.turn("bench-warmup-plain", PLAIN, to="L1Billing", within=5.0)
            return
        except Exception:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


async def run_turn_bench(url: str, args: argparse.Namespace, spec_path: Path, agents: int,
                         killable: list[subprocess.Popen[bytes]] | None, *, full: bool) -> list[Phase]:
    """The phases on a running stack (``full``: all of them; else only the deliveries ones)."""
    client = await LogClient.connect(url, name="convlog-turn-bench", settings=Settings(nats_url=url))
    watcher, timings = ReplyWatcher(client), Timings(client)
    runs: list[Phase] = []
    idle: list[Any] = []
    try:
        say(f"waiting for the log service and the workers ({agents} agents in the spec) ...")
        await wait_service(client)
        await watcher.start()
        await timings.start()
        idle = await _idle_workers(url, spec_path, [a for a in _names(agents) if a not in _ACTIVE[:2]])
        await _wait_ready(watcher)
        tag = f"{random.getrandbits(32):08x}"
        data = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}
        if full:
            base = await closed_loop("append round trip (baseline)", lambda i: client.append(
                f"tb-{tag}-append", [{"agent": "bench", "data": data}]), 1, args.duration / 2)
            runs.append(_as_phase(base))
        dur = args.duration if full else max(2.0, args.duration / 3)

        def plain(level: int) -> Any:
            return lambda i: watcher.turn(f"tb-{tag}-{level}-{i // 1_000_000}", PLAIN, to="L1Billing")

        say(f"turns: 1 session ({agents} agents) ...")
        runs.append(await _phase(f"plain turns, 1 session, {agents} agents", watcher, timings, client,
                                 1, dur, plain(1)))
        say(f"handoff turns, 1 at a time ({agents} agents) ...")
        runs.append(await _phase(f"handoff turns, 1 at a time, {agents} agents", watcher, timings, client,
                                 1, dur, lambda i: watcher.turn(f"tb-{tag}-h-{i}", HANDOFF)))
        say(f"plain and handoff turns alternating ({agents} agents) ...")
        runs += await _alternating(watcher, timings, agents, dur, plain(1), lambda i: watcher.turn(f"tb-{tag}-a-{i}", HANDOFF))
        if not full:
            return runs
        for level in args.levels:
            if level == 1:
                continue
            say(f"turns: {level} concurrent sessions for {args.duration:.0f}s ...")
            runs.append(await _phase(f"plain turns, {level} sessions", watcher, timings, client,
                                     level, args.duration, plain(level)))
        level = max(args.levels)
        rate = open_loop_rate(args.turn_rate, runs, level)
        say(f"turns: {rate:g}/s offered over {level} sessions for {args.duration:.0f}s ...")
        free: asyncio.Queue[str] = asyncio.Queue()
        for k in range(level):
            free.put_nowait(f"tb-{tag}-o{level}-{k}")

        async def offered(i: int) -> float:
            # Each message goes to a session with no turn running (a user waits for the
            # reply before writing again); when all are busy it waits for one.
            sid = await free.get()
            try:
                return await watcher.turn(sid, PLAIN, to="L1Billing")
            finally:
                free.put_nowait(sid)

        runs.append(await _phase(f"{rate:g} turns/s offered, {level} sessions (open loop)", watcher, timings,
                                 client, level, args.duration, offered, rate=rate))
        if killable:
            victim = killable[0]

            async def kill() -> None:
                await asyncio.sleep(args.duration / 3)
                say(f"kill -9 of worker pid {victim.pid} ...")
                victim.send_signal(signal.SIGKILL)

            runs.append(await _phase(f"plain turns, {level} sessions, kill -9 of 1 of 2 workers",
                                     watcher, None, client, level, args.duration,
                                     lambda i: watcher.turn(f"tb-{tag}-k{level}-{i // 1_000_000}", PLAIN,
                                                            to="L1Billing", within=60.0), during=kill))
    finally:
        for w in idle:
            await w.shutdown()
        await timings.stop()
        await watcher.stop()
        await client.close()
    return runs


def open_loop_rate(asked: float | None, runs: list[Phase], level: int) -> float:
    """The open-loop phase's offered turns/s: ``asked`` (``--turn-rate``), or by default
    half what the closed loop of ``level`` sessions reached in this run (as the plain
    bench's half-load phase), so the phase shows latency at a load this machine carries
    at that moment, and a faster machine or faster code is offered more."""
    if asked is not None:
        return asked
    closed = f"plain turns, {level} sessions" if level > 1 else "plain turns, 1 session, "
    run = next(r for r in runs if r.name == closed or (level == 1 and r.name.startswith(closed)))
    return max(1.0, round(run.rate / 2))


def _names(agents: int) -> list[str]:
    return [*_ACTIVE, *(f"Agent{i + 1:02d}" for i in range(len(_ACTIVE), agents))][:agents]


def _as_phase(run: Run) -> Phase:
    return Phase(run.name, run.ops, run.seconds, run.latencies, run.errors)


def _pcts(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    s = sorted(xs)
    return nearest_rank(s, 0.5) * 1000, nearest_rank(s, 0.99) * 1000


def figures(runs: list[Phase]) -> dict[str, Any]:
    """Everything the report shows, as plain data (``--json``)."""
    base = runs[0].pct(0.5)
    out: dict[str, Any] = {"cores": os.cpu_count(), "append_p50_ms": base, "phases": []}
    for r in runs:
        phase: dict[str, Any] = {
            "name": r.name, "turns_per_s": r.rate, "p50_ms": r.pct(0.5), "p99_ms": r.pct(0.99),
            "p50_over_append_p50": r.pct(0.5) / base, "ops": r.ops, "errors": r.errors,
            "lost": r.lost, "doubled": r.doubled, "deliveries_per_turn": r.deliveries_per_turn,
        }
        if r.breakdown:
            phase["breakdown_ms"] = {k: dict(zip(("p50", "p99"), _pcts(v), strict=True))
                                     for k, v in r.breakdown.items()}
        out["phases"].append(phase)
    plain = next((p for p in out["phases"] if p["name"].startswith("plain turns, 1 session")), None)
    hand = next((p for p in out["phases"] if p["name"].startswith("handoff turns")), None)
    if plain and hand:
        out["handoff_over_plain_p50"] = hand["p50_ms"] / plain["p50_ms"]
    # The same ratio from the alternating phases (same load for both), per agent count.
    alt = {p["name"].removeprefix("plain turns, alternating, 1 at a time, ").split()[0]: p
           for p in out["phases"] if p["name"].startswith("plain turns, alternating")}
    for p in out["phases"]:
        if p["name"].startswith("handoff turns, alternating"):
            agents = p["name"].split(", ")[-1].split()[0]
            if agents in alt and alt[agents]["p50_ms"] > 0:
                out.setdefault("handoff_over_plain_p50_alternating", {})[agents] = p["p50_ms"] / alt[agents]["p50_ms"]
    return out


def report(fig: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"convlog bench --turns: workers L1Billing x2 + Triage, offline rules model (in-process), "
        f"{args.duration:.0f}s phases, {fig['cores']} cores",
        f"{'phase':<58} {'turns/s':>8} {'p50 ms':>7} {'p99 ms':>8} {'p50/app':>7} "
        f"{'lost':>4} {'dbl':>3} {'errors':>6} {'deliv/turn':>10}",
    ]
    for p in fig["phases"]:
        d = p["deliveries_per_turn"]
        lines.append(f"{p['name']:<58} {p['turns_per_s']:>8.0f} {p['p50_ms']:>7.2f} {p['p99_ms']:>8.1f} "
                     f"{p['p50_over_append_p50']:>7.1f} {p['lost']:>4} {p['doubled']:>3} {p['errors']:>6} "
                     f"{'' if d != d else f'{d:.2f}':>10}")
    if "handoff_over_plain_p50" in fig:
        lines.append(f"a handoff turn's p50 / a plain turn's p50: {fig['handoff_over_plain_p50']:.2f}")
    for agents, ratio in fig.get("handoff_over_plain_p50_alternating", {}).items():
        lines.append(f"  the same, turns alternating (same load), {agents} agents: {ratio:.2f}")
    for p in fig["phases"]:
        if "breakdown_ms" in p:
            whole = {k: v for k, v in p["breakdown_ms"].items() if "." not in k}
            parts = "  ".join(f"{k} {v['p50']:.2f}/{v['p99']:.1f}" for k, v in whole.items())
            lines.append(f"where it goes (p50/p99 ms), {p['name']}: {parts}")
            by_part = [k for k in p["breakdown_ms"] if "." in k]  # <agent>.<phase>, a handoff's parts
            if by_part:
                per = "  ".join(f"{k} {p['breakdown_ms'][k]['p50']:.2f}" for k in by_part)
                lines.append(f"  by part (p50 ms): {per}")
    return "\n".join(lines)


async def cmd_turn_bench(args: argparse.Namespace) -> int:
    saved = os.environ.pop("OPENAI_API_KEY", None)  # the instant model, not a real one
    try:
        with tempfile.TemporaryDirectory(prefix="convlog-turn-bench-") as tmp:
            runs: list[Phase] = []
            for agents, full in ((20, True), (3, False)):
                spec = Path(tmp) / f"bench-agents-{agents}.toml"
                spec.write_text(bench_spec(agents))
                common = ["--agents", str(spec), "--publish-timings", "--ack-wait", "5"]
                workers = [["L1Billing", *common], ["L1Billing", *common], ["Triage", *common]]
                started: list[subprocess.Popen[bytes]] = []
                with local_stack(workers=workers, started=started) as url:
                    runs += await run_turn_bench(url, args, spec, agents, started[:2], full=full)
    finally:
        if saved is not None:
            os.environ["OPENAI_API_KEY"] = saved
    fig = figures(runs)
    print(json.dumps(plain(fig), indent=2) if args.json else report(fig, args))  # (JSON has no NaN)
    return exit_code(runs)


def exit_code(runs: list[Phase]) -> int:
    """1 (naming them on stderr) when a phase lost or doubled a turn, else 0."""
    return losses_exit_code({"turns lost": sum(r.lost for r in runs), "turns doubled": sum(r.doubled for r in runs)})

