"""Retries of unknown outcomes never duplicate, end to end.

Guarantee 3 and the client semantics of issue 3: ``LogClient`` gives every
item an ``item_id`` before the first send, so a lost reply (a timeout) or "no
responders" is resolved by retrying the same ids; the log answers a retry of
something committed with the original orders and ``duplicate: true``.  A retry
whose ``expected_last`` is behind is answered by ids: all present -> the
duplicates; none -> ``conflict``; some -> ``bad_request``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import msgspec
import nats
import pytest

from shared.client import LogClient
from shared.errors import BadRequestError, ConflictError
from shared.messages import AppendItem
from tests.support.logsvc import LogServiceProc, check_session
from tests.support.natsd import NatsServer


def _msg(text: str, item_id: str | None = None) -> dict[str, object]:
    item: dict[str, object] = {"agent": "user", "data": {"role": "user", "content": text}}
    if item_id is not None:
        item["item_id"] = item_id
    return item


def _appends_served(svc: LogServiceProc) -> int:
    """Append requests the (stopped) service handled, from its shutdown tally line."""
    match = re.search(r"log service stopped: (\d+) appends", svc.output())
    assert match, svc.output()
    return int(match.group(1))


@pytest.mark.parametrize("with_expected_last", [False, True], ids=["plain", "expected_last"])
async def test_reply_lost_while_the_service_is_stopped_is_retried_once_committed(
    nats_server: NatsServer,
    tmp_db: Path,
    log_services: Callable[..., LogServiceProc],
    with_expected_last: bool,
) -> None:
    sid = "lost-reply"
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        client.timeout, client.deadline = 0.5, 30.0  # per-request timeout well under the freeze
        await client.append(sid, [_msg("warm-up")])

        # SIGSTOP the service: requests queue up in its socket, unanswered. The client
        # times out (the outcome is unknown to it) and retries with the same ids —
        # minted by the client, since these items carry none.
        svc.pause()
        try:
            pending = asyncio.create_task(
                client.append(
                    sid, [_msg("one"), _msg("two"), _msg("three")],
                    expected_last=1 if with_expected_last else None,
                )
            )
            done, _ = await asyncio.wait({pending}, timeout=2.0)  # ~3 request timeouts
            assert not done
        finally:
            svc.resume()
        reply = await asyncio.wait_for(pending, timeout=20)

        # The first attempt committed; the answer the client got is a later attempt's:
        # the original orders, flagged duplicate — never a second copy, never a conflict.
        assert [i.item_order for i in reply.items] == [2, 3, 4]
        assert all(i.duplicate for i in reply.items), reply
        envelopes = await client.items(sid)
        assert len(envelopes) == 4
        check_session(sid, envelopes, {(sid, i.item_id): i.item_order for i in reply.items})
        assert [e.data["content"] for e in envelopes] == ["warm-up", "one", "two", "three"]

    assert await asyncio.to_thread(svc.stop) == 0
    assert _appends_served(svc) >= 3, "the client did not retry"


async def test_no_responders_is_retried_until_a_service_answers(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    sid = "no-responders"
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        await client.append(sid, [_msg("first")])
        svc.kill9()
        pending = asyncio.create_task(client.append(sid, [_msg("while down")]))
        done, _ = await asyncio.wait({pending}, timeout=0.5)
        assert not done, "with no service an append can only wait and retry"
        await asyncio.to_thread(svc.start)
        reply = await asyncio.wait_for(pending, timeout=20)
        assert reply.first_order == 2 and not reply.items[0].duplicate
        envelopes = await client.items(sid)
        check_session(sid, envelopes, {(sid, reply.items[0].item_id): 2})
        assert len(envelopes) == 2


async def test_expected_last_retries_are_answered_by_ids_over_the_wire(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    sid = "expected-last"
    await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    a, b = AppendItem(agent="Triage", data={"role": "user", "content": "a"}, item_id="id-a"), \
        AppendItem(agent="Triage", data={"role": "user", "content": "b"}, item_id="id-b")
    c = AppendItem(agent="Triage", data={"role": "user", "content": "c"}, item_id="id-c")
    d = AppendItem(agent="Triage", data={"role": "user", "content": "d"}, item_id="id-d")

    async with await LogClient.connect(nats_server.url) as client:
        first = await client.append(sid, [a, b], expected_last=0)
        assert [(i.item_order, i.duplicate) for i in first.items] == [(1, False), (2, False)]

        # All present: the same request again is answered with the original orders.
        again = await client.append(sid, [a, b], expected_last=0)
        assert (again.first_order, again.last_order) == (1, 2)
        assert [(i.item_id, i.item_order, i.hash, i.duplicate) for i in again.items] == [
            (i.item_id, i.item_order, i.hash, True) for i in first.items
        ]

        # None present: a real conflict, carrying the session's last order.
        with pytest.raises(ConflictError) as conflict:
            await client.append(sid, [c, d], expected_last=0)
        assert conflict.value.last_order == 2

        # Some present: neither a retry nor a fresh append — refused.
        with pytest.raises(BadRequestError) as partial:
            await client.append(sid, [a, c], expected_last=0)
        assert partial.value.code == "bad_request"

        assert [e.item_id for e in await client.items(sid)] == ["id-a", "id-b"]

        # Without expected_last, a known id is a duplicate and the new one is appended.
        mixed = await client.append(sid, [a, c])
        assert [(i.item_order, i.duplicate) for i in mixed.items] == [(1, True), (3, False)]

    # The same three answers as raw NATS replies: service-error headers + JSON body.
    nc = await nats.connect(nats_server.url)
    try:
        subject = f"convlog.append.{sid}"

        async def raw(items: list[AppendItem], expected_last: int) -> nats.aio.msg.Msg:
            body = msgspec.json.encode({"items": items, "expected_last": expected_last})
            return await nc.request(subject, body, timeout=5)

        dup = await raw([a, b], 0)
        assert not (dup.headers or {}).get("Nats-Service-Error-Code")
        assert [i["duplicate"] for i in msgspec.json.decode(dup.data)["items"]] == [True, True]

        conflict_msg = await raw([d], 0)
        assert conflict_msg.headers and conflict_msg.headers["Nats-Service-Error-Code"] == "409"
        error = msgspec.json.decode(conflict_msg.data)["error"]
        assert (error["code"], error["last_order"]) == ("conflict", 3)

        partial_msg = await raw([a, d], 0)
        assert partial_msg.headers and partial_msg.headers["Nats-Service-Error-Code"] == "400"
        assert msgspec.json.decode(partial_msg.data)["error"]["code"] == "bad_request"
    finally:
        await nc.close()


async def test_a_pop_item_whose_reply_is_lost_hides_the_newest_item_once(
    nats_server: NatsServer, tmp_db: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    # ConvlogSession.pop_item is a conditional retract (expected_last): its lost reply is
    # retried with the same id and expected_last, and the log answers the duplicate; the
    # retry is not taken as a conflict, which would make the pop hide the next item too.
    from shared import ConvlogSession

    sid = "lost-pop"
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    async with await LogClient.connect(nats_server.url) as client:
        client.timeout, client.deadline = 0.5, 30.0
        session = ConvlogSession(sid, client=client)
        try:
            await session.add_items([{"role": "user", "content": t} for t in ("one", "two", "three")])
            assert len(await session.get_items()) == 3  # the copy holds them: the pop's one request is its append
            svc.pause()
            try:
                pending = asyncio.create_task(session.pop_item())
                done, _ = await asyncio.wait({pending}, timeout=2.0)  # ~3 request timeouts
                assert not done
            finally:
                svc.resume()
            assert await asyncio.wait_for(pending, timeout=20) == {"role": "user", "content": "three"}
            assert [i["content"] for i in await session.get_items()] == ["one", "two"]
            raw = await client.items(sid)
            assert [(e.kind, e.data) for e in raw[3:]] == [("retract", {"target": 3})]  # one retract
        finally:
            await session.close()
    assert await asyncio.to_thread(svc.stop) == 0
    assert _appends_served(svc) >= 3, "the client did not retry"
