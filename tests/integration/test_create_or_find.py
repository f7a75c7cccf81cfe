"""Creating the streams and buckets every process needs, against a real server:
one created meanwhile by another process, with another configuration, is
found.  (A refusal with nothing to find is raised as itself, not as "not
found": tests/fault/test_jetstream_cluster.py, a worker on a cluster whose
peers are offline.)"""

from __future__ import annotations

import nats
from nats.js.api import KeyValueConfig

from shared.startup import create_or_find
from tests.support.natsd import NatsServer


async def test_a_bucket_created_meanwhile_with_another_config_is_found(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.create_key_value(KeyValueConfig(bucket="b", history=2))
        made = await create_or_find(lambda: js.create_key_value(KeyValueConfig(bucket="b", history=7)),
                                    lambda: js.key_value("b"))
        assert (await made.status()).history == 2  # the one that was there, not a second
    finally:
        await nc.close()
