"""The whole log service on the JetStream store (``--store jetstream``).

Append/read/sessions through the service, two service instances serving one
session at once (one contiguous, verified history), the CLI flag in a real
``convlog log`` process, and agent workers fed from ``convlog.items.<sid>``,
which on this store is the log's own stream (no outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from services.log.service import LogService
from services.log.store.jetstream import JetStreamStore
from shared.chain import verify
from shared.client import LogClient
from shared.codec import decode
from shared.config import ConfigError, Settings, load_settings
from shared.errors import BadRequestError, ConflictError
from shared.messages import AppendItem, AppendRequest, Envelope
from shared.subjects import Subjects
from tests.support.eventually import assert_eventually
from tests.support.logsvc import LogServiceProc, check_session, following, service_env
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT
from tests.support.workerstack import SEED_SPEC, is_user, terminal_items, worker_stack


def user(content: str, **extra: Any) -> dict[str, Any]:
    return {"agent": "user", "data": {"role": "user", "content": content}, **extra}


def js_settings(server: NatsServer, tmp: Path) -> Settings:
    return load_settings(
        {"nats_url": server.url, "data_dir": str(tmp), "store": "jetstream"}, environ={}
    )


@contextlib.asynccontextmanager
async def services(settings: Settings, n: int) -> AsyncIterator[list[LogService]]:
    started: list[LogService] = []
    try:
        for _ in range(n):
            svc = LogService(settings)
            await svc.start()
            started.append(svc)
        yield started
    finally:
        for svc in started:
            await svc.shutdown()


@contextlib.asynccontextmanager
async def client_of(server: NatsServer) -> AsyncIterator[LogClient]:
    nc = await nats.connect(server.url)
    try:
        yield LogClient(nc, timeout=5, deadline=20)
    finally:
        await nc.close()


def test_the_store_setting_is_checked_at_startup() -> None:
    assert load_settings({}, environ={}).store == "sqlite"
    assert load_settings({}, environ={"CONVLOG_STORE": "jetstream"}).store == "jetstream"
    with pytest.raises(ConfigError, match="CONVLOG_STORE"):
        load_settings({}, environ={"CONVLOG_STORE": "postgres"})


async def test_append_read_tail_and_sessions_through_the_service(nats_server: NatsServer, tmp_path: Path) -> None:
    async with services(js_settings(nats_server, tmp_path), 1) as (svc,), client_of(nats_server) as client:
        assert isinstance(svc.store, JetStreamStore) and svc.outbox is None
        async with following(client, "a") as seen:
            r = await client.append("a", [user("one", item_id="one"), user("two")])
            assert (r.first_order, r.last_order) == (1, 2)
            await client.append("a", [{"agent": "system", "kind": "retract", "data": {"target": 1}}])
            await client.append("a", [user("three")], expected_last=3)
            with pytest.raises(ConflictError) as conflict:
                await client.append("a", [user("late")], expected_last=1)
            assert conflict.value.last_order == 4
            with pytest.raises(BadRequestError):
                await client.append("a", [{"agent": "system", "kind": "retract", "data": {"target": 3}}])
            dup = await client.append("a", [user("one", item_id="one")])
            assert dup.items[0].duplicate and dup.items[0].item_order == 1
            await client.append("b", [user("other")])

            raw = await client.items("a")
            assert [e.item_order for e in raw] == [1, 2, 3, 4]
            assert verify(raw, session_id="a") is None
            assert [e.data["content"] for e in await client.visible("a")] == ["two", "three"]
            assert [e.data["content"] for e in await client.tail("a", 1)] == ["three"]
            listing = await client.sessions()
            assert [(s.session_id, s.last_order) for s in listing.sessions] == [("a", 4), ("b", 1)]
            # Followers read convlog.items.<sid>: the stream itself, every envelope once, in order.
            async def all_four() -> None:
                assert [e.item_order for e in seen] == [1, 2, 3, 4], seen
            await assert_eventually(all_four, timeout=10)
            assert seen == raw


async def test_two_instances_serve_one_session_at_once(nats_server: NatsServer, tmp_path: Path) -> None:
    settings = js_settings(nats_server, tmp_path)
    async with services(settings, 2) as (first, second), client_of(nats_server) as client:
        # 8 writers x 25 appends on one session, through the queue group: both
        # instances take appends, each deciding on its own cached head.
        async def writer(w: int) -> list[tuple[str, int]]:
            out = []
            for i in range(25):
                r = await client.append("shared", [user(f"w{w}.{i}", item_id=f"w{w}-{i}")])
                out.append((r.items[0].item_id, r.items[0].item_order))
            return out

        acked = [a for got in await asyncio.gather(*(writer(w) for w in range(8))) for a in got]
        assert first.tally["append"] > 0 and second.tally["append"] > 0
        log = await client.items("shared")
        check_session("shared", log, {("shared", iid): o for iid, o in acked})
        assert len(log) == 200

        # Stop one instance: the other carries on alone, with nothing to hand over.
        await first.shutdown()
        r = await client.append("shared", [user("after", item_id="after")], expected_last=200)
        assert r.last_order == 201
        retry = await client.append("shared", [user("w0.0", item_id="w0-0")])
        assert retry.items[0].duplicate and retry.items[0].item_order == dict(acked)["w0-0"]


async def test_convlog_log_store_flag_runs_the_service_on_jetstream(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    svc = LogServiceProc(nats_server.url, tmp_path / "unused.db", log_dir=tmp_path, store="jetstream").start()
    try:
        async with client_of(nats_server) as client:
            r = await client.append("cli", [user("hello")])
            assert r.last_order == 1
            assert [e.data["content"] for e in await client.items("cli")] == ["hello"]
        assert "jetstream:CONVLOG_LOG_0" in svc.output()
        assert not (tmp_path / "unused.db").exists()
    finally:
        svc.stop()


async def test_workers_answer_from_the_stream_on_the_jetstream_store(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with worker_stack(nats_server, tmp_path, None, store="jetstream") as stack:
        assert isinstance(stack.service.store, JetStreamStore)
        await stack.start_workers(
            *(stack.worker(a, SEED_SPEC, openai=False) for a in ("Triage", "L1Billing", "L1Technical", "L2Support"))
        )
        await stack.send("js-seed", "Hi, I was charged twice for my subscription this month.")
        log = await stack.answered("js-seed", users=1)
        users = [e for e in log if is_user(e)]
        assert terminal_items(log, users[0])[0].agent == "L1Billing"
        assert verify(log, session_id="js-seed") is None


async def test_an_r3_log_on_a_three_node_cluster(nats_cluster: Any, tmp_path: Path) -> None:
    # Atomic batches, per-subject OCC and direct gets on a replicated stream:
    # two instances on different nodes write one session, a third node reads it.
    urls = nats_cluster.urls
    stores = [
        JetStreamStore({"servers": [url]}, subjects=Subjects("r3"), replicas=3) for url in urls
    ]
    for s in stores:
        await s.open()
    try:
        replies = await asyncio.gather(
            *(stores[i % 2].append("s", AppendRequest(items=[AppendItem(
                agent="user", data={"role": "user", "content": f"m{i}"}, item_id=f"id-{i}")]))
              for i in range(40))
        )
        stored = [decode(b, Envelope) for b in (await stores[2].read("s", after=0, limit=100, max_bytes=1 << 30)).items]
        check_session("s", stored, {("s", r.items[0].item_id): r.items[0].item_order for r in replies})
        assert len(stored) == 40
        js = stores[0]._nc.jetstream()  # type: ignore[union-attr]
        for name in (*stores[0].layout.log_streams, stores[0].layout.stream):
            assert (await js.stream_info(name)).config.num_replicas == 3
        assert (await js.stream_info(stores[0].layout.log_streams[0])).config.allow_atomic
    finally:
        for s in stores:
            await s.close()


async def test_another_shard_count_over_an_existing_log_refuses_to_start_in_one_line(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("convlog")) as store:
        await store.append("a", AppendRequest(items=[AppendItem(agent="user", data={"role": "user", "content": "x"})]))
    env = {**service_env(tmp_path), "CONVLOG_SHARDS": "2"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "log", "--store", "jetstream", "--nats-url", nats_server.url,
        "--no-embedded", cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    (line,) = [x for x in err.decode().splitlines() if x.startswith("convlog log:")]
    assert "created with CONVLOG_SHARDS=1, not 2: start every log service with CONVLOG_SHARDS=1" in line
    # Nothing was created for a second shard.
    nc = await nats.connect(nats_server.url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().stream_info("CONVLOG_LOG_1")
    finally:
        await nc.close()
