"""Failures are loud: a fatal one ends the process non-zero, a transient one heals.

The rule of :mod:`shared.failures`, tried on real ``convlog log`` and
``convlog worker`` processes: when the items stream stops fitting (replaced
by a stream for other subjects, or by one holding another database's items)
the log service must not go on acknowledging appends nobody publishes; it
logs one line naming the cause and exits 1, so its process manager restarts
it.  A NATS outage, on the other hand, is waited out without a restart.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable
from pathlib import Path

import nats
from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig

from shared.client import LogClient
from shared.errors import UnavailableError
from shared.messages import AppendItem
from tests.support.eventually import assert_eventually
from tests.support.logsvc import SUBJECTS, LogServiceProc, service_env, stream_matches_log
from tests.support.natsd import NatsServer
from tests.support.procs import Proc
from tests.support.workerstack import solo_spec

STREAM = SUBJECTS.stream_name
WORK = "CONVLOG_WORK"


def _item(text: str) -> AppendItem:
    return AppendItem(agent="user", data={"role": "user", "content": text})


def _fatal_line(output: str) -> str:
    """The one CRITICAL line a fatal failure logs."""
    lines = [line for line in output.splitlines() if " CRITICAL " in line]
    assert len(lines) == 1, f"expected one CRITICAL line:\n{output}"
    return lines[0]


async def _replace_stream(url: str, subjects: list[str]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.delete_stream(STREAM)
        await js.add_stream(StreamConfig(name=STREAM, subjects=subjects))
    finally:
        await nc.close()


async def test_a_stream_for_other_subjects_stops_the_log_service_with_exit_1(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        await client.append("loud", [_item("first")])
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, ["loud"]), timeout=10, interval=0.1
        )
        # Someone replaces the items stream with one that captures other subjects.
        await _replace_stream(nats_server.url, ["elsewhere.>"])
        # The append is durable and acknowledged; publishing it is what fails.
        await client.append("loud", [_item("second")])

    assert svc.proc is not None
    assert await asyncio.to_thread(svc.proc.wait, 20) == 1, svc.output()
    line = _fatal_line(svc.output())
    assert "outbox stopped: StreamConfigError" in line
    assert f"the items stream {STREAM} captures ['elsewhere.>'], not convlog.items.>" in line
    assert "Traceback" not in svc.output()  # a known condition: one line, no stack
    assert svc.output().rstrip().splitlines()[-1].startswith("convlog log: outbox stopped:")

    # The process manager restarts it: still wrong, so it refuses to start, naming the cause.
    restarted = Proc(svc.proc.args, log_dir=svc.log_dir, env=svc.proc.env, name="restart").start()
    try:
        assert await asyncio.to_thread(restarted.wait, 20) == 1, restarted.output()
        assert "captures ['elsewhere.>']" in restarted.output()
    finally:
        restarted.terminate()

    # Once the stream is put right (here: deleted, so the service recreates it),
    # a restart republishes every committed item, the second one included.
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().delete_stream(STREAM)
    await nc.close()
    await asyncio.to_thread(svc.start)
    async with await LogClient.connect(nats_server.url) as client:
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, ["loud"]), timeout=15, interval=0.1
        )
        assert len(await client.items("loud")) == 2


async def test_a_refusal_no_resync_cures_stops_the_log_service(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    """The stream is replaced by one for the right subjects whose messages
    may not exceed 64 bytes: every envelope is refused, however often the
    outbox resyncs."""
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        await client.append("small", [_item("first")])
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, ["small"]), timeout=10, interval=0.1
        )
        nc = client.nc
        await nc.jetstream().delete_stream(STREAM)
        await nc.jetstream().add_stream(
            StreamConfig(name=STREAM, subjects=[SUBJECTS.items_all], max_msg_size=64)
        )
        await client.append("small", [_item("second")])

    assert svc.proc is not None
    assert await asyncio.to_thread(svc.proc.wait, 20) == 1, svc.output()
    line = _fatal_line(svc.output())
    assert re.search(r"outbox stopped: StreamRefusedError: the items stream CONVLOG_ITEMS "
                     r"refused small:[12]\b.*: message size exceeds maximum allowed", line), line


async def test_a_stream_holding_another_databases_items_stops_the_log_service(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    """The stream's tail is an item this database never committed: the next
    window is refused ("wrong last msg ID"), the resync finds the stranger, and
    no resync can cure that."""
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        await client.append("mine", [_item("first")])
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, ["mine"]), timeout=10, interval=0.1
        )
        js = client.nc.jetstream()
        await js.publish(SUBJECTS.items("theirs"), b"{}", headers={"Nats-Msg-Id": "theirs:7"})
        await client.append("mine", [_item("second")])

    assert svc.proc is not None
    assert await asyncio.to_thread(svc.proc.wait, 20) == 1, svc.output()
    line = _fatal_line(svc.output())
    assert "outbox stopped: StreamMismatchError" in line
    assert "ends with 'theirs:7', which this database does not hold" in line


async def test_a_nats_outage_is_waited_out_without_exiting(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    """Appends keep coming while nats-server is killed and started again: the
    outbox's publishes fail (transient), it resyncs, and nothing exits."""
    sid = "outage"
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    acked = 0
    stop = asyncio.Event()

    async def appender(client: LogClient) -> None:
        nonlocal acked
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await client.append(sid, [_item(f"m{n}")])
                acked += 1
            except UnavailableError:
                pass  # the outage; the same ids are safe to drop here

    async def more_acks(than: int) -> None:
        assert acked >= than + 20, acked

    async with await LogClient.connect(nats_server.url) as client:
        client.timeout, client.deadline = 0.5, 2.0
        task = asyncio.create_task(appender(client))
        try:
            await assert_eventually(lambda: more_acks(0), timeout=10)
            await asyncio.to_thread(nats_server.kill)  # SIGKILL: the stream may lose its tail
            await asyncio.sleep(1.0)  # the outage itself
            await asyncio.to_thread(nats_server.start)
            before = acked
            await assert_eventually(lambda: more_acks(before), timeout=30, interval=0.1)
        finally:
            stop.set()
            await task
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, [sid]), timeout=30, interval=0.2
        )
    assert svc.proc is not None and svc.proc.running, svc.output()
    assert " CRITICAL " not in svc.output()


