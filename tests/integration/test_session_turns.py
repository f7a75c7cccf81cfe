"""Which items start a convlog turn: an SDK app's session items do not, a user message does.

Real nats-server and the real log service (in-process, on both stores: the
``env`` fixture), with its notifier and notice reconciler running; no worker
consumes the work stream, so every notice the log service publishes stays
there to be counted.
"""

from __future__ import annotations

import pytest
from nats.js.errors import NotFoundError

from services.log.reconciler import RECONCILER
from shared import ConvlogSession
from shared.client import LogClient
from shared.codec import decode
from shared.errors import BadRequestError, ForbiddenError
from shared.messages import AppendItem, Envelope
from shared.work import NO_TURN_PREFIX, work_stream_name
from tests.support.eventually import assert_eventually
from tests.support.logenv import Env

USER = {"role": "user", "content": "I was charged twice"}
REPLY = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "refunded"}]}


@pytest.fixture
def client(env: Env) -> LogClient:
    assert env.service.reconciler is not None
    env.service.reconciler.interval = 0.1  # sweep often: the tests wait for a sweep past their items
    return env.client


async def notices(client: LogClient) -> list[str]:
    """The Nats-Msg-Id (``<sid>:<order>``) of every notice the work stream holds."""
    js = client.nc.jetstream()
    stream = work_stream_name(client.subjects)
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    return out


async def swept(client: LogClient, *sids: str) -> None:
    """Wait until the notice reconciler has looked at every item of ``sids`` committed so far
    (on JetStream the items stream sources the log's streams: first wait for them there)."""
    js = client.nc.jetstream()
    stream = client.subjects.stream_name
    seqs = []
    for sid in sids:
        last_order = await client.last_order(sid)

        async def arrived(sid: str = sid, last_order: int = last_order) -> int:
            msg = await js.get_last_msg(stream, client.subjects.items(sid))
            assert msg.data and decode(msg.data, Envelope).item_order == last_order
            return msg.seq or 0

        seqs.append(await assert_eventually(arrived, timeout=10, retry_on=(AssertionError, NotFoundError)))

    async def past() -> None:
        info = await js.consumer_info(stream, RECONCILER)
        assert info.ack_floor.stream_seq >= max(seqs), (info.ack_floor, seqs)

    await assert_eventually(past, timeout=10)


async def test_session_items_start_no_turn_and_a_user_message_does(client: LogClient) -> None:
    session = ConvlogSession("t-app", client=client)
    try:
        # The SDK app adds a user message and its own agent's answer; compaction puts one back.
        await session.add_items([USER, REPLY])
        assert await session._atomic_replace_items([USER])
        raw = await client.items("t-app", raw=True)
        assert [e.item_order for e in raw] == [1, 2, 3, 4]
        assert all(e.item_id.startswith(NO_TURN_PREFIX) for e in raw)  # the mark is in the log
        assert [e.agent for e in raw] == ["user", "assistant", "system", "user"]

        # The same kind of message through convlog.in is for the agents: announced.
        ack = await client.send("t-in", "I was charged twice")
        await swept(client, "t-app", "t-in")  # the reconciler looked at all of it, left the app's alone
        assert await notices(client) == [f"t-in:{ack.last_order}"]
    finally:
        await session.close()


async def test_a_session_that_asks_for_turns_gets_them(client: LogClient) -> None:
    session = ConvlogSession("t-turns", client=client, start_turns=True)
    try:
        await session.add_items([USER, REPLY])
        await session.add_items([dict(USER, content="still waiting")])
        await swept(client, "t-turns")
        assert await notices(client) == ["t-turns:1", "t-turns:3"]  # user messages only
        assert not any(e.item_id.startswith(NO_TURN_PREFIX) for e in await client.items("t-turns"))
    finally:
        await session.close()


async def test_the_reconciler_does_not_announce_what_the_notifier_skipped(client: LogClient, env: Env) -> None:
    service = env.service
    # As if every notice were lost between commit and publish: only the reconciler announces.
    assert service.notifier is not None and service.reconciler is not None
    lost: list[tuple[str, int]] = []
    service.notifier._start = lambda sid, order, handoff_to=None: lost.append((sid, order))  # type: ignore[method-assign]
    app = ConvlogSession("t-lost", client=client)
    plain = ConvlogSession("t-lost", client=client, start_turns=True)
    try:
        await app.add_items([USER])
        await plain.add_items([USER])
        await swept(client, "t-lost")
        assert lost == [("t-lost", 2)]  # the notifier never considered item 1
        assert service.reconciler.republished == 1
        assert await notices(client) == ["t-lost:2"]
    finally:
        await app.close()
        await plain.close()


async def test_the_inbound_subject_refuses_the_prefix_and_writes_nothing(client: LogClient) -> None:
    with pytest.raises(BadRequestError, match="'noturn:' prefix marks an item its writer answers itself"):
        await client.send("t-bad", "hello", item_id=f"{NO_TURN_PREFIX}abc")
    assert await client.last_order("t-bad") == 0
    ack = await client.send("t-bad", "hello", item_id="abc")  # the service keeps serving
    assert ack.last_order == 1


async def test_under_required_signatures_session_user_items_stay_refused(triage_signed: LogClient) -> None:
    client = triage_signed
    session = ConvlogSession("t-signed", client=client, agent="Triage")
    try:
        # User items enter only through convlog.in, signed by the gateway: a session
        # (no-turn id or not) cannot write them, and nothing of the call is written.
        with pytest.raises(ForbiddenError, match="inbound subject"):
            await session.add_items([USER, REPLY])
        assert await client.last_order("t-signed") == 0
        await session.add_items([REPLY])  # the agent's own item, signed with its key, passes
        (env,) = await client.items("t-signed")
        assert env.item_id.startswith(NO_TURN_PREFIX) and env.key_id == client.signer.key_id
        with pytest.raises(ForbiddenError, match="inbound subject"):  # a plain append alike
            await client.append("t-signed", [AppendItem(agent="user", data=USER, item_id="noturn:x")])
    finally:
        await session.close()
