"""``convlog bench --store jetstream --fault leader-kill``: how long appends stop
when the stream leader dies.

A private 3-node cluster on loopback (``sync_interval: always``), the
JetStream store on an R3 stream behind two ``convlog log`` instances, and
``--writers`` writers (default 16) appending one item at a time round-robin
over ``--sessions`` sessions (default 20), each retrying an unanswered append
with the same ``item_id`` as a real client does.  Each of ``--rounds`` rounds
runs ``--duration`` seconds of load, ``kill -9``s the server leading the
store's busiest stream, waits until appends are acknowledged again, restarts
the killed server and lets it catch up.  Reported per round:

* **resumed after**: from the kill to the first acknowledged append that was
  first sent after the kill (what a new request waits, at worst);
* **longest gap**: the longest time with no acknowledgement at all, across
  every writer (the window the log was unavailable);
* **longest wait**: the longest one writer waited between two of its acks.

At the end every session is read back and checked: each acknowledged item
once, at its acknowledged order with its acknowledged hash, orders 1..n and an
intact chain; the counts of lost, duplicated and moved items are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from services.cli.stack import EmbeddedNats, stop_process
from shared.chain import verify
from shared.client import LogClient
from shared.errors import UnavailableError
from shared.messages import AppendItem

from .leader import StreamLeader, busiest_leader
from .measure import say
from .stack import wait_service

__all__ = ["run_leader_kill"]

PREFIX = "convlog"
RESUME_WITHIN = 120.0  # seconds: appends not back by then is a failure, not a figure
_NODE_CONF = """server_name: {name}
jetstream {{
  sync_interval: always
}}
cluster {{
  name: convlog-bench
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _cluster(base: Path) -> Iterator[dict[str, EmbeddedNats]]:
    """Three nodes, fully routed on loopback; stopped by PID on the way out."""
    routes = [_free_port() for _ in range(3)]
    nodes: dict[str, EmbeddedNats] = {}
    try:
        for i, route in enumerate(routes):
            name = f"n{i + 1}"
            conf = base / f"{name}.conf"
            base.mkdir(parents=True, exist_ok=True)
            conf.write_text(_NODE_CONF.format(
                name=name, route=route, routes=", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)))
            nodes[name] = EmbeddedNats(base / name, config=conf).start()
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


async def _wait_r3(urls: list[str], within: float = 30.0) -> None:
    """Until the meta group can place an R3 stream (a leader is elected, peers known)."""
    end = time.monotonic() + within
    nc = await nats.connect(urls, connect_timeout=2, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=2)
        while True:
            try:
                await js.add_stream(name="_bench_probe", subjects=["_bench_probe"], num_replicas=3, storage="memory")
                await js.delete_stream("_bench_probe")
                return
            except (nats.errors.Error, TimeoutError):
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


@dataclass
class _Ack:
    sid: str
    item_id: str
    order: int
    hash: str
    sent: float
    at: float
    writer: int


@dataclass
class _Load:
    sessions: list[str]
    acks: list[_Ack] = field(default_factory=list)
    retries: int = 0
    stop: bool = False

    async def writer(self, client: LogClient, w: int, item_size: int) -> None:
        n = 0
        while not self.stop:
            n += 1
            sid = self.sessions[(n + w) % len(self.sessions)]
            item = AppendItem(agent="bench", item_id=f"b{w}-{n}",
                              data={"role": "user", "content": "x" * item_size})
            sent = time.monotonic()
            while True:  # the same item_id until it is acknowledged
                try:
                    reply = await client.append(sid, [item])
                    break
                except UnavailableError:  # unknown outcome: send it again, same id
                    self.retries += 1
                    if self.stop:
                        return
            r = reply.items[0]
            self.acks.append(_Ack(sid, r.item_id, r.item_order, r.hash, sent, time.monotonic(), w))

    def acked_since(self, t: float) -> int:
        return sum(1 for a in self.acks if a.at >= t)


def _window(acks: list[_Ack], killed: float) -> dict[str, float]:
    resumed = min((a.at for a in acks if a.sent >= killed), default=float("inf"))
    after = sorted(a.at for a in acks if a.at >= killed)
    merged = [killed, *after]
    longest = max((b - a for a, b in zip(merged, merged[1:], strict=False)), default=float("inf"))
    per: dict[int, list[float]] = {}
    for a in acks:
        per.setdefault(a.writer, []).append(a.at)
    wait = 0.0
    for ts in per.values():
        ts.sort()
        wait = max([wait, *(b - a for a, b in zip(ts, ts[1:], strict=False) if b >= killed)])
    return {"resumed_after_s": round(resumed - killed, 3), "longest_gap_s": round(longest, 3),
            "longest_writer_wait_s": round(wait, 3)}


async def _check(client: LogClient, load: _Load) -> dict[str, int]:
    """Lost / duplicated / moved acknowledged items, and sessions that fail to verify."""
    acked = {(a.sid, a.item_id): (a.order, a.hash) for a in load.acks}
    lost = moved = dup = bad = extra = 0
    for sid in load.sessions:
        envs = await client.items(sid)
        if [e.item_order for e in envs] != list(range(1, len(envs) + 1)) or verify(envs, session_id=sid):
            bad += 1
        seen: dict[str, int] = {}
        for e in envs:
            seen[e.item_id] = seen.get(e.item_id, 0) + 1
        dup += sum(c - 1 for c in seen.values())
        at = {e.item_id: (e.item_order, e.hash) for e in envs}
        mine = [iid for (s, iid) in acked if s == sid]
        lost += sum(1 for iid in mine if iid not in at)
        moved += sum(1 for iid in mine if iid in at and at[iid] != acked[(sid, iid)])
        extra += len(set(at) - set(mine))
    return {"acked_items": len(acked), "lost": lost, "duplicated": dup, "moved": moved,
            "sessions_not_verified": bad, "unacknowledged_in_log": extra}


def _log_service(url: str, base: Path, i: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update(CONVLOG_STORE="jetstream", CONVLOG_STREAM_REPLICAS="3", CONVLOG_EMBEDDED="false",
               CONVLOG_DATA_DIR=str(base / f"log{i}"))
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "log", "--nats-url", url, "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL, env=env,
    )


async def _leader(js: Any) -> StreamLeader:
    """The busiest stream's leader, asked again while an election or a reconnect is under way."""
    end = time.monotonic() + RESUME_WITHIN
    while True:
        try:
            return await busiest_leader(js, PREFIX)
        except (LookupError, nats.errors.Error, TimeoutError):
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


async def _rounds(args: argparse.Namespace, nodes: dict[str, EmbeddedNats], url: str) -> dict[str, Any]:
    sessions = [f"lk-{i}" for i in range(args.sessions)]
    load = _Load(sessions)
    clients = [await LogClient.connect(url, name=f"bench-lk-{i}") for i in range(4)]
    rounds: list[dict[str, Any]] = []
    try:
        await wait_service(clients[0])
        for c in clients:
            c.timeout, c.deadline = 2.0, 30.0
        tasks = [asyncio.create_task(load.writer(clients[w % len(clients)], w, args.item_size))
                 for w in range(args.writers)]
        monitor = await nats.connect(url.split(","), max_reconnect_attempts=-1)
        try:
            js = monitor.jetstream(timeout=2)
            for rnd in range(args.rounds):
                t0 = time.monotonic()
                await asyncio.sleep(args.duration)
                rate = load.acked_since(t0) / (time.monotonic() - t0)
                leader = await _leader(js)
                say(f"round {rnd + 1}: {rate:.0f} appends/s; kill -9 {leader.leader} "
                    f"(leads {leader.stream}, {leader.messages} messages)")
                node = nodes[leader.leader or ""]
                killed = time.monotonic()
                if node.proc is not None:
                    node.proc.kill()  # kill -9, by the PID this bench started
                    node.proc.wait()
                while not any(a.sent >= killed for a in load.acks[-200:]):
                    if time.monotonic() - killed > RESUME_WITHIN:
                        raise RuntimeError(f"no append acknowledged {RESUME_WITHIN:.0f}s after the leader kill")
                    await asyncio.sleep(0.05)
                await asyncio.sleep(args.duration / 2)
                after = await _leader(js)
                node.start()  # same port and store: it rejoins and catches up
                await asyncio.sleep(args.duration / 2)
                rounds.append({"killed": leader.leader, "new_leader": after.leader,
                               "appends_per_s_before": round(rate, 1), **_window(load.acks, killed)})
                say(f"round {rnd + 1}: {json.dumps(rounds[-1])}")
        finally:
            load.stop = True
            await asyncio.gather(*tasks)
            await monitor.close()
        check = await _check(clients[0], load)
    finally:
        for c in clients:
            await c.close()
    return {"rounds": rounds, "retries": load.retries, **check}


async def run_leader_kill(args: argparse.Namespace) -> dict[str, Any]:
    """Run the bench; returns its figures (``--json`` prints them as they are)."""
    with tempfile.TemporaryDirectory(prefix="convlog-leader-kill-") as tmp:
        base = Path(tmp)
        say(f"3-node cluster, R3, two log services, {args.writers} writers x {args.sessions} sessions ...")
        with _cluster(base) as nodes:
            urls = [n.url for n in nodes.values()]
            await _wait_r3(urls)
            url = ",".join(urls)
            services = [_log_service(url, base, i) for i in range(2)]
            try:
                result = await _rounds(args, nodes, url)
            finally:
                for p in services:
                    stop_process(p)
    gaps = [r["longest_gap_s"] for r in result["rounds"]]
    resumed = [r["resumed_after_s"] for r in result["rounds"]]
    return {
        "fault": "leader-kill", "writers": args.writers, "sessions": args.sessions, "cores": os.cpu_count(),
        "longest_gap_s": {"min": min(gaps), "median": statistics.median(gaps), "max": max(gaps)},
        "resumed_after_s": {"min": min(resumed), "median": statistics.median(resumed), "max": max(resumed)},
        **result,
    }


def render(r: dict[str, Any]) -> str:
    lines = [f"convlog bench --store jetstream --fault leader-kill: 3 nodes, R3, 2 log services, "
             f"{r['writers']} writers x {r['sessions']} sessions, {r['cores']} cores",
             f"{'round':>5} {'killed':>7} {'new':>5} {'appends/s':>10} {'resumed after s':>16} "
             f"{'longest gap s':>14} {'longest wait s':>15}"]
    for i, x in enumerate(r["rounds"], 1):
        lines.append(f"{i:>5} {x['killed']:>7} {x['new_leader']:>5} {x['appends_per_s_before']:>10.0f} "
                     f"{x['resumed_after_s']:>16.2f} {x['longest_gap_s']:>14.2f} {x['longest_writer_wait_s']:>15.2f}")
    lines.append(f"acknowledged items {r['acked_items']}: lost {r['lost']}, duplicated {r['duplicated']}, "
                 f"moved {r['moved']}; sessions not verified {r['sessions_not_verified']}; "
                 f"appends sent again after the client's 30 s deadline {r['retries']}")
    return "\n".join(lines)
