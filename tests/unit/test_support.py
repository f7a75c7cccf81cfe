"""The test harness itself works: real nats-server, subprocesses, fake OpenAI."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nats
import openai
import pytest

from shared.nats_seam import flush
from tests.support import fake_openai as fo
from tests.support.eventually import assert_eventually, wait_until
from tests.support.natscluster import NatsCluster
from tests.support.natsd import NatsServer, nats_server_binary
from tests.support.procs import Proc, ProcError

# -- nats-server ---------------------------------------------------------------


def test_binary_is_found() -> None:
    assert Path(nats_server_binary()).is_file()


async def test_server_on_ephemeral_port_round_trips(nats_server: NatsServer) -> None:
    assert nats_server.port > 0 and nats_server.url.endswith(f":{nats_server.port}")
    assert nats_server.store_dir.is_dir()
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("harness.ping")
        await nc.publish("harness.ping", b"hello")
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"hello"
    finally:
        await nc.close()


async def test_restart_keeps_port_and_jetstream_data(nats_server: NatsServer) -> None:
    port, pid = nats_server.port, nats_server.pid
    reconnects: list[str] = []

    async def reconnected() -> None:
        reconnects.append(nc.connected_url.netloc)

    nc = await nats.connect(
        nats_server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1,
        reconnected_cb=reconnected,
    )
    try:
        js = nc.jetstream(timeout=2)
        await js.add_stream(name="HARNESS", subjects=["harness.js"])
        await js.publish("harness.js", b"kept")

        # Restart off the loop so the client keeps running while the server is down.
        await asyncio.to_thread(nats_server.restart)
        assert nats_server.port == port and nats_server.pid != pid

        async def data_survived() -> None:
            assert reconnects == [f"127.0.0.1:{port}"]
            info = await js.stream_info("HARNESS")
            assert info.state.messages == 1

        await assert_eventually(data_survived, timeout=10, retry_on=Exception)
        assert (await js.get_msg("HARNESS", 1)).data == b"kept"
    finally:
        await nc.close()


async def test_pause_freezes_and_resume_thaws(nats_server: NatsServer) -> None:
    responder = await nats.connect(nats_server.url)
    requester = await nats.connect(nats_server.url)
    try:
        async def echo(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(msg.data)

        await responder.subscribe("harness.echo", cb=echo)
        await flush(responder)

        # Once in CI on a loaded machine the first request came back "no
        # responders" although the subscription had been flushed; what is tested
        # here is pause and resume, so the warm-up may retry that one answer.
        async def warmed_up() -> bytes:
            return (await requester.request("harness.echo", b"1", timeout=2)).data

        assert await assert_eventually(warmed_up, timeout=10, interval=0.2, retry_on=nats.errors.NoRespondersError) == b"1"

        nats_server.pause()  # connections stay open; nothing is answered
        with pytest.raises(nats.errors.TimeoutError):
            await requester.request("harness.echo", b"2", timeout=0.3)

        nats_server.resume()

        # A server thawed after a long stop may first drop connections whose pings
        # it missed (they reconnect and subscribe again): thawed = answering again.
        async def answered() -> bytes:
            return (await requester.request("harness.echo", b"3", timeout=2)).data

        assert await assert_eventually(answered, timeout=15, interval=0.2, retry_on=nats.errors.Error) == b"3"
    finally:
        nats_server.resume()
        await requester.close()
        await responder.close()


def test_start_failure_reports_log(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, config="this is { not valid")
    with pytest.raises(RuntimeError, match="before ready"):
        server.start()
    assert not server.running


async def test_factory_applies_config(nats_server_factory: Callable[..., NatsServer]) -> None:
    server = nats_server_factory(jetstream=False, config="max_payload: 4096\n")
    assert not server.store_dir.exists()
    nc = await nats.connect(server.url)
    try:
        assert nc.max_payload == 4096
    finally:
        await nc.close()


async def test_cluster_places_r3_stream(nats_cluster: NatsCluster) -> None:
    assert len(set(nats_cluster.urls)) == 3
    nc = await nats.connect(nats_cluster.urls)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
        assert info.config.num_replicas == 3
        await js.publish("r3.a", b"x")
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    finally:
        await nc.close()


# -- subprocesses and waiting ------------------------------------------------------


def test_proc_waits_for_line_and_stops(tmp_path: Path) -> None:
    code = "import time; print('ready', flush=True); time.sleep(30)"
    with Proc([sys.executable, "-c", code], log_dir=tmp_path, name="sleeper") as proc:
        assert proc.wait_for_line(r"^ready$", timeout=5)
        pid = proc.pid
    assert proc.returncode is not None and proc.pid == pid


def test_proc_kills_when_sigterm_ignored(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('armed', flush=True); time.sleep(30)"
    )
    proc = Proc([sys.executable, "-c", code], log_dir=tmp_path).start()
    proc.wait_for_line("armed", timeout=5)
    assert proc.terminate(timeout=0.3) == -9


def test_proc_exit_before_line_is_reported(tmp_path: Path) -> None:
    with Proc([sys.executable, "-c", "print('bye')"], log_dir=tmp_path) as proc:
        with pytest.raises(ProcError, match="bye"):
            proc.wait_for_line("never", timeout=5)


async def test_assert_eventually_retries_then_times_out() -> None:
    start = time.monotonic()

    def after_a_bit() -> str:
        assert time.monotonic() - start > 0.1
        return "done"

    assert await assert_eventually(after_a_bit, timeout=2) == "done"

    async def never() -> None:
        raise AssertionError("still false")

    with pytest.raises(AssertionError, match="still false") as info:
        await assert_eventually(never, timeout=0.2)
    assert isinstance(info.value.__cause__, AssertionError)
    with pytest.raises(AssertionError, match="not true after"):
        wait_until(lambda: never_sync(), timeout=0.1)


def never_sync() -> None:
    raise AssertionError("nope")


async def test_a_condition_that_returns_false_is_refused_not_taken_as_met() -> None:
    # `assert_eventually(lambda: seen == [1, 2])` returned at once: False never raises.
    with pytest.raises(TypeError, match="returned False"):
        await assert_eventually(lambda: 1 == 2, timeout=0.2)  # noqa: PLR0133
    with pytest.raises(TypeError, match="returned False"):
        wait_until(lambda: False, timeout=0.1)
    assert await assert_eventually(lambda: True, timeout=0.2) is True


# -- fake OpenAI -----------------------------------------------------------------


def _client(fake: fo.FakeOpenAI, **kwargs: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.base_url, api_key="test", **kwargs)  # type: ignore[arg-type]


async def test_fake_openai_text_and_tool_call(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.script([
        fo.text("hello"),
        fo.tool_call("route_to_billing", {"reason": "refund"}, call_id="call_1"),
    ])
    client = _client(fake_openai)
    messages = [{"role": "user", "content": "hi"}]

    first = await client.chat.completions.create(model="gpt-test", messages=messages)
    assert first.object == "chat.completion" and first.model == "gpt-test"
    assert first.choices[0].message.content == "hello"
    assert first.choices[0].finish_reason == "stop"

    second = await client.chat.completions.create(model="gpt-test", messages=messages)
    call = second.choices[0].message.tool_calls[0]
    assert second.choices[0].finish_reason == "tool_calls"
    assert (call.id, call.type, call.function.name) == ("call_1", "function", "route_to_billing")
    assert call.function.arguments == '{"reason": "refund"}'

    third = await client.chat.completions.create(model="gpt-test", messages=messages)
    assert third.choices[0].message.content == "ok"  # script empty: the default
    assert [r["messages"] for r in fake_openai.requests] == [messages] * 3
    await client.close()


async def test_fake_openai_rate_limit(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.script([fo.error(429, retry_after=1)])
    client = _client(fake_openai, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after"] == "1"
    assert len(fake_openai.requests) == 1
    await client.close()


async def test_fake_openai_streaming_responder_and_responses(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.responder(lambda req: fo.text(f"echo {req['model']}"))
    client = _client(fake_openai)

    stream = await client.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "x"}], stream=True
    )
    parts = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(p or "" for p in parts) == "echo m1"

    resp = await client.responses.create(model="m2", input="hi")
    assert resp.output_text == "echo m2"

    fake_openai.script([fo.tool_call("lookup", {"id": 7})])
    events = [e.type async for e in await client.responses.create(model="m3", input="hi",
                                                                    stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.function_call_arguments.done" in events
    assert fake_openai.recorded[-1].path == "/v1/responses"
    await client.close()


async def test_fake_openai_slow_reply_times_out_client(fake_openai: fo.FakeOpenAI) -> None:
    fake_openai.script([fo.slow(5)])
    client = _client(fake_openai, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    await client.close()
