"""``shared.nats_seam.flush`` over a real nats-server: once it returns, the
server has processed what was queued before it (a SUB, an UNSUB).

nats-py 2.16's own ``Client.flush`` writes its PING to the socket ahead of a
SUB still queued for the flusher task, so "subscribe, flush, then publish from
another connection" sometimes meets no subscriber (a request gets "no
responders"): about one try in fifteen on this machine.  These tests make a
hundred tries per seam, so on the unordered flush they fail near certainly.
"""

from __future__ import annotations

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.nats_seam import FAST, PUBLIC, NatsSeam, probe
from tests.support.natsd import NatsServer

TRIES = 100


async def _tries_without_a_subscriber(url: str, seam: NatsSeam) -> int:
    """Subscribe on one connection, flush it, request on another: how many
    requests found nobody subscribed."""
    asker = await nats.connect(url)
    missed = 0
    try:
        for i in range(TRIES):
            listener = await nats.connect(url)
            try:
                async def answer(msg: Msg) -> None:
                    await msg.respond(b"here")

                await listener.subscribe(f"ordered.{i}.>", cb=answer)
                await seam.flush(listener)
                try:
                    reply = await asker.request(f"ordered.{i}.x", b"?", timeout=5)
                    assert reply.data == b"here"
                except nats.errors.NoRespondersError:
                    missed += 1
            finally:
                await listener.close()
    finally:
        await asker.close()
    return missed


@pytest.mark.parametrize("seam", [FAST, PUBLIC], ids=["fast", "public"])
async def test_a_subscription_is_in_place_once_flush_returns(nats_server: NatsServer, seam: NatsSeam) -> None:
    if seam.fast:
        assert probe().ok, probe().reason()
    assert await _tries_without_a_subscriber(nats_server.url, seam) == 0


async def test_an_unsubscription_is_done_once_flush_returns(nats_server: NatsServer) -> None:
    """The same for UNSUB: a request after it finds nobody."""
    for seam in (FAST, PUBLIC):
        asker = await nats.connect(nats_server.url)
        listener = await nats.connect(nats_server.url)
        answered = 0
        try:
            async def answer(msg: Msg) -> None:
                await msg.respond(b"still here")

            for i in range(TRIES):
                sub = await listener.subscribe(f"gone.{i}", cb=answer)
                await seam.flush(listener)
                await sub.unsubscribe()
                await seam.flush(listener)
                try:
                    await asker.request(f"gone.{i}", b"?", timeout=5)
                    answered += 1
                except nats.errors.NoRespondersError:
                    pass
        finally:
            await listener.close()
            await asker.close()
        assert answered == 0, seam.name


async def test_flush_on_a_closed_connection_raises_as_nats_py_does(nats_server: NatsServer) -> None:
    nc: Client = await nats.connect(nats_server.url)
    await nc.close()
    for seam in (FAST, PUBLIC):
        with pytest.raises(nats.errors.ConnectionClosedError):
            await seam.flush(nc, timeout=1)
