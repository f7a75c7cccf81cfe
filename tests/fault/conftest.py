"""Fixtures for real-process tests: log services and load writers, stopped by PID;
JetStream-store settings and a client for the tests that start their own log services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.client import LogClient
from shared.config import Settings, load_settings
from tests.support.logsvc import log_services, writer_procs
from tests.support.natsd import NatsServer

__all__ = ["client", "js_settings", "log_services", "writer_procs"]


@pytest.fixture
def js_settings(nats_server: NatsServer, tmp_path: Path) -> Settings:
    """Settings of a JetStream-store log service on ``nats_server``."""
    return load_settings(
        {"nats_url": nats_server.url, "db": str(tmp_path / "unused.db"), "data_dir": str(tmp_path),
         "store": "jetstream"},
        environ={},
    )


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[LogClient]:
    """A client of ``nats_server`` (the test starts the log services it needs)."""
    c = await LogClient.connect(nats_server.url)
    try:
        yield c
    finally:
        await c.close()
