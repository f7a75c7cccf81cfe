"""Two prefixes whose stream names are the same (``a.b`` and ``a_b``: dots
become underscores, and names are upper-cased).  The JetStream store of the
second finds ``A_B_ITEMS`` and ``A_B_LOG_0`` (the first's, capturing
``a.b.log.0.>``).  Opening refuses streams that do not capture this prefix's
subjects (or no longer keep one message per item id), with one clear line: it
checked only their shard metadata and opened, and every append then went to
``a_b.log.0.*``, which no stream captures."""

from __future__ import annotations

import asyncio

import pytest

from services.log.store.jetstream import JetStreamStore
from shared.failures import StreamConfigError
from shared.messages import AppendItem, AppendRequest
from shared.subjects import Subjects
from tests.support.natsd import NatsServer


def _req(text: str) -> AppendRequest:
    return AppendRequest(items=[AppendItem(agent="user", data={"role": "user", "content": text})])


async def test_a_log_stream_capturing_another_prefix_is_refused_at_open(nats_server: NatsServer) -> None:
    first = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("a.b"), replicas=1, timeout=2.0)
    await first.open()
    try:
        assert (await first.append("s", _req("first prefix"))).last_order == 1
    finally:
        await first.close()

    second = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("a_b"), replicas=1, timeout=2.0)
    try:
        with pytest.raises(StreamConfigError):
            await second.open()
            # It opened: the service would say "ready".  What does an append get?
            try:
                reply = await asyncio.wait_for(second.append("s", _req("second prefix")), 20)
                outcome = f"append answered {reply!r}"
            except Exception as e:  # noqa: BLE001
                outcome = f"append failed: {type(e).__name__}: {e}"
            pytest.fail(f"opened on streams of prefix a.b; {outcome}")
    finally:
        await second.close()
