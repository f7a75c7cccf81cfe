"""``convlog bench``: load the log service and report figures as ratios to a
baseline measured in the same run (raw nats-py request/reply to an echo
responder in its own process), because this machine is shared and noisy.

With no log service answering at the URL, the bench starts its own stack (an
embedded nats-server on a free port and ``convlog log`` on a temporary SQLite
file) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import Awaitable
from typing import Any

import msgspec
import nats
import nats.js.errors

from services.log.reconciler import RECONCILER
from shared.client import LogClient
from shared.config import Settings, load_settings
from shared.nats_connect import open_client

from .measure import Run, closed_loop, open_loop
from .measure import say as _stderr
from .stack import connection_env, connection_settings
from .stack import wait_service as _wait_service

__all__ = ["payload", "report", "run_bench"]

_encode = msgspec.json.Encoder().encode


class _Order(msgspec.Struct):
    item_order: int


_last_order = msgspec.json.Decoder(_Order)


def payload(size: int) -> dict[str, Any]:
    return {"role": "user", "content": "x" * max(1, size)}


def _echo_main(url: str, subject: str) -> None:
    """The baseline responder: reply with the request body, nothing else.

    It logs in with the credentials of its ``CONVLOG_*`` environment (:func:`connection_env`)."""

    async def run() -> None:
        # A NonceCheckingClient: CONVLOG_NKEY is the seed that signs items (shared.nats_seam.login).
        nc = await open_client(servers=url, **load_settings({"nats_url": url}).nats_options())

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(subject, queue="echo", cb=echo)
        await nc.flush()
        print("ready", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


async def run_bench(
    args: argparse.Namespace, url: str, *, prefix: str = "convlog", settings: Settings | None = None
) -> dict[str, Run]:
    """The phases against the log service at ``url`` serving subject prefix ``prefix``
    (or ``settings``' prefix, logging in with their credentials)."""
    settings = connection_settings(settings or Settings(prefix=prefix), url)
    client = await LogClient.connect(url, name="convlog-bench", settings=settings)
    await _wait_service(client)
    results: dict[str, Run] = {}
    data = payload(args.item_size)
    run_id = f"{random.getrandbits(32):08x}"
    sids = [f"bench-{run_id}-{i}" for i in range(args.sessions)]

    # Baseline: request/reply to an echo responder in its own process.
    subject = f"convlog-bench.echo.{run_id}"
    echo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.bench.appends", "--echo", url, subject,
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, env=connection_env(settings),
    )
    try:
        assert echo.stdout is not None
        if await echo.stdout.readline() != b"ready\n":  # it died before answering: no baseline
            raise RuntimeError(f"the echo baseline's responder did not start (exit code {await echo.wait()})")
        body = _encode({"items": [{"agent": "user", "data": data}]})
        _stderr(f"baseline: {args.writers} writers, echo request/reply, {args.duration:.0f}s ...")
        results["baseline"] = await closed_loop(
            "echo request/reply (baseline)",
            lambda i: client.nc.request(subject, body, timeout=10),
            args.writers, args.duration,
        )
        if not results["baseline"].ops:  # every ratio is to it
            raise RuntimeError(f"the echo baseline completed no request ({results['baseline'].errors} failed): "
                               "nothing to compare the appends with")
    finally:
        if echo.returncode is None:
            echo.terminate()
        await echo.wait()

    def append_op(i: int) -> Awaitable[Any]:
        return client.append(sids[i % len(sids)], [{"agent": "user", "data": data}])

    _stderr(f"appends: {args.writers} writers over {args.sessions} sessions, "
            f"{args.item_size}-byte items, {args.duration:.0f}s ...")
    results["append"] = await closed_loop("durable appends (closed loop)", append_op,
                                          args.writers, args.duration)
    half = max(1.0, results["append"].rate / 2)
    # What the closed loop set off (the items stream's copy, the reconciler)
    # finishes first: the half-load phase measures half load, not the
    # draining of a backlog left by full load (the raw baseline leaves none).
    waited = await _wait_settled(client, sids)
    _stderr(f"latency at half load: {half:.0f} appends/s for {args.duration:.0f}s "
            f"(after {waited:.1f}s for the closed loop's copies) ...")
    results["half"] = await open_loop(f"appends at half load ({half:.0f}/s)", append_op, half, args.duration)
    results["half"].settled_after = waited

    # Replay: read a whole session forward, page by page.  The session holds
    # an agent's replies (a user message would also publish a turn notice
    # each, work that would still be going on during the replay).
    big = f"bench-{run_id}-replay"
    n_items = args.replay_items
    _stderr(f"replay: writing {n_items} items to one session ...")
    batch = [{"agent": "assistant", "data": {**data, "role": "assistant"}} for _ in range(500)]
    for k in range(0, n_items, 500):
        await client.append(big, batch[:n_items - k])
    waited = await _wait_caught_up(client, big, n_items)
    _stderr(f"replay: the service caught up with the writes after {waited:.1f}s; replaying ...")
    t0 = time.perf_counter()
    count = 0
    async for _env in client.iter_items(big):
        count += 1
    results["replay"] = Run("full replay (read pages)", count, time.perf_counter() - t0, [])

    if args.long_session:
        results.update(await _session_length(client, url, args, data, run_id))
    await client.close()
    return results


