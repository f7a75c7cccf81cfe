"""Two JetStream-store log services opening at the same moment on an empty server."""

from __future__ import annotations

import asyncio

import nats

from services.log.store.jetstream import JetStreamStore
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
