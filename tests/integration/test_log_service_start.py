"""What the log service has in place before it serves, and what it refuses at start.

Real nats-server processes and the real log service (in-process, SQLite).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from services.log.reconciler import Reconciler
from services.log.service import LogService
from shared.client import LogClient
from shared.config import load_settings
from shared.failures import StreamConfigError
from shared.work import ensure_work_stream, work_stream_name
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer, free_port
from tests.support.procs import run_cli, service_env


async def _notice_ids(nc: Any, stream: str) -> list[str]:
    js = nc.jetstream()
    info = await js.stream_info(stream)
    out: list[str] = []
    if not info.state.messages:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    return out


async def test_a_notice_lost_right_after_a_first_start_is_republished(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: Any
) -> None:
    # A first start: the reconciler's durable consumer does not exist yet. JetStream
    # is slow to create it (a cluster placing it, a busy server); a user message
    # committed as soon as the service says it is ready loses its notice (the
    # process dies between commit and publish). The consumer delivers only what
    # comes after its creation, so it must exist before anything is served.
    real_bind = Reconciler.bind

    async def slow_bind(self: Reconciler) -> None:
        await asyncio.sleep(1.0)
        await real_bind(self)

    monkeypatch.setattr(Reconciler, "bind", slow_bind)
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db")}, {})
    service = LogService(settings)
    await service.start()
    try:
        assert service.notifier is not None and service.reconciler is not None
        service.reconciler.interval = 0.1
        lost: list[tuple[str, int]] = []
        service.notifier._start = lambda sid, order, handoff_to=None: lost.append((sid, order))  # type: ignore[method-assign]
        client = await LogClient.connect(nats_server.url)
        try:
            await client.send("first", "hello")
            stream = work_stream_name(settings.subjects)

            async def announced() -> None:
                assert await _notice_ids(client.nc, stream) == ["first:1"]

            await assert_eventually(announced, timeout=10)
        finally:
            await client.close()
        assert lost == [("first", 1)]  # only the reconciler announced it
        assert service.reconciler.republished == 1
    finally:
        await service.shutdown()


_NO_JS_ACCOUNT = """
accounts { A: { users: [{user: a, password: a}] } }
"""


@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
@pytest.mark.parametrize("case", ["no JetStream", "an account without JetStream"])
async def test_convlog_log_on_a_nats_server_without_jetstream_is_a_configuration_error(
    tmp_path: Path, nats_server_factory: Any, store: str, case: str
) -> None:
    # Nothing heals this: exit 2 at once with a line saying what to fix, not a
    # 60 s wait for "the streams on NATS JetStream" ending in exit 3 (unavailable),
    # which a process manager restarts forever.
    if case == "no JetStream":
        server = nats_server_factory(jetstream=False)
        url = server.url
    else:
        server = nats_server_factory(config=_NO_JS_ACCOUNT)
        url = server.url.replace("nats://", "nats://a:a@")
    data = tmp_path / "data"
    data.mkdir()
    code, _, err = await run_cli("log", "--nats-url", url, "--store", store, env=service_env(data), timeout=30)
    assert code == 2, err
    wanted = "has no JetStream" if case == "no JetStream" else "JetStream is not enabled for this account"
    assert wanted in err.splitlines()[-1], err
    if store == "sqlite":  # a worker too: it needs the routing bucket and its consumer
        code, _, err = await run_cli("worker", "Triage", "--nats-url", url, "--no-embedded",
                                     env=service_env(data),
                                     timeout=30)
        assert code == 2, err
        assert wanted in err.splitlines()[-1], err


@pytest.mark.parametrize("case", ["not NATS", "no JetStream"])
async def test_convlog_log_checks_a_loopback_server_it_did_not_start_before_opening_the_log(
    tmp_path: Path, nats_server_factory: Any, case: str
) -> None:
    # With the embedded server allowed (the default) and something already listening at the
    # loopback URL, `convlog log` went straight to the service start: a port held by another
    # program (not NATS) hung it with no word, and a nats-server without JetStream was named
    # (exit 2) only after convlog.db had been created.
    data = tmp_path / "data"
    data.mkdir()
    env = {**service_env(data), "CONVLOG_EMBEDDED": "true"}
    listener = None
    if case == "not NATS":
        listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        url = f"nats://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        wanted, expected = "did not answer", 3
    else:
        url = nats_server_factory(jetstream=False).url
        wanted, expected = "has no JetStream", 2
    try:
        code, _, err = await run_cli("log", "--nats-url", url, "--start-wait", "2", env=env, timeout=25)
    finally:
        if listener is not None:
            listener.close()
    assert code == expected, err
    assert wanted in err.splitlines()[-1], err
    assert not (data / "convlog.db").exists() and not (data / "jetstream").exists()


async def test_convlog_log_refuses_a_signing_key_not_the_live_log_key_before_starting_nats(
    tmp_path: Path
) -> None:
    # An agent's key as the log service's own (CONVLOG_SIGNING_KEY) with a keyring is refused,
    # but only once the embedded nats-server had been started (its JetStream store created).
    from services.cli.keys_cmds import make_keys

    make_keys(tmp_path / "keys", ["Triage"])
    data = tmp_path / "data"
    env = {**service_env(data), "CONVLOG_EMBEDDED": "true",
           "CONVLOG_KEYRING": str(tmp_path / "keys" / "keyring.json"),
           "CONVLOG_SIGNING_KEY": str(tmp_path / "keys" / "Triage.nk")}
    code, _, err = await run_cli("log", "--nats-url", f"nats://127.0.0.1:{free_port()}", env=env, timeout=30)
    assert code == 2, err
    assert "not the live log service key" in err.splitlines()[-1], err
    assert not (data / "jetstream").exists() and not (data / "convlog.db").exists()


_WRONG_WORK_STREAMS = {
    # A notice for work.entry (every new session's) has no stream: never stored, never answered.
    "other subjects": {"subjects": ["convlog.work.agent.>"], "retention": RetentionPolicy.WORK_QUEUE},
    # A notice published while its agent has no consumer yet is dropped at once.
    "interest retention": {"subjects": ["convlog.work.>"], "retention": RetentionPolicy.INTEREST},
    # Notices nobody acked yet are gone with a nats-server restart.
    "memory storage": {"subjects": ["convlog.work.>"], "retention": RetentionPolicy.WORK_QUEUE,
                       "storage": StorageType.MEMORY},
}


@pytest.mark.parametrize("wrong", sorted(_WRONG_WORK_STREAMS))
async def test_a_work_stream_that_would_lose_notices_is_refused_at_start(
    nats_server: NatsServer, tmp_path: Path, wrong: str
) -> None:
    # Made by hand (or by another tool) before the log service first started: the
    # service took it as it was, and the notices it published were lost silently.
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="CONVLOG_WORK", **_WRONG_WORK_STREAMS[wrong]))
    finally:
        await nc.close()
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db")}, {})
    service = LogService(settings)
    try:
        with pytest.raises(StreamConfigError, match="the work stream CONVLOG_WORK"):
            await service.start()
    finally:
        await service.shutdown()


async def test_a_notice_the_reconciler_failed_to_republish_is_not_acked_past(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # The work stream stops answering (here: it is gone for a while): the notice of a
    # message committed then is lost, and the reconciler's republish fails too. Once the
    # stream is back, the reconciler must still announce it, not ack it away with the
    # next item it handles (its consumer acks everything up to the message acked).
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db")}, {})
    service = LogService(settings)
    await service.start()
    client = await LogClient.connect(nats_server.url)
    try:
        assert service.notifier is not None and service.reconciler is not None
        service.reconciler.interval = 0.1
        js = client.nc.jetstream()
        stream = work_stream_name(settings.subjects)
        await js.delete_stream(stream)
        await client.send("during", "hello?")

        def failed() -> None:
            assert service.notifier is not None and service.notifier.failed == 1

        await assert_eventually(failed, timeout=10)
        await asyncio.sleep(1.0)  # the reconciler tries (and fails) a few times
        assert service.reconciler.republished == 0
        await ensure_work_stream(js, settings.subjects)
        await client.send("after", "hello")  # announced at once; then swept by the reconciler

        async def announced() -> None:
            assert sorted(await _notice_ids(client.nc, stream)) == ["after:1", "during:1"]

        await assert_eventually(announced, timeout=15)
    finally:
        await client.close()
        await service.shutdown()


async def test_streams_kept_at_another_replica_count_are_named_at_start(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Made at 1 replica, then CONVLOG_STREAM_REPLICAS=3 (a move to a cluster): the
    # existing streams stay single copies, which the service accepted silently.
    base = {"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db")}
    first = LogService(load_settings(base, {}))
    await first.start()
    await first.shutdown()
    caplog.clear()
    again = LogService(load_settings({**base, "stream_replicas": 3}, {}))
    await again.start()
    try:
        said = [r.getMessage() for r in caplog.records if "CONVLOG_STREAM_REPLICAS is 3" in r.getMessage()]
        assert any(m.startswith("stream CONVLOG_ITEMS has 1 replica(s)") for m in said), said
        assert any(m.startswith("stream CONVLOG_WORK has 1 replica(s)") for m in said), said
        assert any(m.startswith("stream KV_convlog_routing has 1 replica(s)") for m in said), said
    finally:
        await again.shutdown()
    caplog.clear()
    same = LogService(load_settings(base, {}))
    await same.start()
    await same.shutdown()
    assert not [r for r in caplog.records if "CONVLOG_STREAM_REPLICAS" in r.getMessage()]


async def test_a_shutdown_while_the_store_opens_leaves_nothing_open(nats_server: NatsServer, tmp_path: Path) -> None:
    # SIGTERM (a shutdown) while the start opened the SQLite store: the shutdown closed the
    # store before the open had finished, the open then completed, and its reader
    # connection (aiosqlite's thread, not a daemon) stayed open: `convlog log` logged
    # "log service stopped" and then never exited.
    import threading

    before = set(threading.enumerate())
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db")}, environ={})
    service = LogService(settings)
    start = asyncio.create_task(service.start())
    await asyncio.sleep(0)  # the start is inside the store's open (aiosqlite connects in its thread)
    await service.shutdown()
    await start
    await service.run()  # returns: the service is stopped
    left = [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
    assert not left, left
    assert service.nc is None or service.nc.is_closed


async def test_a_second_log_service_on_the_same_sqlite_file_says_one_runs_and_exits_1(
    nats_server: NatsServer, log_url: str, log_client: LogClient, tmp_path: Path
) -> None:
    # `convlog log` beside a running one on the same --db said "unavailable: ... in use by
    # another log service" and exited 3, the code for "NATS or the log service is not
    # reachable or not running", while one runs (`convlog up` and `migrate` exit 1 there);
    # with no NATS to reach it first waited up to --start-wait for JetStream, then said
    # NATS was unreachable. It is refused at once, exit 1, and changes nothing.
    db = tmp_path / "convlog.db"  # the log_url service's file
    await log_client.append("s", [{"agent": "user", "data": {"role": "user", "content": "one"}}])
    data = tmp_path / "second"
    data.mkdir()
    dead = "nats://127.0.0.1:1"  # nothing listens there
    for url in (nats_server.url, dead):
        code, _, err = await run_cli("log", "--nats-url", url, "--no-embedded", "--db", str(db),
                                     env=service_env(data), timeout=20)
        lines = err.strip().splitlines()
        assert code == 1, (url, err)
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("convlog log: ") and str(db) in lines[0] and "stop it first" in lines[0], err
    # With JSON logs, that line is one JSON object too.
    code, _, err = await run_cli("log", "--nats-url", nats_server.url, "--no-embedded", "--db", str(db),
                                 env={**service_env(data), "CONVLOG_LOG_FORMAT": "json"}, timeout=20)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "stop it first" in json.loads(err)["msg"], err
    # The running service is untouched: it still serves, and the log holds what it wrote.
    reply = await log_client.append("s", [{"agent": "user", "data": {"role": "user", "content": "two"}}])
    assert reply.first_order == 2
    assert [e.data["content"] for e in await log_client.items("s")] == ["one", "two"]
