"""The benches' open loop: what it counts when operations do not finish."""

from __future__ import annotations

import asyncio

import pytest

from services.bench import measure


# Operations still running when the open loop stopped waiting were in no figure (not
# ops, not errors) and went on running into the next phase
async def test_open_loop_counts_and_stops_operations_that_never_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "OPEN_LOOP_DRAIN_S", 0.3, raising=False)
    never = asyncio.Event()
    running: set[int] = set()

    async def op(i: int) -> None:
        running.add(i)
        try:
            if i % 2:
                await never.wait()  # a request that never gets its answer
        finally:
            running.discard(i)

    run = await measure.open_loop("half hung", op, rate=40.0, duration=0.25)

    assert (run.ops, run.errors) == (5, 5)
    assert len(run.late) == 10 and len(run.latencies) == 5
    assert not running  # nothing left running into the next phase


async def test_a_closed_loop_stops_when_cancelled_even_if_an_op_swallows_the_cancel() -> None:
    # Python 3.11's wait_for (inside nats-py's request) returns a reply that lands with
    # a cancel and drops the cancel: SIGTERM to `convlog bench` then ran the phase to
    # its end (60 s in the test of it) instead of stopping the private stack at once.
    async def op(i: int) -> None:
        try:
            await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            return  # as wait_for does when its future is already done

    task = asyncio.create_task(measure.closed_loop("swallowing", op, writers=2, duration=30.0))
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2.0)
    assert done, "the closed loop ran on after its cancel"
    assert task.cancelled()


# The turn bench's open loop offered a fixed 300 turns/s whatever the machine: a
# fifth of what the closed loop reached on a quiet 2-core machine, so its p99 said
# little about latency at a real load. By default it is now offered half the closed
# loop's rate of the same run (as the plain bench's half-load phase).
def test_turn_bench_open_loop_is_offered_half_the_closed_loops_rate_unless_asked() -> None:
    from services.bench.turns import Phase, open_loop_rate

    runs = [Phase("plain turns, 1 session, 20 agents", 240, 1.0, []),
            Phase("plain turns, 8 sessions", 900, 1.0, []),
            Phase("plain turns, 128 sessions", 5_333, 4.0, [])]
    assert open_loop_rate(None, runs, 128) == 667  # 1,333 turns/s closed loop
    assert open_loop_rate(None, runs, 8) == 450
    assert open_loop_rate(None, runs, 1) == 120  # --levels 1: the one-session closed loop
    assert open_loop_rate(500.0, runs, 128) == 500.0
    assert open_loop_rate(None, [Phase("plain turns, 128 sessions", 1, 4.0, [])], 128) == 1.0
