"""A replicated log under load, for the cluster fault tests.

:func:`cluster_log` starts a 3-node nats-server cluster on loopback and two
``convlog log --store jetstream`` instances on it (R3 stream, each given every
server's URL); :class:`Load` runs 16 writers (4 processes × 4) appending
round-robin over 20 sessions through them.  The writers retry an unanswered
append with the same ``item_id`` for as long as it takes, as a real client
does, and record every acknowledgement with its time.  :func:`check_log`
then proves nothing acknowledged was lost, duplicated or moved.

Everything is black-box: processes, :class:`~shared.client.LogClient`, and the
streams' cluster info for the leader (:mod:`services.bench.leader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats

from services.bench.leader import StreamLeader, busiest_leader
from services.log.service import SERVICE_NAME
from shared.client import LogClient

from .eventually import assert_eventually
from .logsvc import Acks, LogServiceProc, ack_count, check_session, read_acks, writer_proc
from .natscluster import NatsCluster
from .natsd import NatsServer
from .procs import Proc

__all__ = ["ClusterLog", "Load", "appends_served", "check_log", "cluster_log", "gaps", "load"]

PREFIX = "convlog"
SESSIONS = [f"cl-{i:02d}" for i in range(20)]
PROCESSES, PER_PROCESS = 4, 4  # 16 writers


@dataclass
class ClusterLog:
    """The cluster and the two log-service instances on it."""

    cluster: NatsCluster
    services: list[LogServiceProc]

    @property
    def url(self) -> str:
        """Every server, as ``CONVLOG_NATS_URL`` takes them."""
        return ",".join(self.cluster.urls)

    def assert_services_kept_running(self, starts: tuple[int, int] = (1, 1)) -> None:
        """Nobody restarted a log service behind the test's back (``starts`` each)."""
        for svc, n in zip(self.services, starts, strict=True):
            assert svc.proc is not None and svc.proc.running, f"{svc.name} exited:\n{svc.output()[-3000:]}"
            assert svc.starts == n, f"{svc.name} started {svc.starts} times"

    def server(self, name: str) -> NatsServer:
        return next(s for s in self.cluster.servers if s.name == name)

    async def leader(self) -> StreamLeader:
        """The leader of the store's busiest stream, once there is one."""

        async def lookup() -> StreamLeader:
            nc = await nats.connect([s.url for s in self.cluster.servers if s.running], connect_timeout=2,
                                    allow_reconnect=False)
            try:
                return await busiest_leader(nc.jetstream(timeout=2), PREFIX)
            except (LookupError, nats.errors.Error, TimeoutError) as e:
                raise AssertionError(f"no leader yet: {e!r}") from e
            finally:
                await nc.close()

        return await assert_eventually(lookup, timeout=30, interval=0.2)


@contextlib.asynccontextmanager
async def cluster_log(tmp_path: Path) -> AsyncIterator[ClusterLog]:
    """Start the cluster and two JetStream log services; stop them all by PID."""
    cluster = NatsCluster(tmp_path / "cluster")
    services: list[LogServiceProc] = []
    try:
        await asyncio.to_thread(cluster.start)
        await cluster.wait_ready()
        urls = cluster.urls
        for i in range(2):
            # Each instance lists the servers from a different one on.
            url = ",".join(urls[i:] + urls[:i])
            log_dir = tmp_path / f"svc{i}"
            log_dir.mkdir()
            services.append(LogServiceProc(url, tmp_path / "unused.db", log_dir=log_dir, store="jetstream",
                                           env={"CONVLOG_STREAM_REPLICAS": "3"}, name=f"log{i}"))
        # One first, so the two do not race to create the stream.
        await asyncio.to_thread(services[0].start, 30)
        await asyncio.to_thread(services[1].start, 30)
        yield ClusterLog(cluster, services)
    finally:
        for svc in services:
            await asyncio.to_thread(svc.stop)
        await asyncio.to_thread(cluster.stop)


