"""Red team of nats-users.conf on a real nats-server; each a bypass once (found in a
review) of what the README's threat model says an agent or the gateway user cannot
do ("an agent's NATS user from nats-users.conf ... cannot ... create, read or
delete another agent's consumer, publish convlog.items.>, write any KV value"; the
gateway "may only send on convlog.in.> and read"):

* a request whose reply subject is one of the log service's own subjects or a
  system one (``$KV...``, ``convlog.items...``) is not answered there (the log
  service wrote for the requester: a read reply replaced a signed witness head);
* each user subscribes to its own replies only (``_INBOX.<its key>.>``; with
  ``_INBOX.>`` any user read every other client's replies, pulled notices
  included);
* an agent user cannot create the routing bucket (with a configuration of its
  choosing, e.g. one that also captured every reply).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from services.cli.keys_cmds import make_keys
from services.log.service import LogService
from services.worker.intake import consumer_config
from shared.client import LogClient, connect_options
from shared.config import load_settings
from shared.nats_seam import flush
from shared.signing import Signer
from shared.subjects import Subjects
from tests.support.natsd import NatsServer

WORK = "CONVLOG_WORK"


@dataclass
class Stack:
    server: NatsServer
    keys: Path
    svc: LogService | None


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    keys = tmp_path / "keys"
    make_keys(keys, ["Triage", "L1Billing"])
    server = NatsServer(tmp_path / "nats", config=(keys / "nats-users.conf").read_text()).start()
    st = Stack(server, keys, None)
    try:
        yield st
    finally:
        if st.svc is not None:
            await st.svc.shutdown()
        server.stop()


async def start_log(st: Stack, tmp: Path) -> LogService:
    settings = load_settings(
        {"nats_url": st.server.url, "db": str(tmp / "c.db"), "keyring": str(st.keys / "keyring.json")},
        {"CONVLOG_NKEY": str(st.keys / "log.nk"), "CONVLOG_SIGNING_KEY": str(st.keys / "log.nk")})
    st.svc = LogService(settings)
    await st.svc.start()
    return st.svc


def settings_of(st: Stack, key: str):  # type: ignore[no-untyped-def]
    return load_settings({"nats_url": st.server.url},
                         {"CONVLOG_NKEY": str(st.keys / f"{key}.nk"), "CONVLOG_SIGNING_KEY": str(st.keys / f"{key}.nk")})


async def thief_of(st: Stack, key: str, errors: list[str]) -> nats.NATS:
    """An attacker holding ``key``'s seed, with a client of its own making."""
    async def on_error(e: Exception) -> None:
        errors.append(str(e))
    seed = st.keys / f"{key}.nk"  # its replies where its user may read them
    return await nats.connect(st.server.url, nkeys_seed=str(seed), error_cb=on_error, max_reconnect_attempts=0,
                              inbox_prefix=f"_INBOX.{Signer.load(seed).key_id}")


@pytest.mark.parametrize("who", ["Triage", "gateway"])
async def test_a_reply_subject_cannot_make_the_log_service_write_for_it(stack: Stack, tmp_path: Path, who: str) -> None:
    """The log service answers any request on its reply subject, and its user may
    publish convlog.items.> and $KV.*: so a request whose reply subject is one of
    those has the log service write the answer there (a forged outbox message, a
    signed head or a routing value overwritten)."""
    svc = await start_log(stack, tmp_path)
    sjs = svc.nc.jetstream()
    gateway = await LogClient.connect(settings=settings_of(stack, "gateway"), name="gateway")
    try:
        await gateway.send("s0", "hello")
        heads = await sjs.key_value("convlog_heads")

        async def head() -> bytes:
            return (await heads.get("s0")).value

        for _ in range(50):  # the witness head is signed within CONVLOG_HEAD_INTERVAL
            try:
                head0 = await head()
                break
            except Exception:
                await asyncio.sleep(0.1)
        items0 = (await sjs.stream_info("CONVLOG_ITEMS")).state.messages
        routing0 = (await sjs.stream_info("KV_convlog_routing")).state.messages
    finally:
        await gateway.close()
    thief = await thief_of(stack, who, [])
    try:
        for reply in ("convlog.items.s0", "$KV.convlog_heads.s0", "$KV.convlog_routing.s0"):
            await thief.publish("convlog.read.s0", b"{}", reply=reply)
        await flush(thief)
        await asyncio.sleep(1.0)
    finally:
        await thief.close()
    assert await head() == head0, "the signed witness head was overwritten"
    assert (await sjs.stream_info("CONVLOG_ITEMS")).state.messages == items0, "a message got into convlog.items"
    assert (await sjs.stream_info("KV_convlog_routing")).state.messages == routing0, "a routing value was written"


