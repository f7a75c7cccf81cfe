"""``convlog health`` against a real stack, healthy and broken in each way we can break it.

Each unhealthy state is produced for real: a worker stopped (nothing pulls
from its consumer; then a message waits on it), a JetStream cluster that
lost its quorum (the log service serves, but the fan-out falls behind), the
log service stopped, NATS stopped.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import nats

from services.cli.health import check
from services.log.service import LogService
from services.worker.intake import consumer_config
from shared.client import LogClient
from shared.config import load_settings
from shared.subjects import Subjects
from shared.work import work_stream_name, work_subject
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import slow, text
from tests.support.logsvc import service_env
from tests.support.natscluster import NatsCluster
from tests.support.natsd import NatsServer
from tests.support.procs import Proc
from tests.support.workerstack import SEED_SPEC, WorkerStack, run_cli, solo_spec

AGENTS = ("Triage", "L1Billing", "L1Technical", "L2Support")


async def health(stack: WorkerStack, *args: str) -> tuple[int, str]:
    code, out, err = await run_cli(
        "health", "--nats-url", stack.server.url, "--no-embedded", "--window", "1", *args,
        env=service_env(stack.tmp / "health-data"),
    )
    return code, out + err


def fails(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL")]


async def test_health_names_a_stopped_worker_then_a_stopped_log_service_then_nats(
    stack: WorkerStack,
) -> None:
    procs = await stack.start_workers(*(stack.worker(a, SEED_SPEC, openai=False) for a in AGENTS))
    await stack.send("h1", "Hi, I was charged twice for my subscription this month.")
    await stack.answered("h1", users=1)

    # Healthy: every part answers and keeps up.
    code, out = await health(stack, "--agents", str(SEED_SPEC))
    assert code == 0, out
    assert not fails(out)
    for agent in AGENTS:
        assert f"ok    agent {agent}: consumer draining" in out
    assert "fan-out current" in out

    # Triage's worker stops: nothing pulls from its consumer.
    procs[0].terminate()
    code, out = await health(stack)
    assert code == 1, out
    assert fails(out) == [
        "FAIL  agent Triage: no worker is pulling from consumer convlog-agent-Triage "
        "(none asked for notices in 1s)"
    ]

    # A user message arrives: it waits on Triage's consumer and nobody takes it.
    await stack.send("h2", "Hello?")
    code, out = await health(stack)
    assert code == 1, out
    (line,) = fails(out)
    assert line.startswith("FAIL  agent Triage: consumer convlog-agent-Triage has 1 turn notices "
                           "waiting"), out
    assert "is a worker for Triage running?" in line

    # An agent of the spec that never had a worker.
    code, out = await health(stack, "--agents", str(_spec_with_extra_agent(stack.tmp)))
    assert code == 1
    assert "FAIL  agent Auditor: no consumer convlog-agent-Auditor (no worker of it has started)" in out

    # The log service stops.
    await stack.service.shutdown()
    code, out = await health(stack)
    assert code == 1
    assert "FAIL  log service: no instance answers $SRV.STATS.convlog-log for prefix 'convlog'" in out

    # NATS stops.
    stack.server.stop()
    code, out = await health(stack)
    assert code == 1
    assert fails(out)[0].startswith(f"FAIL  NATS: no server answers at {stack.server.url}"), out


def _spec_with_extra_agent(tmp: Path) -> Path:
    path = tmp / "extra.toml"
    path.write_text(SEED_SPEC.read_text() + '\n[[agents]]\nname = "Auditor"\n'
                    'instructions = "Audit."\n', encoding="utf-8")
    return path


async def test_health_reports_a_fan_out_that_falls_behind(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    # The log service on node 1 of a 3-node JetStream cluster, items stream R3.
    url = nats_cluster.urls[0]
    settings = load_settings({"nats_url": url, "db": str(tmp_path / "log.db"), "stream_replicas": 3,
                              "grace": 1}, environ={})
    # A long ack wait: the outbox keeps waiting for the stuck window rather than resending it
    # (a resend while the first is pending is refused with 10158 and retried: only noise here).
    service = LogService(settings, outbox_ack_timeout=60.0)
    await service.start()
    client = await LogClient.connect(url)
    env = service_env(tmp_path / "health-data")

    async def health(*args: str) -> tuple[int, str]:
        code, out, err = await run_cli("health", "--nats-url", url, "--no-embedded", "--window", "1",
                                       "--max-lag", "1", *args, env=env)
        return code, out + err

    try:
        await client.append("f1", [{"agent": "user", "data": {"role": "user", "content": "a"}}])
        code, out = await health()
        assert code == 0, out
        assert "fan-out current (0 items" in out

        # Two of three nodes go: JetStream has no quorum, so nothing can be published;
        # node 1 still serves core NATS, and appends still commit to SQLite.
        for server in nats_cluster.servers[1:]:
            await asyncio.to_thread(server.stop)
        for i in range(3):
            await client.append("f1", [{"agent": "user", "data": {"role": "user", "content": str(i)}}])

        async def behind() -> str:
            code, out = await health()
            assert code == 1, out
            assert any("the fan-out is 3 items /" in line for line in fails(out)), out
            return out

        out = await assert_eventually(behind, timeout=20, interval=0.5)
        assert "items are not reaching convlog.items.>" in out
        assert "ok    log service: 1 instance(s) answer" in out  # serving; only the fan-out lags
    finally:
        await client.close()
        await service.shutdown()


# NATS going away during a check is a FAIL line, not a traceback: `--every` (the watcher in
# deploy/supervisord.conf) died and `--wait` gave up, just when the stack was unhealthy.
async def test_health_reports_nats_lost_during_the_check(nats_server: NatsServer, tmp_path: Path) -> None:
    settings = load_settings({"nats_url": nats_server.url, "data_dir": str(tmp_path)}, environ={})
    # No log service: the check waits `timeout` seconds for $SRV.STATS replies; NATS stops meanwhile.
    checking = asyncio.create_task(check(settings, agents=[], timeout=3.0))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(nats_server.stop)
    report = await asyncio.wait_for(checking, 30)
    assert not report.healthy
    assert any(p.startswith(f"NATS: the connection to {nats_server.url} was lost") for p in report.problems), \
        report.lines()


# NATS going away while the consumers are watched: the watch's polls went unanswered and its
# first snapshot stood, so an agent with notices waiting was blamed ("delivered or acked none
# ... is a worker for A running?") and the lost connection was not named at all.
async def test_health_reports_nats_lost_while_the_consumers_are_watched(
        nats_server: NatsServer, tmp_path: Path) -> None:
    from shared.work import ensure_work_stream

    subjects = Subjects("convlog")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_work_stream(js, subjects)
        await js.add_consumer(work_stream_name(subjects), consumer_config(subjects, "A", entry=False, ack_wait=30))
        await js.publish(work_subject(subjects, "A"), b"{}")  # waits: the watch runs its whole window
    finally:
        await nc.close()
    settings = load_settings({"nats_url": nats_server.url, "data_dir": str(tmp_path)}, environ={})
    checking = asyncio.create_task(check(settings, agents=[], window=4.0, timeout=0.5))
    await asyncio.sleep(1.5)  # $SRV.STATS waited out (no log service); the consumer watch is under way
    await asyncio.to_thread(nats_server.stop)
    report = await asyncio.wait_for(checking, 30)
    assert any(p.startswith(f"NATS: the connection to {nats_server.url} was lost") for p in report.problems), \
        report.lines()
    assert not [p for p in report.problems if p.startswith("agent A")], report.lines()


# NATS going away while the log service's read is awaited: the read's failure was taken for
# the service's ("a read was not answered within 2s"), sending the operator after a log
# service that was serving; the check names the lost connection, as its other steps do.
async def test_health_reports_nats_lost_during_the_log_read(
        nats_server: NatsServer, tmp_path: Path, monkeypatch: Any) -> None:
    from services.log.handlers import Handlers

    answer = Handlers.read

    async def slow_read(self: Handlers, subject: str, body: bytes) -> bytes:
        await asyncio.sleep(3)  # widens the window: NATS stops while the read is awaited
        return await answer(self, subject, body)

    monkeypatch.setattr(Handlers, "read", slow_read)
    service = LogService(load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db")},
                                       environ={}))
    await service.start()
    try:
        settings = load_settings({"nats_url": nats_server.url, "data_dir": str(tmp_path)}, environ={})
        checking = asyncio.create_task(check(settings, agents=[], timeout=2.0))
        await asyncio.sleep(1.0)  # $SRV.STATS answered (and 0.3 s for others); the read is awaited
        await asyncio.to_thread(nats_server.stop)
        report = await asyncio.wait_for(checking, 30)
        await asyncio.to_thread(nats_server.start)  # the service stops at once, not reconnecting
    finally:
        await service.shutdown()
    assert any(p.startswith(f"NATS: the connection to {nats_server.url} was lost") for p in report.problems), \
        report.lines()
    assert not [p for p in report.problems if "was not answered" in p], report.lines()


# NATS going away while the work stream's consumers are listed: reported as "cannot list its
# consumers (...): is JetStream available?", not as the lost connection it was.
async def test_health_reports_nats_lost_while_the_consumers_are_listed(
        nats_server: NatsServer, tmp_path: Path) -> None:
    from shared.work import ensure_work_stream

    nc = await nats.connect(nats_server.url)
    try:
        await ensure_work_stream(nc.jetstream(), Subjects("convlog"))
    finally:
        await nc.close()
    settings = load_settings({"nats_url": nats_server.url, "data_dir": str(tmp_path)}, environ={})
    checking = asyncio.create_task(check(settings, agents=[], window=1.0, timeout=1.0))
    await asyncio.sleep(0.4)  # connected; $SRV.STATS awaited (no log service)
    await asyncio.to_thread(nats_server.pause)  # the listing, sent at 1 s, is not answered (3 s) ...
    await asyncio.sleep(1.6)
    await asyncio.to_thread(nats_server.kill)  # ... and the server goes away meanwhile
    report = await asyncio.wait_for(checking, 30)
    assert any(p.startswith(f"NATS: the connection to {nats_server.url} was lost") for p in report.problems), \
        report.lines()
    assert not [p for p in report.problems if "cannot list" in p], report.lines()


async def test_health_wait_returns_once_the_stack_is_up(nats_server: NatsServer, tmp_path: Path) -> None:
    env = service_env(tmp_path / "health-data")
    base = ["--nats-url", nats_server.url, "--no-embedded", "--window", "1"]
    # Nothing serves: --wait gives up after its time and reports as one check does.
    code, out, err = await run_cli("health", *base, "--wait", "3", env=env)
    assert code == 1 and "FAIL  log service" in out, out + err
    assert "waiting up to 3s" in err
    # Started before the log service, it returns 0 once the service answers.
    waiting = Proc([sys.executable, "-m", "services.cli.main", "health", *base, "--wait", "60"],
                   log_dir=tmp_path, env=env, name="health-wait").start()
    try:
        await asyncio.to_thread(waiting.wait_for_line, "waiting up to 60s", 30)
        settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db")}, environ={})
        async with LogService(settings):
            assert await asyncio.to_thread(waiting.wait, 60) == 0, waiting.output()
        assert "ok    log service" in waiting.output()
    finally:
        waiting.terminate()
    # --every with --wait (the watcher of deploy/supervisord.conf, started with the stack):
    # its first line is the verdict once the stack is up, not its start called UNHEALTHY.
    watcher = Proc([sys.executable, "-m", "services.cli.main", "health", *base, "--every", "60",
                    "--wait", "60"], log_dir=tmp_path, env=env, name="health-every").start()
    try:
        await asyncio.sleep(2)  # a few runs find no log service
        async with LogService(settings):
            await asyncio.to_thread(watcher.wait_for_line, " healthy", 30)
        assert "UNHEALTHY" not in watcher.output() and "waiting" not in watcher.output(), watcher.output()
    finally:
        watcher.terminate()


# a consumer whose only notice is a turn under way is draining: nothing waits (it was called stuck)
async def test_health_is_ok_while_a_worker_is_busy_with_a_long_turn(stack: WorkerStack) -> None:
    spec = solo_spec(stack.tmp / "solo.toml")
    assert stack.fake is not None
    stack.fake.script([slow(12, text("done"))])
    await stack.start_workers(stack.worker("Solo", spec))
    await stack.send("busy1", "Hi")
    await stack.requests_at_least(1)  # the model call is under way, the notice in flight

    code, out, err = await run_cli(
        "health", "--nats-url", stack.server.url, "--no-embedded", "--window", "1",
        env=service_env(stack.tmp / "health-data"))
    assert code == 0, out + err


async def test_the_idle_consumer_of_an_agent_removed_from_the_spec_passes(stack: WorkerStack) -> None:
    """An agent dropped from the spec keeps its durable consumer, which no worker pulls
    from again: health failed on it at every run ('no worker is pulling'), for good.
    With the spec given, an idle consumer of an agent it no longer has passes; one
    with notices waiting still fails."""
    spec = solo_spec(stack.tmp / "solo.toml")
    await stack.start_workers(stack.worker("Solo", spec))
    await stack.send("gone1", "Hi")
    nc = await nats.connect(stack.server.url)
    try:
        js = nc.jetstream()
        subjects = Subjects("convlog")
        await js.add_consumer(work_stream_name(subjects),
                              consumer_config(subjects, "Gone", entry=False, ack_wait=30))
        base = ["health", "--nats-url", stack.server.url, "--no-embedded", "--window", "1"]
        env = service_env(stack.tmp / "health-data")
        code, out, err = await run_cli(*base, "--agents", str(spec), env=env)
        assert code == 0, out + err
        assert "ok    agent Gone: not in the agents spec; its consumer convlog-agent-Gone is idle" in out
        code, out, _ = await run_cli(*base, env=env)  # without the spec it cannot know
        assert code == 1 and "agent Gone: no worker is pulling" in out, out
        await js.publish(work_subject(subjects, "Gone"), b"{}")
        code, out, _ = await run_cli(*base, "--agents", str(spec), env=env)
        assert code == 1 and "FAIL  agent Gone: consumer convlog-agent-Gone has 1 turn notices waiting" in out, out
        assert "(Gone is not in the agents spec)" in out
    finally:
        await nc.close()


async def test_health_uses_the_nats_py_seam_configured(log_url: str, tmp_path: Path, monkeypatch: Any) -> None:
    """CONVLOG_NATS_SEAM=public means nats-py's public API only; `convlog health`'s
    read went over the fast seam all the same (its connection was never bound)."""
    import shared.nats_connect
    from shared.nats_seam import PUBLIC, seam_for

    made: list[Any] = []
    connect = shared.nats_connect.connect

    async def recording(*args: Any, **kwargs: Any) -> Any:
        nc = await connect(*args, **kwargs)
        made.append(nc)
        return nc

    monkeypatch.setattr(shared.nats_connect, "connect", recording)
    settings = load_settings({"nats_url": log_url, "nats_seam": "public", "data_dir": str(tmp_path)}, environ={})
    report = await check(settings, agents=[])
    assert any("a read took" in line for line in report.ok), report
    assert len(made) == 1 and seam_for(made[0]) is PUBLIC


# A cluster keeps serving with one node hung (a GC or disk stall, a SIGSTOP): its port still
# accepts connections, but no INFO comes.  Health made its one connection with reconnects
# off, and nats-py gives up on the first server it picks (at random) when that server does
# not answer: "FAIL NATS: no server answers" for a third of the runs, while two nodes and
# the log service answered.
async def test_health_connects_past_a_hung_node_of_the_cluster(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    import random

    settings = load_settings({"nats_url": ",".join(nats_cluster.urls[:2]), "db": str(tmp_path / "log.db"),
                              "stream_replicas": 3, "grace": 1}, environ={})
    hung = nats_cluster.servers[2]
    async with LogService(settings):
        await asyncio.to_thread(hung.pause)
        try:
            urls = load_settings({"nats_url": ",".join(nats_cluster.urls)}, environ={})
            for seed in (0, 1, 4):  # nats-py shuffles the URLs: with these, each node comes first once
                random.seed(seed)
                report = await check(urls, agents=[], window=0.5, timeout=1.0)
                assert not [p for p in report.problems if p.startswith("NATS")], (seed, report.lines())
                assert report.ok[0] == f"NATS: connected to {urls.nats_url}", (seed, report.lines())
        finally:
            hung.resume()


# The consumers were watched one request at a time, each waiting up to window + 2 s: with
# JetStream stopping mid-check (a stalled server), one run took that many times the agents
# (18 s for 6 agents and a 1 s window), past the health timer unit's 30 s with a dozen agents.
async def test_the_consumer_watch_ends_with_its_window_when_jetstream_stops_answering(
        nats_server: NatsServer) -> None:
    import time

    from services.cli.health import Report, _check_consumers
    from shared.work import ensure_work_stream

    subjects = Subjects("convlog")
    agents = [f"Agent{i}" for i in range(6)]
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_work_stream(js, subjects)
        for agent in agents:  # a notice waits on each: no progress, so the watch runs its window
            await js.add_consumer(work_stream_name(subjects),
                                  consumer_config(subjects, agent, entry=False, ack_wait=30))
            await js.publish(work_subject(subjects, agent), b"{}")
        settings = load_settings({"nats_url": nats_server.url}, environ={})
        report = Report()
        watch = asyncio.create_task(_check_consumers(nc, settings, report, agents=agents, window=1.0, denied=[]))
        await asyncio.sleep(0.4)  # the first listing is in; the watch polls
        started = time.monotonic()
        await asyncio.to_thread(nats_server.pause)
        try:
            await asyncio.wait_for(watch, 30)
        finally:
            nats_server.resume()
        assert time.monotonic() - started < 3.5, time.monotonic() - started
        assert len([p for p in report.problems if "delivered or acked none" in p]) == len(agents), report.lines()
    finally:
        await nc.close()
