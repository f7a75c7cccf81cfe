"""Red team at the transport: with the generated ``nats-users.conf`` every key
is its own NATS user (the signing seed is the login), and a stolen agent
credential cannot delete or purge the stream, touch another agent's consumer
publish committed items or write the routing bucket; a gateway cannot append.  The stack still runs:
signed, with required signatures, each process logged in with its own key."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest

from services.cli.keys_cmds import make_keys
from services.log.service import LogService
from shared.client import LogClient
from shared.config import load_settings
from shared.nats_seam import flush
from shared.signing import Signer
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer
from tests.support.procs import Proc, run_cli
from tests.support.workerstack import READY, signed_worker

STREAM = "CONVLOG_ITEMS"
WORK = "CONVLOG_WORK"  # the work stream, where the agents' consumers are


async def test_each_key_is_a_nats_user_with_only_its_role(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, ["Triage", "L1Billing", "L1Technical", "L2Support"])
    server = NatsServer(tmp_path / "nats", config=(keys / "nats-users.conf").read_text()).start()
    ring = str(keys / "keyring.json")
    settings = load_settings(
        {"nats_url": server.url, "db": str(tmp_path / "convlog.db"), "keyring": ring,
         "require_signatures": True},
        {"CONVLOG_NKEY": str(keys / "log.nk"), "CONVLOG_SIGNING_KEY": str(keys / "log.nk")},
    )
    svc = LogService(settings)
    procs: list[Proc] = []
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    try:
        await svc.start()
        for agent in ("Triage", "L1Billing"):
            procs.append(signed_worker(agent, keys=keys, url=server.url, log_dir=tmp_path).start())
        for p in procs:
            p.wait_for_line(READY, timeout=60)

        # The gateway (its key is its login and signs the message) gets an answer.
        gw_settings = load_settings({"nats_url": server.url}, {
            "CONVLOG_NKEY": str(keys / "gateway.nk"), "CONVLOG_SIGNING_KEY": str(keys / "gateway.nk")})
        gateway = await LogClient.connect(settings=gw_settings, name="gateway", error_cb=on_error)
        try:
            await gateway.send("t1", "Hi, I was charged twice for my subscription this month.")

            async def answered() -> None:
                assert any(e.item_id.endswith(".reply") for e in await gateway.items("t1"))

            await assert_eventually(answered, timeout=30)
            # A gateway cannot append (the server refuses the publish).
            with pytest.raises(nats.errors.TimeoutError):
                await gateway.nc.request("convlog.append.t1", b'{"items":[]}', timeout=1)
        finally:
            await gateway.close()

        # A stolen Triage credential: its own consumer only, no stream admin, no items.
        thief = await nats.connect(server.url, nkeys_seed=str(keys / "Triage.nk"), error_cb=on_error,
                                   max_reconnect_attempts=0,  # its replies: _INBOX.<its key>.> only
                                   inbox_prefix=f"_INBOX.{Signer.load(keys / 'Triage.nk').key_id}")
        try:
            js = thief.jetstream(timeout=1)
            for attempt in (
                js.delete_stream(STREAM),
                js.purge_stream(STREAM),
                js.delete_consumer(WORK, "convlog-agent-L1Billing"),
                js.consumer_info(WORK, "convlog-agent-L1Billing"),
            ):
                with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                    await attempt
            stolen = await js.pull_subscribe_bind(durable="convlog-agent-L1Billing", stream=WORK)
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await stolen.fetch(1, timeout=1)
            # It reads the routing bucket but cannot move a session: only the log service
            # writes it (here: the handoff to L1Billing it committed).
            kv = await js.key_value("convlog_routing")
            routed = (await kv.get("t1")).value
            assert b'"active":"L1Billing"' in routed, routed
            with pytest.raises(nats.errors.TimeoutError):
                await kv.put("t1", b'{"active":"Triage","order":99}')
            before = (await svc.nc.jetstream().stream_info(STREAM)).state.messages
            await thief.publish("convlog.items.t1", msgspec.json.encode({"forged": True}))
            await flush(thief)

            def refused() -> None:
                for subject in (f"$JS.API.STREAM.DELETE.{STREAM}", f"$JS.API.STREAM.PURGE.{STREAM}",
                                f"$JS.API.CONSUMER.DELETE.{WORK}.convlog-agent-L1Billing",
                                f"$JS.API.CONSUMER.MSG.NEXT.{WORK}.convlog-agent-L1Billing",
                                "convlog.items.t1", "convlog.append.t1", "$KV.convlog_routing.t1"):
                    assert any("permissions violation" in e.lower() and subject.lower() in e.lower() for e in errors), (
                        subject, errors)

            await assert_eventually(refused, timeout=5)
        finally:
            await thief.close()
        sjs = svc.nc.jetstream()
        assert (await sjs.stream_info(STREAM)).state.messages == before  # nothing got in
        assert (await sjs.consumer_info(WORK, "convlog-agent-L1Billing")).name == "convlog-agent-L1Billing"
        assert (await (await sjs.key_value("convlog_routing")).get("t1")).value == routed
    finally:
        for p in procs:
            p.terminate(10)
        await svc.shutdown()
        server.stop()


# `convlog keys init` wrote nats-users.conf for the subjects of prefix `convlog` whatever
# CONVLOG_PREFIX said: on a deployment with its own prefix, the log service could not serve
# its subjects nor the gateway send on them (permissions violations; every request timed out).
async def test_keys_init_grants_the_subjects_of_the_configured_prefix(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    code, out, err = await run_cli("keys", "init", "--out", str(keys), env={**env, "CONVLOG_PREFIX": "acme"})
    assert code == 0, err
    conf = (keys / "nats-users.conf").read_text()
    assert '"acme.in.>"' in conf and '"convlog.in.>"' not in conf, conf
    server = NatsServer(tmp_path / "nats", config=conf).start()
    ring = str(keys / "keyring.json")
    settings = load_settings(
        {"nats_url": server.url, "prefix": "acme", "db": str(tmp_path / "convlog.db"), "keyring": ring,
         "require_signatures": True},
        {"CONVLOG_NKEY": str(keys / "log.nk"), "CONVLOG_SIGNING_KEY": str(keys / "log.nk"),
         "CONVLOG_REQUEST_TIMEOUT": "2"},
    )
    svc = LogService(settings)
    try:
        await svc.start()
        gw_settings = load_settings({"nats_url": server.url, "prefix": "acme"}, {
            "CONVLOG_NKEY": str(keys / "gateway.nk"), "CONVLOG_SIGNING_KEY": str(keys / "gateway.nk"),
            "CONVLOG_REQUEST_TIMEOUT": "2"})
        gateway = await LogClient.connect(settings=gw_settings, name="gateway")
        gateway.deadline = 10
        try:
            ack = await gateway.send("t1", "Hi, I was charged twice for my subscription this month.")
            assert ack.items[0].item_order == 1
            (env_,) = await gateway.items("t1")
            assert env_.data["content"].startswith("Hi, I was charged twice") and env_.sig
        finally:
            await gateway.close()
    finally:
        await svc.shutdown()
        server.stop()


# convlog health runs with the log service's environment (deploy/systemd: one convlog.env),
# so as the log user of nats-users.conf, which could not publish $SRV.STATS.convlog-log nor
# read the log: a running stack was reported "FAIL log service: no instance answers" (exit 1).
async def test_the_log_user_of_nats_users_conf_runs_convlog_health(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, ["Triage", "L1Billing"])
    server = NatsServer(tmp_path / "nats", config=(keys / "nats-users.conf").read_text()).start()
    log_env = {"CONVLOG_NKEY": str(keys / "log.nk")}
    svc = LogService(load_settings({"nats_url": server.url, "db": str(tmp_path / "convlog.db")}, log_env))
    try:
        await svc.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
        code, out, err = await run_cli("health", "--nats-url", server.url, "--no-embedded",
                                       env={**env, **log_env}, timeout=60)
        assert code == 0, out + err
        assert "ok    log service: 1 instance(s) answer" in out, out
    finally:
        await svc.shutdown()
        server.stop()
    assert "Violation" not in server.log_text(), server.log_text()


# A user that may only send and read (the gateway of nats-users.conf) cannot create the
# consumer LogClient.follow reads live items from: every attempt waited out nats-py's 5 s
# JetStream API timeout, so `convlog send` took 5.4 s to show a reply and `tail` and the
# console's live view showed each new item seconds late. The follower now reads the log
# once the server refuses the request.
async def test_a_user_without_the_jetstream_api_follows_a_session_by_reading_the_log(tmp_path: Path) -> None:
    import asyncio
    import time

    keys = tmp_path / "keys"
    make_keys(keys, ["Triage"])
    server = NatsServer(tmp_path / "nats", config=(keys / "nats-users.conf").read_text()).start()
    svc = LogService(load_settings({"nats_url": server.url, "db": str(tmp_path / "convlog.db")},
                                   {"CONVLOG_NKEY": str(keys / "log.nk")}))
    gateway = None
    try:
        await svc.start()
        gateway = await LogClient.connect(settings=load_settings(
            {"nats_url": server.url}, {"CONVLOG_NKEY": str(keys / "gateway.nk")}), name="gateway")
        seen: list[tuple[int, float]] = []

        async def watch() -> None:
            assert gateway is not None
            async for env in gateway.follow("f1"):
                seen.append((env.item_order, time.monotonic()))

        follower = asyncio.create_task(watch())
        try:
            # Each message right after the follower went live (a consumer create would be
            # out then, for 5 s), and one after it idled (polling the slowest).
            for n, idle in ((1, 0.3), (2, 0.3), (3, 3.0)):
                await asyncio.sleep(idle)
                sent = time.monotonic()
                await gateway.send("f1", f"message {n}")

                def arrived(n: int = n) -> None:
                    assert [o for o, _ in seen] == list(range(1, n + 1)), seen

                await assert_eventually(arrived, timeout=10)
                # Not after waiting out the consumer create's 5 s timeout.
                assert seen[-1][1] - sent < 2.5, (n, seen[-1][1] - sent)
            assert gateway.consumers_denied.is_set()
        finally:
            follower.cancel()
            with pytest.raises(asyncio.CancelledError):
                await follower
    finally:
        if gateway is not None:
            await gateway.close()
        await svc.shutdown()
        server.stop()


# An agent added to the spec after `convlog keys init` could get no key: init again refused
# ("keyring.json exists; ... use `convlog keys rotate`") and `keys rotate NewAgent` said "has
# no live key" (exit 2), so its worker could neither sign nor log in to NATS, and nats-users.conf
# had no user for it. The same dead end for an agent whose keys were all retired by hand (a
# leaked key retired at once). Now rotate gives such an agent of the spec its key.
async def test_an_agent_added_to_the_spec_after_init_gets_its_key_and_nats_user(tmp_path: Path) -> None:
    import asyncio
    import stat

    from services.cli.main import main
    from shared.messages import AppendItem
    from shared.signing import Keyring

    def spec(*agents: str) -> str:
        path = tmp_path / f"agents-{len(agents)}.toml"
        path.write_text('entry = "Triage"\n' + "".join(
            f'[[agents]]\nname = "{a}"\ninstructions = "Help."\n' for a in agents))
        return str(path)

    async def cli(*args: str) -> int:
        return await asyncio.to_thread(main, ["keys", *args])

    keys = tmp_path / "keys"
    assert await cli("init", "--out", str(keys), "--agents", spec("Triage", "L1Billing")) == 0
    before = Keyring.load(keys / "keyring.json").entries
    assert await cli("rotate", "L3Expert", "--dir", str(keys), "--agents", spec("Triage", "L1Billing")) == 2
    assert await cli("rotate", "L3Expert", "--dir", str(keys),
                     "--agents", spec("Triage", "L1Billing", "L3Expert")) == 0
    ring = Keyring.load(keys / "keyring.json")
    assert ring.entries[: len(before)] == before  # nobody's key retired
    (added,) = ring.of_role("agent", "L3Expert")
    assert added.retired_at is None and Signer.load(keys / "L3Expert.nk").key_id == added.key_id
    assert stat.S_IMODE((keys / "L3Expert.nk").stat().st_mode) == 0o600
    conf = (keys / "nats-users.conf").read_text()
    assert added.key_id in conf

    # A key retired by hand at once (leaked): rotate gives the agent a new one.
    leaked = Signer.load(keys / "L1Billing.nk").key_id
    doc = msgspec.json.decode((keys / "keyring.json").read_bytes())
    for e in doc["keys"]:
        if e["key_id"] == leaked:
            e["retired_at"] = "2000-01-01T00:00:00Z"
    (keys / "keyring.json").write_bytes(msgspec.json.encode(doc))
    assert await cli("rotate", "L1Billing", "--dir", str(keys),
                     "--agents", spec("Triage", "L1Billing", "L3Expert")) == 0
    fresh = Signer.load(keys / "L1Billing.nk").key_id
    assert fresh != leaked and (keys / f"L1Billing.{leaked[:8]}.retired.nk").exists()
    assert Keyring.load(keys / "keyring.json").refusal(fresh, "L1Billing", via_inbound=False) is None

    # The new users log in to nats-server with nats-users.conf and sign what the log takes.
    server = NatsServer(tmp_path / "nats", config=(keys / "nats-users.conf").read_text()).start()
    svc = LogService(load_settings(
        {"nats_url": server.url, "db": str(tmp_path / "convlog.db"), "keyring": str(keys / "keyring.json"),
         "require_signatures": True}, {"CONVLOG_NKEY": str(keys / "log.nk")}))
    try:
        await svc.start()
        items = []
        for agent in ("L3Expert", "L1Billing"):
            client = await LogClient.connect(settings=load_settings({"nats_url": server.url}, {
                "CONVLOG_NKEY": str(keys / f"{agent}.nk"), "CONVLOG_SIGNING_KEY": str(keys / f"{agent}.nk"),
                "CONVLOG_REQUEST_TIMEOUT": "2"}))
            try:
                await client.append("n1", [AppendItem(agent=agent, data={"type": "message", "content": "hi"})])
                items = await client.items("n1")
            finally:
                await client.close()
        assert [(e.agent, e.key_id) for e in items] == [("L3Expert", added.key_id), ("L1Billing", fresh)]
    finally:
        await svc.shutdown()
        server.stop()


# The gateway may not list the work stream's consumers nor create the follower's consumer
# (a documented setup: it follows by reading the log). `convlog send --to AGENT` waited out
# the 5 s JetStream timeout of the refused listing, and `send` and `tail` printed nats-py's
# refusal at WARNING ("permissions violation for publish to $js.api.stream.names").
async def test_the_gateway_sends_and_tails_promptly_without_warning_of_the_refused_jetstream_api(
    tmp_path: Path,
) -> None:
    import asyncio
    import time

    keys = tmp_path / "keys"
    make_keys(keys, ["Triage"])
    server = NatsServer(tmp_path / "nats", config=(keys / "nats-users.conf").read_text()).start()
    svc = LogService(load_settings({"nats_url": server.url, "db": str(tmp_path / "convlog.db")},
                                   {"CONVLOG_NKEY": str(keys / "log.nk")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env["CONVLOG_NKEY"] = str(keys / "gateway.nk")
    url = ["--nats-url", server.url, "--no-embedded"]
    errs: list[str] = []
    try:
        await svc.start()
        t0 = time.monotonic()
        code, _, err = await run_cli("send", "g1", "hello", "--to", "Triage", "--timeout", "0.5", *url, env=env)
        assert code == 124 and "sent #1 to g1" in err, err  # no worker: the turn does not end
        assert time.monotonic() - t0 < 2.5, (time.monotonic() - t0, err)
        errs.append(err)
        tail = asyncio.ensure_future(run_cli("tail", "g1", "--after", "1", "--count", "1", *url, env=env))
        await asyncio.sleep(1.5)
        code, _, err = await run_cli("send", "g1", "again", "--timeout", "0.5", *url, env=env)
        assert code == 124 and "sent #2 to g1" in err, err
        errs.append(err)
        code, out, err = await asyncio.wait_for(tail, 10)
        assert code == 0 and "again" in out, out + err
        errs.append(err)
    finally:
        await svc.shutdown()
        server.stop()
    for err in errs:
        assert "WARNING" not in err and "violation" not in err.lower(), err
