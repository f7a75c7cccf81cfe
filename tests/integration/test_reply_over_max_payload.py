"""A reply over the server's max payload, on both nats-py seams: the log service
refuses that one reply and keeps serving every other request.

Such a reply is possible: a read page holds at least one item, and items written
while the server's max payload was larger stay in the log after an operator
lowers it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from services.log.service import LogService
from shared.client import LogClient
from shared.config import Settings, load_settings
from shared.errors import ConvlogError, TooLargeError
from shared.nats_seam import bind
from shared.work import work_stream_name
from tests.support.eventually import assert_eventually
from tests.support.logenv import SEAM_IDS, SEAMS, expect_seam, user
from tests.support.natsd import NatsServer


@pytest.mark.parametrize("mode", SEAMS, ids=SEAM_IDS)
async def test_a_read_reply_over_max_payload_leaves_the_service_serving(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path, mode: str
) -> None:
    server = nats_server_factory(config="max_payload: 65536\n")
    settings = load_settings(
        {"nats_url": server.url, "db": str(tmp_path / "log.db"), "data_dir": str(tmp_path),
         "nats_seam": mode, "max_item_bytes": 48 * 1024},
        environ={},
    )
    service = LogService(settings)
    await service.start()
    try:
        nc = await nats.connect(server.url)
        bind(nc, mode)
        client = LogClient(nc, timeout=5, deadline=10)
        await client.append("big", [user("x" * 40_000)])
        await nc.close()
    finally:
        await service.shutdown()

    # The operator lowers the max payload: the 40 KB item no longer fits a reply.
    server.config = "max_payload: 16384\n"
    server.restart()
    service = LogService(settings)
    await service.start()
    try:
        expect_seam(service, mode)
        nc = await nats.connect(server.url)
        bind(nc, mode)
        try:
            client = LogClient(nc, timeout=1, deadline=1.5)
            with pytest.raises(ConvlogError):
                await client.read("big")
            # That one reply is refused; the service still answers everything else.
            client = LogClient(nc, timeout=5, deadline=10)
            ack = await client.append("small", [user("still here")])
            assert ack.first_order == 1
            assert [e.data["content"] for e in await client.items("small")] == ["still here"]
            assert service.nc is not None and service.nc.is_connected
        finally:
            await nc.close()
    finally:
        await service.shutdown()


def _settings(server: NatsServer, tmp_path: Path, store: str, mode: str = "auto") -> Settings:
    return load_settings(
        {"nats_url": server.url, "db": str(tmp_path / "log.db"), "data_dir": str(tmp_path),
         "nats_seam": mode, "store": store, "max_item_bytes": 48 * 1024},
        environ={},
    )


# A read whose page held one item too large for any reply under the server's
# max payload now (stored while it was larger) got no reply at all: the replier
# dropped it (logged at debug) and the reader waited its whole deadline for an
# `unavailable` that said nothing of the item.
@pytest.mark.parametrize("mode", SEAMS, ids=SEAM_IDS)
@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_a_read_of_an_item_over_the_max_payload_is_refused_too_large_naming_it(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path, store: str, mode: str
) -> None:
    server = nats_server_factory(config="max_payload: 65536\n")
    settings = _settings(server, tmp_path, store, mode)
    async with LogService(settings):
        nc = await nats.connect(server.url)
        try:
            client = LogClient(nc, timeout=5, deadline=10)
            await client.append("big", [user("before")])
            await client.append("big", [user("x" * 40_000)])
            await client.append("big", [user("after")])
        finally:
            await nc.close()

    server.config = "max_payload: 16384\n"
    server.restart()
    async with LogService(settings) as service:
        expect_seam(service, mode)
        nc = await nats.connect(server.url)
        bind(nc, mode)
        try:
            client = LogClient(nc, timeout=5, deadline=10)
            # The page before it ends short of it; the page that starts with it is refused.
            page = await client.read("big")
            assert [e.item_order for e in page.items] == [1] and page.more
            t0 = time.monotonic()
            with pytest.raises(TooLargeError) as refused:
                await client.read("big", after=1)
            assert time.monotonic() - t0 < 4, "answered, not timed out"
            assert "item 2 " in refused.value.message, refused.value.message
            assert refused.value.extra["limit"] == 16384
            # The items after it can still be read.
            page = await client.read("big", after=2)
            assert [e.data["content"] for e in page.items] == ["after"]
        finally:
            await nc.close()


# The log service sized read pages for the max payload of the server it first
# connected to: after a reconnect to one with a smaller max payload, every page
# was over it, its reply dropped, and every read of a long session timed out.
@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_read_pages_follow_the_max_payload_of_the_server_reconnected_to(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path, store: str
) -> None:
    server = nats_server_factory(config="max_payload: 65536\n")
    settings = _settings(server, tmp_path, store)
    async with LogService(settings) as service:
        nc = await nats.connect(server.url)
        try:
            client = LogClient(nc, timeout=5, deadline=10)
            for i in range(4):
                await client.append("long", [user(f"{i}:" + "y" * 2000) for _ in range(10)])
            assert len(await client.items("long")) == 40
            # Sessions pages too: 300 sessions are over 16 KiB.
            for i in range(300):
                await client.append(f"{i:03d}" + "s" * 21, [user("z")])
        finally:
            await nc.close()

        server.config = "max_payload: 16384\n"
        await asyncio.to_thread(server.restart)

        async def reconnected() -> None:
            assert service.nc is not None and service.nc.is_connected
            assert service.nc.max_payload == 16384

        await assert_eventually(reconnected, timeout=15)
        nc = await nats.connect(server.url)
        try:
            client = LogClient(nc, timeout=5, deadline=10)
            items = await client.items("long")
            assert [e.item_order for e in items] == list(range(1, 41))
            assert len(await client.items("long", raw=False)) == 40
            assert len((await client.read("long", tail=5)).items) == 5
            assert len([s async for s in client.iter_sessions()]) == 301
            # An item whose envelope no longer fits one message is refused, as on
            # a server that had this max payload all along.
            with pytest.raises(TooLargeError) as refused:
                await client.append("long", [user("w" * 16_100)])
            assert refused.value.extra["limit"] == 16384 - 4096
            assert (await client.read("long", tail=0)).last_order == 40
        finally:
            await nc.close()


# A turn notice carries the session's last items (up to 16 KB, services/log/recent.py):
# on a server whose max_payload is not much larger, the notice of a session with a few
# large recent items was over it, refused by nats-py, and left to the reconciler's next
# sweep (up to 2 s later, an INFO line each time) -- every such turn waited it out.
# Such a notice now goes without the items (its worker reads them from the log).
async def test_a_notice_whose_items_are_over_max_payload_goes_at_once_without_them(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = nats_server_factory(config="max_payload: 16384\n")
    settings = load_settings({"nats_url": server.url, "db": str(tmp_path / "log.db"),
                              "data_dir": str(tmp_path)}, environ={})
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(server.url)
    try:
        assert service.reconciler is not None and service.notifier is not None
        service.reconciler.interval = 3600.0  # only the commit's own notices count here
        client = LogClient(nc, timeout=5, deadline=10)
        for i in range(4):
            await client.append("large", [user(f"{i} " + "x" * 5_185)])
        js = nc.jetstream()

        async def all_announced() -> None:
            assert (await js.stream_info(work_stream_name(settings.subjects))).state.messages == 4

        await assert_eventually(all_announced, timeout=1.5)
        assert service.notifier.failed == 0
    finally:
        await nc.close()
        await service.shutdown()