async def _worker_exit(url: str, tmp_path: Path) -> tuple[int, str]:
    """Run ``convlog worker Solo`` until it exits (30 s at most): (exit code, output)."""
    spec = solo_spec(tmp_path / "agents.toml")
    env = service_env(tmp_path / "convlog-data")
    env.pop("OPENAI_API_KEY", None)
    worker = Proc(
        [sys.executable, "-m", "services.cli.main", "worker", "Solo", "--agents", str(spec),
         "--nats-url", url, "--no-embedded", "--grace", "1"],
        log_dir=tmp_path, env=env, name="worker-solo",
    ).start()
    try:
        return await asyncio.to_thread(worker.wait, 30), worker.output()
    finally:
        worker.terminate()


async def test_a_worker_on_a_stream_for_other_subjects_exits_1(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The work stream exists but captures other subjects: the agent's
    consumer would wait forever for notices that never come (a silent stall)."""
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().add_stream(StreamConfig(name=WORK, subjects=["elsewhere.>"]))
    await nc.close()

    code, output = await _worker_exit(nats_server.url, tmp_path)

    assert code == 1, output
    line = _fatal_line(output)
    assert re.search(r"worker Solo pulls stopped: StreamConfigError: the work stream "
                     r"CONVLOG_WORK captures \['elsewhere\.>'\], not convlog\.work\.>", line), line
    assert output.rstrip().splitlines()[-1].startswith("convlog worker: worker Solo pulls stopped")


async def test_a_worker_whose_consumer_cannot_be_created_exits_1(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The stream allows one consumer and another one holds it: the agent's
    consumer is refused, and "keeping the existing consumer" would keep nothing."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=WORK, subjects=["convlog.work.>"], max_consumers=1,
                                     retention=RetentionPolicy.WORK_QUEUE))
    await js.add_consumer(WORK, ConsumerConfig(durable_name="someone-else", filter_subject="convlog.work.x"))
    await nc.close()

    code, output = await _worker_exit(nats_server.url, tmp_path)

    assert code == 1, output
    line = _fatal_line(output)
    assert re.search(r"worker Solo pulls stopped: ConsumerConfigError: cannot create the consumer "
                     r"convlog-agent-Solo on the work stream CONVLOG_WORK: maximum consumers", line), line
