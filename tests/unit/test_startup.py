"""Start-up waits: what heals, what a process says while waiting, and how it gives up."""

from __future__ import annotations

import logging

import nats.errors
import nats.js.errors
import pytest

from shared.config import ConfigError
from shared.errors import UnavailableError
from shared.startup import heals_at_start, wait_at_start


def test_heals_at_start_waits_for_peers_and_transient_failures_only() -> None:
    peers = nats.js.errors.BadRequestError(code=400, err_code=10005, description="no suitable peers for placement")
    assert heals_at_start(peers)
    assert heals_at_start(nats.errors.TimeoutError())  # a request lost while a cluster forms
    assert not heals_at_start(nats.js.errors.BadRequestError(code=400, err_code=10058, description="stream name in use"))
    assert not heals_at_start(TypeError("a bug"))


async def test_wait_at_start_says_once_what_it_waits_for_and_when_it_is_there(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise nats.errors.TimeoutError()
        return "placed"

    log = logging.getLogger("convlog.test.start")
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert await wait_at_start(attempt, what="the streams", log=log, within=10) == "placed"
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert len(calls) == 3 and len(lines) == 2, lines
    assert lines[0].startswith("waiting for the streams (up to 10 s): TimeoutError")
    assert lines[1].startswith("the streams: ready after ")


async def test_wait_at_start_raises_what_does_not_heal_at_once(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def attempt() -> None:
        calls.append(1)
        raise nats.js.errors.BadRequestError(code=400, err_code=10058, description="stream name in use")

    with pytest.raises(ConfigError) as info:
        await wait_at_start(attempt, what="the streams", log=logging.getLogger("convlog.test.start"), within=10)
    assert len(calls) == 1
    assert str(info.value) == "cannot set up the streams: stream name in use (JetStream error 10058)"
    assert isinstance(info.value.__cause__, nats.js.errors.BadRequestError)


async def test_wait_at_start_gives_up_at_the_deadline_as_unavailable() -> None:
    async def attempt() -> None:
        raise nats.errors.TimeoutError()

    with pytest.raises(UnavailableError) as info:
        await wait_at_start(attempt, what="the streams", log=logging.getLogger("convlog.test.start"), within=0.2)
    assert str(info.value).startswith("cannot set up the streams: NATS did not answer within 0.2 s (TimeoutError")