@dataclass
class Load:
    """16 writers over 20 sessions (or ``sessions``), until :meth:`stop`."""

    url: str
    tmp_path: Path
    sessions: list[str] = field(default_factory=lambda: list(SESSIONS))
    cas_processes: int = 0  # the first N processes append with expected_last
    procs: list[tuple[Proc, Path]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop_file = self.tmp_path / "stop-writers"
        self.go_file = self.tmp_path / "go-writers"

    @property
    def outs(self) -> list[Path]:
        return [out for _, out in self.procs]

    async def start(self) -> None:
        for i in range(PROCESSES):
            out = self.tmp_path / f"acks-w{i}.jsonl"
            proc = writer_proc(
                self.url, name=f"w{i}", sessions=self.sessions, out=out, log_dir=self.tmp_path,
                batch_every=5, stop_file=self.stop_file, go_file=self.go_file, max_seconds=120,
                timeout=2.0, deadline=30.0, attempts=20, concurrency=PER_PROCESS, cas=i < self.cas_processes,
            )
            self.procs.append((proc.start(), out))
        for proc, _ in self.procs:
            await asyncio.to_thread(proc.wait_for_line, "connected", 30)
        await asyncio.to_thread(self.go_file.touch)

    async def acked(self, more: int, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """Wait until ``more`` appends beyond now are acknowledged; return the total."""
        base = ack_count(self.outs)

        def grew() -> int:
            n = ack_count(self.outs)
            assert n >= base + more, f"only {n - base} of {more} new acks; writers: {self._alive()}"
            return n

        return await assert_eventually(grew, timeout=timeout, interval=0.05)

    def _alive(self) -> str:
        return ", ".join(f"{p.pid}:{'up' if p.running else 'exited'}" for p, _ in self.procs)

    async def stop(self) -> Acks:
        """Let the writers finish their current append; every one must exit 0."""
        await asyncio.to_thread(self.stop_file.touch)
        for proc, _ in self.procs:
            assert await asyncio.to_thread(proc.wait, 90) == 0, proc.output()[-3000:]
        return read_acks(self.outs)

    def terminate(self) -> None:
        for proc, _ in self.procs:
            proc.terminate()


@contextlib.asynccontextmanager
async def load(url: str, tmp_path: Path, **kwargs: object) -> AsyncIterator[Load]:
    """A started :class:`Load`, its writers stopped by PID on the way out."""
    running = Load(url, tmp_path, **kwargs)  # type: ignore[arg-type]
    try:
        await running.start()
        yield running
    finally:
        await asyncio.to_thread(running.terminate)


async def check_log(url: str, acks: Acks, sessions: list[str]) -> dict[str, int]:
    """Every acknowledged item once, at its acknowledged order with its hash; each
    session's orders 1..n and its chain intact; nothing in the log nobody asked for.

    Returns each session's last order.
    """
    assert acks.done == PROCESSES, f"{acks.done} of {PROCESSES} writer processes finished"
    assert not acks.unknown, f"appends whose outcome stayed unknown: {acks.unknown[:5]}"
    hashes = acks.hashes
    lasts = {}
    async with await LogClient.connect(url) as client:
        total = 0
        for sid in sessions:
            envelopes = await client.items(sid)
            check_session(sid, envelopes, acks.by_item, hashes)
            total += len(envelopes)
            lasts[sid] = len(envelopes)
    # Each acknowledged item is in the log once, and the log holds nothing else.
    assert total == len(acks.by_item), f"the logs hold {total} items, {len(acks.by_item)} were acknowledged"
    return lasts


def gaps(acks: Acks, since: float) -> tuple[float, float, float]:
    """After ``since`` (a wall-clock time), in seconds: to the first ack of an
    append first sent after it; the longest gap between consecutive acks of all
    writers together; the longest one writer waited between two of its acks."""
    resumed = [r["t"] for r in acks.records if r.get("s", 0.0) >= since]
    first = min(resumed) - since if resumed else float("inf")
    times = [t for t, _ in acks.times if t >= since]
    merged = [since, *times]
    longest = max(b - a for a, b in zip(merged, merged[1:], strict=False)) if times else float("inf")
    per: dict[str, list[float]] = {}
    for t, w in acks.times:
        per.setdefault(w, []).append(t)
    stall = 0.0
    for ts in per.values():
        before = [t for t in ts if t < since]
        seq = before[-1:] + [t for t in ts if t >= since]
        stall = max([stall, *(b - a for a, b in zip(seq, seq[1:], strict=False))])
    return first, longest, stall


async def appends_served(url: str) -> dict[str, int]:
    """Append requests each log-service instance answered, by instance id, from
    ``$SRV.STATS`` (both instances must answer the ping first)."""
    nc = await nats.connect(url.split(","), connect_timeout=2)
    try:
        ids: set[str] = set()
        inbox = nc.new_inbox()

        async def pong(msg: nats.aio.msg.Msg) -> None:
            ids.add(json.loads(msg.data)["id"])

        sub = await nc.subscribe(inbox, cb=pong)

        async def both() -> None:
            await nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
            await nc.flush()
            assert len(ids) >= 2, f"instances answering: {sorted(ids)}"

        await assert_eventually(both, timeout=30, interval=0.2)  # a second instance may still be starting
        await sub.unsubscribe()
        served = {}
        for sid in sorted(ids):
            stats = json.loads((await nc.request(f"$SRV.STATS.{SERVICE_NAME}.{sid}", b"", timeout=5)).data)
            served[sid] = next(e["num_requests"] for e in stats["endpoints"] if e["name"] == "append")
        return served
    finally:
        await nc.close()