@pytest.mark.parametrize("who", ["Triage", "gateway"])
async def test_no_user_reads_the_replies_sent_to_another(stack: Stack, tmp_path: Path, who: str) -> None:
    """Every user may subscribe to _INBOX.>: an agent (or the gateway) reads the
    notices another agent pulls from its consumer (and their ack subjects) and the
    log service's answers to other clients."""
    svc = await start_log(stack, tmp_path)
    sjs = svc.nc.jetstream()
    await sjs.add_consumer(WORK, consumer_config(Subjects("convlog"), "L1Billing", entry=False, ack_wait=30))
    await sjs.publish("convlog.work.agent.L1Billing", b'{"session_id":"s0","item_order":1}')
    errors: list[str] = []
    thief = await thief_of(stack, who, errors)
    seen: list[tuple[str, bytes]] = []

    async def snoop(m: nats.aio.msg.Msg) -> None:
        seen.append((m.subject, m.data))

    await thief.subscribe("_INBOX.>", cb=snoop)
    await flush(thief)
    # L1Billing's worker pulls, as the project's clients connect (connect_options)
    bill = await nats.connect(**connect_options(settings_of(stack, "L1Billing"), name="L1Billing"))
    got: list[bytes] = []

    async def mine(m: nats.aio.msg.Msg) -> None:
        got.append(m.data)

    inbox = bill.new_inbox()
    await bill.subscribe(inbox, cb=mine)
    await bill.publish(f"$JS.API.CONSUMER.MSG.NEXT.{WORK}.convlog-agent-L1Billing",
                       b'{"batch":1,"expires":2000000000}', reply=inbox)
    await flush(bill)
    # another client reads (the log service's answer goes to its inbox)
    other = await LogClient.connect(settings=settings_of(stack, "Triage" if who == "gateway" else "gateway"), name="x")
    try:
        await other.items("s0")
        for _ in range(30):
            if got:
                break
            await asyncio.sleep(0.1)
        assert got == [b'{"session_id":"s0","item_order":1}']  # L1Billing still gets its notice
        await asyncio.sleep(0.3)
        assert seen == [], f"{who} read replies meant for others: {seen[:3]}"
    finally:
        await other.close()
        await bill.close()
        await thief.close()


async def test_an_agent_cannot_create_the_routing_bucket_its_own_way(stack: Stack, tmp_path: Path) -> None:
    """An agent may create KV_convlog_routing "if it starts before the log service",
    but with any configuration: capturing _INBOX.> as well, it keeps every reply of
    every client (a gateway's read of another session, JetStream answers) where it
    can read them -- the log service then uses that bucket as it is."""
    errors: list[str] = []
    thief = await thief_of(stack, "Triage", errors)
    cfg = {"name": "KV_convlog_routing", "subjects": ["$KV.convlog_routing.>", "_INBOX.>"],
           "max_msgs_per_subject": 5, "allow_direct": True, "allow_rollup_hdrs": True, "deny_delete": True,
           "storage": "file", "num_replicas": 1, "discard": "new"}
    try:
        await thief.publish("$JS.API.STREAM.CREATE.KV_convlog_routing", json.dumps(cfg).encode())
        await flush(thief)
        await asyncio.sleep(0.5)
    finally:
        await thief.close()
    svc = await start_log(stack, tmp_path)
    info = await svc.nc.jetstream().stream_info("KV_convlog_routing")
    assert info.config.subjects == ["$KV.convlog_routing.>"], info.config.subjects


async def test_an_agent_cannot_point_its_consumer_at_another_agents_notices(stack: Stack, tmp_path: Path) -> None:
    """README threat model: an agent user cannot "create, read or delete another agent's
    consumer".  nats-server does not check the body of a plain consumer create, so
    while Triage had no consumer yet, L1Billing's user created its own consumer
    filtered on Triage's notices (or the entry notices) and took them; Triage's worker
    then could not create its own (overlapping filters on a work queue).  Now a
    non-entry agent may create its consumer only on the subject that names its own
    filter, which nats-server holds the body to."""
    svc = await start_log(stack, tmp_path)  # makes the work stream
    sjs = svc.nc.jetstream()
    subjects = Subjects("convlog")
    mine = consumer_config(subjects, "L1Billing", entry=False, ack_wait=30)
    assert mine.filter_subject == "convlog.work.agent.L1Billing" and not mine.filter_subjects
    api = f"$JS.API.CONSUMER.CREATE.{WORK}.{mine.name}"
    errors: list[str] = []
    thief = await thief_of(stack, "L1Billing", errors)
    try:
        for target in ("convlog.work.agent.Triage", "convlog.work.entry"):
            cfg = {"name": mine.name, "durable_name": mine.name, "ack_policy": "explicit",
                   "filter_subject": target}
            body = json.dumps({"stream_name": WORK, "config": cfg}).encode()
            answers = {}
            for subject in (api, f"{api}.{target}", f"{api}.{mine.filter_subject}",
                            f"$JS.API.CONSUMER.DURABLE.CREATE.{WORK}.{mine.name}"):
                try:
                    reply = await thief.request(subject, body, timeout=1)
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    answers[subject] = "denied"  # the request never reached JetStream
                    continue
                answers[subject] = json.loads(reply.data).get("error", {}).get("description", reply.data)
            # The one subject allowed: JetStream refuses a body naming another filter.
            assert "did not match filtered subject" in str(answers.pop(f"{api}.{mine.filter_subject}")), answers
            assert set(answers.values()) == {"denied"}, answers
            with pytest.raises(nats.js.errors.NotFoundError):
                await sjs.consumer_info(WORK, mine.name)
        # Its own consumer, as the worker creates it, goes through.
        await thief.jetstream().add_consumer(WORK, mine)
        info = await sjs.consumer_info(WORK, mine.name)
        assert info.config.filter_subject == "convlog.work.agent.L1Billing"
        assert not info.config.filter_subjects or info.config.filter_subjects == ["convlog.work.agent.L1Billing"]
    finally:
        await thief.close()
    # The entry agent's two filters go through the plain create, its user's alone.
    entry = consumer_config(subjects, "Triage", entry=True, ack_wait=30)
    triage = await thief_of(stack, "Triage", errors)
    try:
        await triage.jetstream().add_consumer(WORK, entry)
    finally:
        await triage.close()
    info = await sjs.consumer_info(WORK, entry.name)
    assert set(info.config.filter_subjects or ()) == {"convlog.work.agent.Triage", "convlog.work.entry"}
