"""The one failure rule: what is transient, what is fatal, and what a supervised loop does."""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import StreamConfig

from shared.errors import BadRequestError, UnavailableError
from shared.failures import (
    Backoff,
    FatalError,
    Loops,
    StreamConfigError,
    check_items_stream,
    is_transient,
    supervise,
    wait_for,
    watch,
)
from shared.subjects import Subjects

TRANSIENT = [
    TimeoutError(),
    nats.errors.TimeoutError(),
    nats.errors.NoRespondersError(),
    nats.errors.ConnectionClosedError(),
    nats.errors.ConnectionReconnectingError(),
    nats.errors.UnexpectedEOF(),
    nats.errors.OutboundBufferLimitError(),
    ConnectionResetError(),
    ConnectionError("disconnected from NATS"),
    OSError(errno.EHOSTUNREACH, "No route to host"),
    nats.js.errors.ServiceUnavailableError(),
    nats.js.errors.APIError(code=503, err_code=10008, description="temporarily unavailable"),
    nats.js.errors.APIError(code=400, err_code=10070, description="wrong last msg ID: a:1"),
    nats.js.errors.APIError(code=503, err_code=10158, description="duplicate message id is in process"),
    UnavailableError("the store is busy"),
    sqlite3.OperationalError("database is locked"),
]
FATAL = [
    TypeError("unsupported operand"),
    AttributeError("'NoneType' object has no attribute 'publish'"),
    KeyError("session"),
    FatalError("the items stream belongs to another database"),
    StreamConfigError("the items stream is sealed"),
    nats.errors.MaxPayloadError(),
    nats.errors.BadSubjectError(),
    nats.js.errors.NotFoundError(code=404, err_code=10059, description="stream not found"),
    nats.js.errors.BadRequestError(code=400, err_code=10054, description="message size exceeds maximum"),
    BadRequestError("bad item"),
    PermissionError(errno.EACCES, "Permission denied"),
    sqlite3.DatabaseError("file is not a database"),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", FATAL, ids=lambda e: type(e).__name__)
def test_fatal(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_backoff_doubles_to_its_cap_with_equal_jitter() -> None:
    b = Backoff(initial=0.1, maximum=2.0)
    assert [b.delay(n, rng=lambda: 0.0) for n in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert [b.delay(n, rng=lambda: 0.5) for n in (0, 10)] == pytest.approx([0.075, 1.5])
    assert b.delay(10_000, rng=lambda: 0.0) == 1.0  # no overflow after a long outage


def test_an_items_stream_must_capture_the_items_subjects() -> None:
    subjects = Subjects("convlog")
    for good in (["convlog.items.>"], ["convlog.>"], ["convlog.items.*"], [">"], ["a", "convlog.*.*"]):
        check_items_stream(StreamConfig(name="S", subjects=good), subjects)
    for bad in (["elsewhere.>"], ["convlog.items"], ["convlog.items.x"], [], None):
        with pytest.raises(StreamConfigError, match="captures"):
            check_items_stream(StreamConfig(name="S", subjects=bad), subjects)
    with pytest.raises(StreamConfigError, match="sealed"):
        check_items_stream(StreamConfig(name="S", subjects=["convlog.items.>"], sealed=True), subjects)


FAST = Backoff(initial=0.002, maximum=0.004)


async def test_supervise_retries_transient_failures_until_the_loop_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = [nats.errors.NoRespondersError(), TimeoutError(), ConnectionResetError()]
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)

    with caplog.at_level(logging.WARNING):
        await supervise(run, "pump", logger=logging.getLogger("t"), backoff=FAST)
    assert calls == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all(w.startswith("pump: ") for w in warnings)
    assert "NoRespondersError" in warnings[0] and "retrying in" in warnings[0]


async def test_supervise_raises_fatal_with_one_line_naming_loop_and_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError
        raise TypeError("can't concat str to bytes")

    with caplog.at_level(logging.WARNING), pytest.raises(FatalError) as info:
        await supervise(run, "outbox", logger=logging.getLogger("t"), backoff=FAST)
    assert calls == 2  # no retry after the fatal one
    assert str(info.value) == "outbox stopped: TypeError: can't concat str to bytes"
    assert isinstance(info.value.__cause__, TypeError)
    (critical,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical.getMessage().startswith("outbox stopped: TypeError: can't concat str to bytes;")
    assert critical.exc_info is not None  # a bug: the traceback goes with it


async def test_a_recognised_fatal_condition_logs_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        raise StreamConfigError("the items stream S is sealed: it stores nothing more")

    with caplog.at_level(logging.WARNING), pytest.raises(FatalError):
        await supervise(run, "outbox", logger=logging.getLogger("t"), backoff=FAST)
    (critical,) = caplog.records
    assert "StreamConfigError: the items stream S is sealed" in critical.getMessage()
    assert critical.exc_info is None


async def test_give_up_ends_a_failing_loop_quietly() -> None:
    async def run() -> None:
        raise nats.errors.ConnectionClosedError

    await supervise(run, "pump", logger=logging.getLogger("t"), give_up=lambda: True)


async def test_wake_cuts_a_backoff_short() -> None:
    wake, failed = asyncio.Event(), asyncio.Event()
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            failed.set()
            raise ConnectionResetError

    task = asyncio.create_task(
        supervise(run, "pump", logger=logging.getLogger("t"), wake=wake,
                  backoff=Backoff(initial=3600, maximum=3600))
    )
    await asyncio.wait_for(failed.wait(), 5)
    await asyncio.sleep(0.05)
    assert not task.done()  # waiting out its hour-long backoff
    wake.set()
    await asyncio.wait_for(task, 5)
    assert calls == 2


async def test_watch_reports_a_dead_task_as_fatal_once(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[FatalError] = []

    async def buggy() -> None:
        raise AttributeError("'NoneType' object has no attribute 'ack'")

    async def fine() -> None:
        return None

    with caplog.at_level(logging.WARNING):
        for coro in (buggy(), fine()):
            task = asyncio.create_task(coro, name="session s1")
            watch(task, seen.append, logger=logging.getLogger("t"))
            await asyncio.wait({task})
        cancelled = asyncio.create_task(asyncio.sleep(10))
        watch(cancelled, seen.append)
        cancelled.cancel()
        await asyncio.wait({cancelled})
        await asyncio.sleep(0)

    assert [str(e) for e in seen] == ["session s1 stopped: AttributeError: 'NoneType' object has no attribute 'ack'"]
    assert [r.levelno for r in caplog.records] == [logging.CRITICAL]


async def test_loops_stop_the_process_once_on_the_first_fatal_failure() -> None:
    shutdowns = 0
    stopped = asyncio.Event()

    async def shutdown() -> None:
        nonlocal shutdowns
        shutdowns += 1
        stopped.set()

    async def healthy() -> None:
        await asyncio.sleep(3600)

    async def broken() -> None:
        raise TypeError("boom")

    loops = Loops(shutdown, logging.getLogger("t"))
    quiet = loops.start(healthy, "quiet")
    loops.raise_if_failed()  # nothing failed yet
    loops.start(broken, "pump")
    second = asyncio.create_task(broken(), name="session x")
    loops.watch(second)
    await asyncio.wait_for(stopped.wait(), 5)
    await asyncio.wait({second})
    await asyncio.sleep(0)
    with pytest.raises(FatalError, match=r"^pump stopped: TypeError: boom$"):
        loops.raise_if_failed()
    assert shutdowns == 1
    quiet.cancel()


# -- wait_for: waiting at start-up -------------------------------------------------

_FAST = Backoff(initial=0.001, maximum=0.002)


async def test_wait_for_retries_what_heals_until_it_answers() -> None:
    calls: list[int] = []
    waits: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise UnavailableError("not yet")
        return "up"

    got = await wait_for(attempt, within=5, backoff=_FAST,
                         heals=lambda e: isinstance(e, UnavailableError),
                         waiting=lambda n, waited, e: waits.append(n))
    assert got == "up" and len(calls) == 4 and waits == [0, 1, 2]


async def test_wait_for_raises_what_does_not_heal_at_once() -> None:
    calls: list[int] = []

    async def attempt() -> None:
        calls.append(1)
        raise BadRequestError("never")

    with pytest.raises(BadRequestError):
        await wait_for(attempt, within=5, backoff=_FAST,
                       heals=lambda e: isinstance(e, UnavailableError), waiting=lambda *a: None)
    assert len(calls) == 1


async def test_wait_for_gives_up_at_the_deadline_with_the_last_failure() -> None:
    calls: list[int] = []

    async def attempt() -> None:
        calls.append(1)
        raise UnavailableError(f"down {len(calls)}")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UnavailableError) as info:
        await wait_for(attempt, within=0.2, backoff=Backoff(initial=0.05, maximum=0.1),
                       heals=lambda e: isinstance(e, UnavailableError), waiting=lambda *a: None)
    assert info.value.args[0] == f"down {len(calls)}" and len(calls) > 1
    assert loop.time() - started < 2.0  # waits are capped by the time left
