"""Opening the JetStream store: a stream JetStream refuses to create is
refused with JetStream's reason (not a misleading "stream not found"), and
``open_store`` does not wait on a refusal that will not heal.  (A store whose
first open failed opening on a later try, and the wait for a cluster still
electing its leaders, are in ``tests/fault/test_jetstream_cluster.py``.)"""

from __future__ import annotations

import time

import nats
import nats.js.errors
import pytest

from services.log.store.factory import open_store
from services.log.store.jetstream import JetStreamStore
from shared.config import ConfigError
from shared.subjects import Subjects
from tests.support.natsd import NatsServer


async def test_a_stream_jetstream_refuses_to_create_is_refused_with_its_reason(nats_server: NatsServer) -> None:
    # Another stream already captures the log's subjects: JetStream refuses ours, and says why.
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name="SQUATTER", subjects=["squat.items.>"])
    finally:
        await nc.close()
    store = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("squat"), replicas=1)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:  # a refusal that cannot heal: exit 2
        await open_store(store, wait=30)
    cause = info.value.__cause__
    assert isinstance(cause, nats.js.errors.APIError) and cause.code == 400, repr(cause)  # JetStream's refusal, kept
    assert "overlap" in str(info.value), str(info.value)  # not "stream not found"
    assert time.monotonic() - started < 10, "waited on a refusal that cannot heal"
    await store.close()