#: Items left for the notice reconciler that are not worth waiting for: its sweep of them
#: takes milliseconds, while its next sweep may be up to 2.5 s away.
_SMALL_SWEEP = 2_000


async def _wait_caught_up(client: LogClient, sid: str, last: int, within: float = 120.0) -> float:
    """Wait (up to ``within`` seconds) until what the writes of ``sid`` set off
    is done: the items stream holds its last item, and the log service's
    notice reconciler has at most :data:`_SMALL_SWEEP` items left to look at;
    returns the seconds waited.  Until then that work (copying, fsyncing,
    sweeping ~100k items) would compete with the replay for the same cores."""
    js = client.nc.jetstream(timeout=5)
    stream = client.subjects.stream_name
    t0 = time.perf_counter()
    msg = None
    while time.perf_counter() - t0 < within:
        try:
            msg = await js.get_last_msg(stream, client.subjects.items(sid))
            if _last_order.decode(msg.data).item_order >= last:
                info = await js.consumer_info(stream, RECONCILER)
                if (info.num_pending or 0) + (info.num_ack_pending or 0) <= _SMALL_SWEEP:
                    break
        except nats.js.errors.NotFoundError:
            if msg is not None:  # the stream holds the item; no reconciler to wait for
                break
        except nats.errors.Error:
            pass
        msg = None
        await asyncio.sleep(0.2)
    return time.perf_counter() - t0


async def _wait_settled(client: LogClient, sids: list[str], within: float = 60.0) -> float:
    """Wait until every session's last item is on the items stream and the
    notice reconciler has looked at it (see :func:`_wait_caught_up`); the
    seconds waited."""
    t0 = time.perf_counter()
    for sid in sids:
        last = await client.last_order(sid)
        if last:
            await _wait_caught_up(client, sid, last, within=max(0.0, within - (time.perf_counter() - t0)))
    return time.perf_counter() - t0


async def _session_length(
    client: LogClient, url: str, args: argparse.Namespace, data: dict[str, Any], run_id: str
) -> dict[str, Run]:
    """Append latency on a short (1k) and a long (``--long-session``) session.

    Both sessions are filled first and then measured by turns (short, long,
    short, long), so both see the same database: right after a large fill
    the checkpointer is still copying its WAL, which would slow whichever
    session were measured alone at that moment.
    """
    sids: dict[int, str] = {}
    for n in (1_000, args.long_session):
        sid = sids[n] = f"bench-{run_id}-len{n}"
        _stderr(f"session length: filling {sid} to {n} items (batches of 1000) ...")
        batch = [{"agent": "user", "data": {"role": "user", "content": "y"}} for _ in range(1000)]
        t_fill = time.perf_counter()
        for k in range(-(-n // 1000)):
            await client.append(sid, batch[:min(1000, n - k * 1000)])
            if k and k % 100 == 0:
                _stderr(f"  {k * 1000} / {n} items ({time.perf_counter() - t_fill:.0f}s)")
    turns: dict[int, list[Run]] = {n: [] for n in sids}
    each = min(args.duration, 5.0) / 2
    for _ in range(2):
        for n, sid in sids.items():
            turns[n].append(await closed_loop(
                f"appends to a {n}-item session (1 writer)",
                lambda i, sid=sid: client.append(sid, [{"agent": "user", "data": data}]),
                1, each,
            ))
    return {
        f"len{n}": Run(
            runs[0].name,
            sum(r.ops for r in runs),
            sum(r.seconds for r in runs),
            [x for r in runs for x in r.latencies],
            sum(r.errors for r in runs),
        )
        for n, runs in turns.items()
    }


def report(results: dict[str, Run], args: argparse.Namespace) -> str:
    base = results["baseline"].rate
    lines = [
        f"convlog bench: {args.writers} writers x {args.sessions} sessions, "
        f"{args.item_size}-byte items, {args.duration:.0f}s phases, {os.cpu_count()} cores",
        f"{'phase':<44} {'ops/s':>10} {'x baseline':>10} {'p50 ms':>8} {'p99 ms':>8} {'p999 ms':>8} {'errors':>6}",
    ]
    for key, r in results.items():
        ratio = f"{r.rate / base:.2f}" if key in ("baseline", "append") else ""
        if r.latencies:
            lat = f"{r.pct(0.5):8.2f} {r.pct(0.99):8.2f} {r.pct(0.999):8.2f}"
        else:
            lat = f"{'':>8} {'':>8} {'':>8}"
        unit = "items/s" if key == "replay" else ""
        lines.append(f"{r.name:<44} {r.rate:>10.0f} {ratio:>10} {lat} {r.errors:>6} {unit}")
    if "len1000" in results and f"len{args.long_session}" in results:
        short, long_ = results["len1000"], results[f"len{args.long_session}"]
        lines.append(
            f"append p50 at {args.long_session} items / at 1000 items: "
            f"{long_.pct(0.5) / short.pct(0.5):.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--echo":
        _echo_main(sys.argv[2], sys.argv[3])
