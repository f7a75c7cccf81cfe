"""Fixtures of the integration tests: the log service tests' ``env`` (on both stores),
the Agents SDK tests' ``new_session`` and ``run_config``, and signing ``keys``."""

from pathlib import Path

import pytest

from services.cli.main import main
from tests.support.logenv import env, store_kind  # noqa: F401 - fixtures
from tests.support.sdk_env import new_session, run_config  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh keyring and keys (``convlog keys init``): ``keyring.json``, ``<role>.nk``."""
    out = tmp_path_factory.mktemp("keys") / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    return out
