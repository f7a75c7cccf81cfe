"""Fixtures of the Agents SDK tests (``tests/integration/conftest.py`` provides them):
sessions on the shared test client, and a ``RunConfig`` whose every model is the
SDK's Responses model on the fake OpenAI server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from agents import (
    RunConfig,
)

from shared import ConvlogSession
from shared.client import LogClient
from tests.support.fake_openai import FakeOpenAI
from tests.support.seed_agents import FakeServerProvider

__all__ = ["contents", "new_session", "run_config"]


@pytest.fixture
async def new_session(log_client: LogClient) -> AsyncIterator[Callable[..., ConvlogSession]]:
    """``new_session(sid, **kw)``: a session on the shared test client, closed at the end."""
    made: list[ConvlogSession] = []

    def make(session_id: str = "test_session", **kwargs: Any) -> ConvlogSession:
        session = ConvlogSession(session_id, client=log_client, **kwargs)
        made.append(session)
        return session

    yield make
    for session in made:
        await session.close()


@pytest.fixture
def run_config(fake_openai: FakeOpenAI) -> RunConfig:
    """Every agent's model is the SDK's Responses model on the fake server; no tracing export."""
    return RunConfig(model_provider=FakeServerProvider(fake_openai.base_url), tracing_disabled=True)


def contents(items: list[dict[str, Any]]) -> list[Any]:
    return [item.get("content") for item in items]
