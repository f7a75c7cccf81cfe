"""Two JetStream-store log services opening at the same moment on an empty server."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest

from services.log.store.jetstream import JetStreamStore
from shared.failures import StreamConfigError
from shared.subjects import Subjects
from tests.support.natsd import NatsServer


async def test_two_stores_opening_at_once_both_open_and_the_fan_out_has_its_sources(
    nats_server: NatsServer,
) -> None:
    for i in range(10):
        subjects = Subjects(f"race{i}")
        stores = [JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, replicas=1, shards=3)
                  for _ in range(3)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
        finally:
            for s in stores:
                await s.close()
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jetstream().stream_info(subjects.stream_name)
            assert len(info.config.sources or []) == 3
        finally:
            await nc.close()


async def test_two_stores_of_different_shard_counts_opening_at_once_one_is_refused(
    nats_server: NatsServer,
) -> None:
    # Each loses the race for a stream to the other only as "name in use": the
    # stream the other made, with its shard count, must refuse it as an existing one does.
    for i in range(5):
        subjects = Subjects(f"shardrace{i}")
        stores = [JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, shards=n) for n in (2, 3)]
        results = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
        try:
            opened = [s for s, r in zip(stores, results, strict=True) if r is None]
            refused = [r for r in results if r is not None]
            assert len(opened) == 1, results
            assert isinstance(refused[0], StreamConfigError), refused
            assert f"created with CONVLOG_SHARDS={opened[0].layout.shards}, not" in str(refused[0])
        finally:
            for s, r in zip(stores, results, strict=True):
                if r is None:
                    await s.close()
        nc = await nats.connect(nats_server.url)
        try:
            names = sorted(await nc.jetstream().streams_info(), key=lambda s: s.config.name)
            mine = [s for s in names if s.config.name.startswith(subjects.stream_name.removesuffix("_ITEMS"))]
            want = opened[0].layout.shards
            assert sorted(s.config.name for s in mine) == sorted([subjects.stream_name, *opened[0].layout.log_streams])
            assert {s.config.metadata["convlog_shards"] for s in mine} == {str(want)}
        finally:
            await nc.close()


async def test_a_deleted_log_stream_is_refused_not_made_again_empty(nats_server: NatsServer) -> None:
    # One <PREFIX>_LOG_k deleted by hand was created again, empty, at the next start:
    # its sessions vanished from reads and began again at item_order 1, while the
    # fan-out still held their items (two item 1s on one items subject).
    from tests.contract.store_helpers import item, req

    subjects = Subjects("gone")
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, shards=2)
    await store.open()
    try:
        sids = [f"s{i}" for i in range(8)]
        assert {store.layout.shard_of(s) for s in sids} == {0, 1}
        for sid in sids:
            await store.append(sid, req(item(f"{sid}-1")))
    finally:
        await store.close()
    lost = store.layout.log_streams[1]
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for _ in range(100):  # the fan-out's copies trail the log
            if (await js.stream_info(subjects.stream_name)).state.messages == 8:
                break
            await asyncio.sleep(0.05)
        await js.delete_stream(lost)
        again = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects, shards=2)
        try:
            await again.open()
        except StreamConfigError as e:
            assert f"stream {lost} of this log is gone" in str(e), e
        else:
            await again.close()
            raise AssertionError("a store over a log missing one of its streams opened")
        names = {s.config.name for s in await js.streams_info()}
        assert lost not in names and store.layout.log_streams[0] in names  # nothing made again
        assert (await js.stream_info(subjects.stream_name)).state.messages == 8  # the fan-out kept its items
    finally:
        await nc.close()


async def test_two_prefixes_of_the_same_stream_names_opening_at_once_one_is_refused(
    nats_server: NatsServer,
) -> None:
    # ``x.y`` and ``x_y`` name the same streams (X_Y_LOG_0, X_Y_ITEMS).  The loser of the
    # race for a stream found the winner's, capturing the other prefix's subjects, and
    # checked only its shard count: it opened, and each of its appends went to subjects no
    # stream captures.  It must refuse the stream as it refuses an existing one.
    for i in range(5):
        pair = [Subjects(f"x{i}.y"), Subjects(f"x{i}_y")]
        assert pair[0].stream_name == pair[1].stream_name
        stores = [JetStreamStore({"servers": [nats_server.url]}, subjects=s, replicas=1, timeout=2.0) for s in pair]
        results = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
        try:
            opened = [s for s, r in zip(stores, results, strict=True) if r is None]
            refused = [r for r in results if r is not None]
            assert len(opened) == 1, results
            assert isinstance(refused[0], StreamConfigError), refused
            assert "belongs to another prefix" in str(refused[0])
        finally:
            for s, r in zip(stores, results, strict=True):
                if r is None:
                    await s.close()


async def test_an_items_stream_made_meanwhile_by_an_outbox_is_made_the_fan_out(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An SQLite log service's outbox (ensure_stream) made <PREFIX>_ITEMS, a plain items
    # stream without sources, between the store's look for it and its create.  Found at
    # startup, such a stream is made the fan-out; lost to in the race, only its shard
    # count was checked (it has none): the store opened, appended, and the fan-out never
    # got an item (workers and follow heard nothing).  The window is widened by running
    # the real outbox's ensure_stream just before the store's create (no other way to
    # land it between two requests).
    from services.log.outbox import ensure_stream
    from services.log.store.jetstream import layout as layout_module
    from tests.contract.store_helpers import item, req

    subjects = Subjects("madeby")
    nc = await nats.connect(nats_server.url)
    api = layout_module._api

    async def outbox_first(client: Any, subject: str, body: Any, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        if subject == f"STREAM.CREATE.{subjects.stream_name}":
            await ensure_stream(nc.jetstream(), subjects)
        return await api(client, subject, body, timeout)

    monkeypatch.setattr(layout_module, "_api", outbox_first)
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=subjects)
    try:
        await store.open()
        await store.append("s", req(item("one")))
        js = nc.jetstream()
        info = await js.stream_info(subjects.stream_name)
        assert [s.name for s in info.config.sources or []] == store.layout.log_streams, info.config
        for _ in range(100):  # the fan-out's copy trails the log
            if (await js.stream_info(subjects.stream_name)).state.messages == 1:
                break
            await asyncio.sleep(0.02)
        msg = await js.get_last_msg(subjects.stream_name, subjects.items("s"))
        assert b'"one"' in msg.data
    finally:
        await store.close()
        await nc.close()
