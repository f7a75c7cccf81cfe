"""Trace contexts the log service keeps per committed item until the item (or
its turn notice) is published with them (services/log/traces.py): none may stay
once every item is out, on either store. On the JetStream store no outbox pops
them: every committed item's context stayed, up to 100,000 of them (then all
were dropped at once, a pending notice's included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from services.log.service import LogService  # noqa: E402
from shared.client import LogClient  # noqa: E402
from shared.config import load_settings  # noqa: E402
from shared.messages import AppendItem  # noqa: E402
from tests.support.eventually import assert_eventually  # noqa: E402
from tests.support.natsd import NatsServer  # noqa: E402


@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_no_trace_context_is_kept_once_the_items_are_out(
    spans: InMemorySpanExporter, nats_server: NatsServer, tmp_path: Path, store: str
) -> None:
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"),
                              "grace": 2, "store": store}, environ={})
    service = LogService(settings)
    await service.start()
    client = await LogClient.connect(nats_server.url)
    notices: list[Any] = []

    async def on_notice(msg: Any) -> None:
        notices.append(msg)

    await client.nc.subscribe(f"{settings.subjects.prefix}.work.>", cb=on_notice)
    try:
        assert service.traces is not None
        for i in range(50):
            await client.append(f"s{i % 5}", [AppendItem(agent="Triage", data={"role": "assistant",
                                                                                "content": f"m{i}"})])
        for i in range(10):
            await client.send(f"u{i}", f"hello {i}")

        def none_kept() -> None:
            assert len(service.traces.traces) == 0, len(service.traces.traces)

        await assert_eventually(none_kept, timeout=10)

        def noticed() -> None:  # each turn notice still continues its message's trace
            users = [m for m in notices if m.headers and m.headers.get("Nats-Msg-Id", "").startswith("u")]
            assert len(users) == 10 and all("traceparent" in m.headers for m in users), \
                [m.headers for m in notices]

        await assert_eventually(noticed, timeout=10)
    finally:
        await client.close()
        await service.shutdown()
