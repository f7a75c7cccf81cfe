"""Fixtures of the integration tests: the log service tests' ``env`` (on both stores),
the Agents SDK tests' ``new_session`` and ``run_config``, signing ``keys``, and
``triage_signed`` (a client of a log service that requires signatures)."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.cli.main import main
from services.log.service import LogService
from shared.client import LogClient
from shared.config import load_settings
from shared.signing import Signer
from tests.support.logenv import env, store_kind  # noqa: F401 - fixtures
from tests.support.natsd import NatsServer
from tests.support.sdk_env import new_session, run_config  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh keyring and keys (``convlog keys init``): ``keyring.json``, ``<role>.nk``."""
    out = tmp_path_factory.mktemp("keys") / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    return out


@pytest.fixture
async def triage_signed(nats_server: NatsServer, tmp_path: Path, keys: Path) -> AsyncIterator[LogClient]:
    """A client signing as Triage, of a log service (SQLite in tmp_path) that requires
    signatures and checks them against ``keys``."""
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db"),
                              "keyring": str(keys / "keyring.json"), "require_signatures": True}, {})
    svc = LogService(settings)
    await svc.start()
    try:
        client = await LogClient.connect(nats_server.url)
        client.signer = Signer.load(keys / "Triage.nk")
        try:
            yield client
        finally:
            await client.close()
    finally:
        await svc.shutdown()
