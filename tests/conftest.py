"""Shared fixtures: real servers on ephemeral ports, always stopped in teardown."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from shared.client import LogClient
from tests.support.fake_openai import FakeOpenAI
from tests.support.natscluster import NatsCluster
from tests.support.natsd import NatsServer

if TYPE_CHECKING:
    from tests.support.workerstack import WorkerStack


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A single JetStream nats-server on 127.0.0.1, ephemeral port, store in tmp_path."""
    server = NatsServer(tmp_path / "nats")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """Start extra servers with custom options: ``factory(config=..., extra_args=[...])``.

    Keyword arguments go to :class:`NatsServer`; every server is stopped in teardown.
    """
    started: list[NatsServer] = []

    def factory(**kwargs: Any) -> NatsServer:
        server = NatsServer(tmp_path / f"nats-{len(started) + 1}", **kwargs)
        started.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in started:
            server.stop()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A 3-node JetStream cluster whose meta leader is elected and can place R3 streams."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        # Starting polls log files with sleeps: keep that off the event loop.
        await asyncio.to_thread(cluster.start)
        await cluster.wait_ready()
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A scripted OpenAI-compatible server; ``fake_openai.base_url`` ends in ``/v1``."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path (supervisord's control socket must fit AF_UNIX
    limits), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="cl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmp_db(tmp_path: Path) -> Path:
    """Path of a (not yet created) SQLite file in tmp_path."""
    return tmp_path / "convlog.db"


@pytest.fixture
def db_path(tmp_db: Path) -> Path:
    """Alias of ``tmp_db`` (the name DESIGN.md uses)."""
    return tmp_db


@pytest.fixture
async def log_url(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[str]:
    """A log service (SQLite in tmp_path) serving on a fresh nats-server; yields the NATS URL."""
    from services.log.service import LogService
    from shared.config import load_settings

    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db")}, {})
    service = LogService(settings)
    await service.start()
    try:
        yield nats_server.url
    finally:
        await service.shutdown()


@pytest.fixture
async def log_client(log_url: str) -> AsyncIterator[LogClient]:
    """A LogClient connected to the ``log_url`` service."""
    client = await LogClient.connect(log_url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def stack(nats_server: NatsServer, tmp_path: Path, fake_openai: FakeOpenAI) -> AsyncIterator[WorkerStack]:
    """The log service and agent workers as real processes, on the fake model (see ``worker_stack``)."""
    from tests.support.workerstack import worker_stack

    async with worker_stack(nats_server, tmp_path, fake_openai) as s:
        yield s


@pytest.fixture
def spans() -> Iterator[Any]:
    """An in-memory OpenTelemetry exporter, made convlog's tracer provider for the test
    (the tests of traces; skipped without the OpenTelemetry SDK)."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shared import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(previous)
        provider.shutdown()
