"""Fixtures of the integration tests: the log service tests' ``env`` (on both stores)."""

from tests.support.logenv import env, store_kind  # noqa: F401 - fixtures
