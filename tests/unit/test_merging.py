"""Merger: one group at a time; what arrives meanwhile goes together in the next."""

from __future__ import annotations

import asyncio

import pytest

from shared.merging import Merger


class Runs:
    """A ``run`` function that records its groups and waits for a go per group."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.go = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, items: list[str]) -> list[str]:
        self.groups.append(list(items))
        await self.go.wait()
        if self.fail is not None:
            raise self.fail
        return [f"done {i}" for i in items]


def merger(runs: Runs, limit: int = 10) -> Merger[str, str]:
    return Merger(runs, size=len, limit=limit, stopped=lambda i: f"stopped {i}", name="test-merger")


async def started(runs: Runs, groups: int) -> None:
    for _ in range(100):
        if len(runs.groups) >= groups:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{groups} groups never started: {runs.groups}")


async def test_calls_made_while_a_group_runs_go_together_in_the_next() -> None:
    runs = Runs()
    m = merger(runs)
    first = asyncio.create_task(m.submit("a"))
    await started(runs, 1)
    assert m.busy
    later = [asyncio.create_task(m.submit(x)) for x in ("b", "c", "d")]
    await asyncio.sleep(0)
    runs.go.set()
    assert await first == "done a"
    assert [await t for t in later] == ["done b", "done c", "done d"]
    assert runs.groups == [["a"], ["b", "c", "d"]]
    assert m.merged == 1
    assert not m.busy


async def test_a_group_holds_at_most_the_limit_and_a_big_item_goes_alone() -> None:
    runs = Runs()
    m = merger(runs, limit=4)
    runs.go.set()
    calls = [asyncio.create_task(m.submit(x)) for x in ("aa", "bb", "c", "dddddd", "e")]
    assert [await t for t in calls] == ["done aa", "done bb", "done c", "done dddddd", "done e"]
    # All five wait before the first group starts: "aa" and "bb" fill 4, "c" and
    # "dddddd" would exceed it, and "dddddd" alone exceeds it (it goes anyway).
    assert runs.groups == [["aa", "bb"], ["c"], ["dddddd"], ["e"]]


async def test_an_error_of_a_group_reaches_each_of_its_callers_and_the_next_group_runs() -> None:
    runs = Runs()
    m = merger(runs)
    runs.fail = RuntimeError("refused")
    first = [asyncio.create_task(m.submit(x)) for x in ("a", "b")]
    await started(runs, 1)
    runs.go.set()
    for t in first:
        with pytest.raises(RuntimeError, match="refused"):
            await t
    runs.fail = None
    assert await m.submit("c") == "done c"


async def test_closing_gives_the_running_group_and_the_waiting_items_the_stopped_result() -> None:
    runs = Runs()
    m = merger(runs)
    running = asyncio.create_task(m.submit("a"))
    await started(runs, 1)
    waiting = asyncio.create_task(m.submit("b"))
    await asyncio.sleep(0)
    await asyncio.wait_for(m.close(), 1)
    assert await running == "stopped a"
    assert await waiting == "stopped b"
    assert not m.busy
    runs.go.set()
    assert await m.submit("c") == "done c"  # usable again after a close


async def test_a_cancelled_caller_does_not_stop_its_group() -> None:
    runs = Runs()
    m = merger(runs)
    gone = asyncio.create_task(m.submit("a"))
    await started(runs, 1)
    stays = asyncio.create_task(m.submit("b"))
    gone.cancel()
    await asyncio.sleep(0)
    runs.go.set()
    assert await stays == "done b"
    assert runs.groups == [["a"], ["b"]]
    with pytest.raises(asyncio.CancelledError):
        await gone
