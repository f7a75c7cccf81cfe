"""Fixtures of the integration tests: the log service tests' ``env`` (on both stores),
the Agents SDK tests' ``new_session`` and ``run_config``."""

from tests.support.logenv import env, store_kind  # noqa: F401 - fixtures
from tests.support.sdk_env import new_session, run_config  # noqa: F401 - fixtures
