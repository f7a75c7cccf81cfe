"""``publish_many`` over a real nats-server: the frames it builds itself must
arrive exactly as ``publish`` would have sent them, and it must fall back to
``publish`` whenever the connection is not plainly connected, or is on the
public nats-py seam."""

from __future__ import annotations

from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.nats_seam import bind, flush
from shared.wire import Outgoing, header_block, publish_many
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer


async def _count(got: list[Msg], n: int) -> None:
    async def arrived() -> None:
        assert len(got) == n, got

    await assert_eventually(arrived, timeout=5)


async def _collect(nc: Client, subject: str) -> list[Msg]:
    got: list[Msg] = []

    async def on(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=on)
    await flush(nc)
    return got


def _seen(msgs: list[Msg]) -> list[tuple[str, str, bytes, dict[str, str] | None]]:
    return [(m.subject, m.reply, m.data, m.headers) for m in msgs]


async def test_a_burst_arrives_as_publish_would_send_it_without_calling_publish(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        got = await _collect(nc, "wire.>")
        messages: list[Outgoing] = [
            ("wire.a", "", b"plain", None),
            ("wire.b", "wire.reply.1", b"", None),  # empty payload, with a reply subject
            ("wire.c", "", b'{"json":true}', {"Nats-Msg-Id": "s:1", "X-Code": " padded \r\nvalue "}),
            ("wire.d", "wire.reply.2", b"x" * 5000, header_block({"Nats-Msg-Id": "s:2"})),
        ]

        def no_publish(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("publish_many took the slow path on a connected client")

        monkeypatch.setattr(nc, "publish", no_publish)
        assert await publish_many(nc, messages) == []
        monkeypatch.undo()
        # The same messages through nats-py's own publish, for comparison.
        for subject, reply, payload, headers in messages:
            hdrs = headers if isinstance(headers, dict) or headers is None else {"Nats-Msg-Id": "s:2"}
            await nc.publish(subject.replace("wire.", "wire.ref."), payload, reply=reply, headers=hdrs)
        await _count(got, 8)
        mine, theirs = _seen(got[:4]), _seen(got[4:])
        assert [m[0] for m in mine] == ["wire.a", "wire.b", "wire.c", "wire.d"]
        assert [(r, d, h) for _, r, d, h in mine] == [(r, d, h) for _, r, d, h in theirs]
        assert mine[2][3] == {"Nats-Msg-Id": "s:1", "X-Code": "padded   value"}
        assert nc.stats["out_msgs"] >= 8
    finally:
        await nc.close()


async def test_refused_messages_are_reported_and_the_rest_still_sent(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        got = await _collect(nc, "wire.>")
        too_big = b"x" * (nc.max_payload + 1)
        refused = await publish_many(nc, [
            ("wire.ok.1", "", b"1", None),
            ("wire.bad subject", "", b"2", None),
            ("wire.ok.2", "", too_big, None),
            ("wire.ok.3", "bad reply", b"3", None),
            ("wire.ok.4", "", b"4", {"bad key": "v"}),
            ("wire.ok.5", "", b"5", None),
        ])
        assert [(i, type(e)) for i, e in refused] == [
            (1, nats.errors.BadSubjectError),
            (2, nats.errors.MaxPayloadError),
            (3, nats.errors.BadSubjectError),
            (4, nats.errors.BadHeaderError),
        ]
        await _count(got, 2)
        assert [m.data for m in got] == [b"1", b"5"]
    finally:
        await nc.close()


async def test_without_a_plain_connection_it_goes_through_publish(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    await nc.close()
    refused = await publish_many(nc, [("wire.a", "", b"1", None), ("wire.b", "", b"2", header_block({"K": "v"}))])
    assert [(i, type(e)) for i, e in refused] == [
        (0, nats.errors.ConnectionClosedError),
        (1, nats.errors.ConnectionClosedError),
    ]


async def test_on_the_public_seam_a_burst_goes_through_publish(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    nc = await nats.connect(nats_server.url)
    bind(nc, "public")
    try:
        got = await _collect(nc, "wire.>")
        published: list[str] = []
        publish = nc.publish

        async def counting(subject: str, *args: Any, **kwargs: Any) -> None:
            published.append(subject)
            await publish(subject, *args, **kwargs)

        monkeypatch.setattr(nc, "publish", counting)
        refused = await publish_many(nc, [
            ("wire.a", "wire.reply.1", b"1", None),
            ("wire.bad subject", "", b"2", None),
            ("wire.b", "", b"3", header_block({"Nats-Msg-Id": "s:3"})),
        ])
        assert [(i, type(e)) for i, e in refused] == [(1, nats.errors.BadSubjectError)]
        assert published == ["wire.a", "wire.bad subject", "wire.b"]
        await _count(got, 2)
        assert _seen(got) == [("wire.a", "wire.reply.1", b"1", None), ("wire.b", "", b"3", {"Nats-Msg-Id": "s:3"})]
    finally:
        await nc.close()
