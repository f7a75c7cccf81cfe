"""The ``env`` fixture of the log service tests (``tests/integration/test_log_service*.py``;
``tests/integration/conftest.py`` makes it theirs): a nats-server with a 64 KiB max
payload and the log service in-process on a fresh store, on both stores (SQLite with
its outbox, JetStream whose items stream sources the log streams), plus the helpers
those tests share.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.micro.service import ServiceStats, ServiceVerb, control_subject

from services.log.service import SERVICE_NAME, LogService
from shared.client import LogClient
from shared.config import Settings, load_settings
from shared.messages import Envelope
from shared.nats_seam import FAST, PUBLIC, bind, probe
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer

MAX_PAYLOAD = 64 * 1024
MAX_ITEM_BYTES = 4096
STREAM = "CONVLOG_ITEMS"

#: Run a test on both nats-py seams (shared.nats_seam): the fast one on
#: nats-py internals, and nats-py's public API only, for service and client.
SEAMS = ["auto", "public"]
SEAM_IDS = ["fast-seam", "public-seam"]
both_seams = pytest.mark.parametrize("env", SEAMS, ids=SEAM_IDS, indirect=True)


@dataclass
class Env:
    server: NatsServer
    settings: Settings
    service: LogService
    nc: Client  # a plain connection for wire-level requests
    client: LogClient
    tmp: Path

    @property
    def db(self) -> Path:
        return self.settings.db_path


def expect_seam(service: LogService, mode: str) -> None:
    """The service runs on the seam ``mode`` asks for (``auto`` is fast on a tested nats-py)."""
    want = PUBLIC if mode == "public" else FAST
    assert service._seam is want, f"seam {service._seam.name if service._seam else None}: {probe().reason()}"


@pytest.fixture(params=["sqlite", "jetstream"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store the ``env`` service runs on (every ``env`` test runs on both)."""
    return str(request.param)


@pytest.fixture
async def env(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path, request: pytest.FixtureRequest,
    store_kind: str,
) -> AsyncIterator[Env]:
    """A nats-server with a 64 KiB max payload and the log service on a fresh store
    (SQLite file or JetStream streams; on the nats-py seam given by indirect
    parametrization, default ``auto``)."""
    mode = getattr(request, "param", "auto")
    server = nats_server_factory(config=f"max_payload: {MAX_PAYLOAD}\n")
    settings = load_settings(
        {"nats_url": server.url, "db": str(tmp_path / "log.db"), "data_dir": str(tmp_path),
         "max_item_bytes": MAX_ITEM_BYTES, "nats_seam": mode, "store": store_kind},
        environ={},
    )
    service = LogService(settings)
    try:
        await service.start()
        expect_seam(service, mode)
        nc = await nats.connect(server.url)
        bind(nc, mode)
        try:
            yield Env(server, settings, service, nc, LogClient(nc, timeout=5, deadline=10), tmp_path)
        finally:
            await nc.close()
    finally:
        await service.shutdown()


async def wire(nc: Client, subject: str, body: bytes | dict[str, Any] = b"") -> tuple[dict[str, str], Any]:
    """One raw request: (headers, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subject, data, timeout=5)
    return dict(msg.headers or {}), json.loads(msg.data)


async def service_stats(nc: Client, service: LogService) -> ServiceStats:
    """``$SRV.STATS`` of this one service instance."""
    subject = control_subject(ServiceVerb.STATS, SERVICE_NAME, service._service.id)
    return ServiceStats.from_dict(json.loads((await nc.request(subject, b"", timeout=5)).data))


def user(content: str, **extra: Any) -> dict[str, Any]:
    return {"agent": "user", "data": {"role": "user", "content": content}, **extra}


async def raw_log(env: Env, sid: str) -> list[Envelope]:
    return await env.client.items(sid, raw=True)


async def stream_messages(env: Env) -> int:
    return (await env.nc.jetstream().stream_info(STREAM)).state.messages


async def settled_state(env: Env) -> tuple[list[tuple[str, int]], int]:
    """Every session's last order and the stream size, once the outbox caught up."""
    async def caught_up() -> tuple[list[tuple[str, int]], int]:
        sessions = [(s.session_id, s.last_order) async for s in env.client.iter_sessions()]
        published = await stream_messages(env)
        assert published == sum(last for _, last in sessions), (published, sessions)
        return sessions, published

    return await assert_eventually(caught_up, timeout=10)
