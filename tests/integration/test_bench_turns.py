"""``convlog bench --turns`` end to end, at toy length: the phases that count
deliveries (one session, handoffs, the two alternating) on a real stack of
worker processes, each turn answered once, and the time breakdown recorded
for every phase, the alternating ones included (the figures themselves are
for the README, never asserted)."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.bench.measure import plain as as_json
from services.bench.stack import local_stack
from services.bench.turns import bench_spec, figures, report, run_turn_bench


async def test_turn_bench_phases_answer_each_turn_once_and_show_where_the_time_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # the instant rules model
    spec = tmp_path / "agents.toml"
    spec.write_text(bench_spec(3))
    common = ["--agents", str(spec), "--publish-timings", "--ack-wait", "5"]
    started: list[subprocess.Popen[bytes]] = []
    args = argparse.Namespace(duration=1.0, json=False)
    with local_stack(workers=[["L1Billing", *common], ["Triage", *common]], started=started) as url:
        phases = await run_turn_bench(url, args, spec, 3, None, full=False)
    assert all(p.poll() is not None for p in started)  # the stack stopped its workers
    names = [p.name for p in phases]
    assert names == ["plain turns, 1 session, 3 agents", "handoff turns, 1 at a time, 3 agents",
                     "plain turns, alternating, 1 at a time, 3 agents",
                     "handoff turns, alternating, 1 at a time, 3 agents"]
    for p in phases:
        assert p.ops > 0 and (p.errors, p.lost, p.doubled) == (0, 0, 0), (p.name, p.ops, p.errors, p.lost, p.doubled)
        assert p.breakdown and len(p.breakdown["model"]) > 0, p.name
        assert len(p.breakdown["append"]) <= p.ops, p.name
    plain, handoff, alt_plain, alt_handoff = phases
    assert plain.deliveries_per_turn == 1.0 and handoff.deliveries_per_turn == 2.0
    for p in (handoff, alt_handoff):  # a handoff turn shows each agent's part
        assert {"Triage.part", "L1Billing.part", "Triage.model", "L1Billing.reply_append"} <= set(p.breakdown)
    assert not any("." in k for k in alt_plain.breakdown)
    fig = figures(phases)
    assert set(fig["handoff_over_plain_p50_alternating"]) == {"3"}
    alternating = [p for p in fig["phases"] if "alternating" in p["name"]]
    assert all("breakdown_ms" in p for p in alternating), alternating
    text = report(fig, args)
    for name in (alt_plain.name, alt_handoff.name):
        assert f"where it goes (p50/p99 ms), {name}: append " in text, text
    # `--json` printed "deliveries_per_turn": NaN for the alternating phases (never counted
    # there): Python reads that, but it is not JSON (jq, JSON.parse and every strict parser
    # refuse the whole document).
    doc = json.loads(json.dumps(as_json(fig)), parse_constant=_no_constant)
    assert all(p["deliveries_per_turn"] is None for p in doc["phases"] if "alternating" in p["name"]), doc


# A turn that ended with its `fail` item (the agent could not answer) was timed and
# counted as an answered turn: a bench whose agents all failed reported fast turns
async def test_a_failed_turn_is_an_error_not_a_timed_turn(log_url: str) -> None:
    import asyncio

    from services.bench.turns_watch import ReplyWatcher, TurnFailed
    from services.worker.turn_ids import turn_item_id
    from shared.client import LogClient
    from shared.config import Settings
    from shared.messages import AppendItem

    client = await LogClient.connect(log_url, settings=Settings(nats_url=log_url))
    watcher = ReplyWatcher(client)
    try:
        await watcher.start()
        for role, fails in (("fail", True), ("reply", False)):
            sid = f"tb-failed-{role}"
            turn = asyncio.create_task(watcher.turn(sid, "hello", to="L1Billing", within=10.0))
            for _ in range(500):  # until the user's message is in the log
                if watcher.sent:
                    break
                await asyncio.sleep(0.01)
            (key,) = watcher.sent
            data = {"role": "system" if fails else "assistant", "content": "L1Billing failed to answer"}
            await client.append(sid, [AppendItem(agent="system" if fails else "L1Billing", data=data,
                                                 item_id=turn_item_id(key, "L1Billing", 1, role))])
            if fails:
                with pytest.raises(TurnFailed):
                    await turn
                assert key not in watcher.totals  # no time for it in the figures
            else:
                assert await turn > 0 and key in watcher.totals
            watcher.sent.clear()
    finally:
        await watcher.stop()
        await client.close()


# In the alternating phases a turn whose user message could not be sent recorded, as the
# turn of its kind, the last turn sent: the previous one, of the other kind. That turn was
# then counted doubled (and timed in the breakdown) for both kinds
async def test_alternating_turn_whose_send_fails_records_no_turn_of_the_other_kind(log_url: str) -> None:
    import asyncio

    from services.bench.turns import _alternating
    from services.bench.turns_watch import ReplyWatcher
    from services.worker.turn_ids import turn_item_id
    from shared.client import LogClient
    from shared.config import Settings
    from shared.messages import AppendItem

    client = await LogClient.connect(log_url, settings=Settings(nats_url=log_url))
    watcher = ReplyWatcher(client)

    async def answered_twice(i: int) -> float:  # a plain turn whose reply is committed twice
        sid = f"tb-alt-twice-{i}"
        turn = asyncio.create_task(watcher.turn(sid, "hello", to="L1Billing", within=10.0))
        for _ in range(500):  # until the user's message is in the log
            if watcher.sent:
                break
            await asyncio.sleep(0.01)
        key = next(reversed(watcher.sent))
        data = {"role": "assistant", "content": "answered"}
        await client.append(sid, [AppendItem(agent="L1Billing", data=data,
                                             item_id=turn_item_id(key, "L1Billing", step, "reply"))
                                  for step in (1, 2)])
        return await turn

    def unsendable(i: int) -> object:  # refused by the log service: not a session id
        return watcher.turn(f"not a session id {i}", "hello")

    try:
        await watcher.start()
        plain, handoff = await _alternating(watcher, None, 3, 0.01, answered_twice, unsendable)
    finally:
        await watcher.stop()
        await client.close()
    assert (plain.ops, plain.errors, plain.doubled) == (1, 0, 1), (plain.ops, plain.errors, plain.doubled)
    assert (handoff.ops, handoff.errors, handoff.doubled) == (0, 1, 0), (handoff.errors, handoff.doubled)


def _no_constant(name: str) -> object:
    raise AssertionError(f"not JSON: {name}")


async def _nobody_answers(log_url: str, prefix: str, sessions: int, duration: float) -> Any:
    """A closed-loop phase of plain turns (``sessions`` at once, for ``duration`` s) with
    no worker running: every turn waits 0.3 s and is lost."""
    from services.bench.turns import PLAIN, _phase
    from services.bench.turns_watch import ReplyWatcher
    from shared.client import LogClient
    from shared.config import Settings

    client = await LogClient.connect(log_url, settings=Settings(nats_url=log_url))
    watcher = ReplyWatcher(client)
    try:
        await watcher.start()

        def op(i: int) -> object:
            return watcher.turn(f"{prefix}-{i}", PLAIN, to="L1Billing", within=0.3)

        return await _phase("plain turns, nobody answers", watcher, None, client, sessions, duration, op)
    finally:
        await watcher.stop()
        await client.close()


# A turn never answered was counted twice: lost (its wait timed out) and, since the
# closed loop counts every exception of an op, an error too; the table read
# "lost 3, errors 3" for three turns, where the alternating phases (and the docs:
# errors are turns whose send failed or that ended in a failure) counted it lost only
async def test_an_unanswered_turn_is_lost_not_also_an_error(log_url: str) -> None:
    phase = await _nobody_answers(log_url, "tb-unanswered", 2, 0.5)
    assert phase.ops == 0 and phase.lost >= 2, (phase.ops, phase.lost, phase.errors)
    assert phase.errors == 0, (phase.lost, phase.errors)


# In the open-loop phase a turn still waiting (for its reply, or for a free session to be
# sent to) when the loop's drain ended was cancelled and counted as an error, not as lost:
# an overloaded run read "errors" where turns had gone unanswered
async def test_open_loop_turns_cancelled_at_the_drain_are_lost_not_errors(
    log_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from services.bench import measure
    from services.bench.turns import PLAIN, _phase
    from services.bench.turns_watch import ReplyWatcher
    from shared.client import LogClient
    from shared.config import Settings

    monkeypatch.setattr(measure, "OPEN_LOOP_DRAIN_S", 0.5)
    client = await LogClient.connect(log_url, settings=Settings(nats_url=log_url))
    watcher = ReplyWatcher(client)
    free: asyncio.Queue[str] = asyncio.Queue()
    free.put_nowait("tb-drain-0")  # one session: the next turns wait for it, as in the bench

    async def offered(i: int) -> float:
        sid = await free.get()
        try:
            return await watcher.turn(sid, PLAIN, to="L1Billing", within=10.0)  # nobody answers
        finally:
            free.put_nowait(sid)

    try:
        await watcher.start()
        phase = await _phase("offered, nobody answers", watcher, None, client, 1, 0.3, offered, rate=10.0)
    finally:
        await watcher.stop()
        await client.close()
    assert (phase.ops, phase.lost, phase.errors) == (0, 3, 0), (phase.ops, phase.lost, phase.errors)


# Every bench exited 0 whatever it saw: a --turns run whose phases lost turns (or a
# leader-kill run that lost acknowledged items) looked like a success to a script; the
# README's exit code 1 is "failed", and a bench that lost or doubled items failed
async def test_a_turn_bench_that_lost_turns_exits_1_naming_them(
    log_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.bench import turns
    from services.bench.measure import losses_exit_code

    phase = await _nobody_answers(log_url, "tb-exit", 1, 0.2)
    assert phase.lost >= 1
    capsys.readouterr()
    assert turns.exit_code([phase]) == 1
    assert f"convlog bench: turns lost {phase.lost}" in capsys.readouterr().err
    phase.lost = 0
    assert turns.exit_code([phase]) == 0 and capsys.readouterr().err == ""
    # the leader-kill and --sdk benches' counts, as cmd_bench passes them
    assert losses_exit_code({"lost": 0, "duplicated": 2, "moved": 0, "sessions_not_verified": 1}) == 1
    assert capsys.readouterr().err == "convlog bench: duplicated 2, sessions not verified 1\n"
    assert losses_exit_code({"lost": 0, "doubled": 0, "out_of_order": 0, "torn": 0}) == 0


# Deliveries per turn divided every notice the agents' consumers delivered by the
# turns answered only: the notices of turns that failed (or were lost) were in the
# numerator, not the denominator, so a phase where every other turn failed reported
# 2.00 deliveries a plain turn (issue 13's limit for a handoff) where each had one
async def test_deliveries_per_turn_count_every_turn_sent_not_only_the_answered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.bench.stack import wait_service
    from services.bench.turns import PLAIN, _phase
    from services.bench.turns_watch import ReplyWatcher
    from shared.client import LogClient
    from shared.config import Settings
    from tests.support.fake_openai import FakeOpenAI, error, text

    spec = tmp_path / "agents.toml"
    spec.write_text(bench_spec(3))
    calls = [0]

    def every_other_fails(_request: object) -> object:
        calls[0] += 1
        return error(400, "refused") if calls[0] % 2 == 0 else text("ok")

    with FakeOpenAI() as fake:
        fake.responder(every_other_fails)
        monkeypatch.setenv("OPENAI_API_KEY", "test")
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        with local_stack(workers=[["L1Billing", "--agents", str(spec)]]) as url:
            client = await LogClient.connect(url, settings=Settings(nats_url=url))
            watcher = ReplyWatcher(client)
            try:
                await wait_service(client)
                await watcher.start()
                for k in range(12):  # until the worker answers (a turn sent before it was ready is not)
                    try:
                        await watcher.turn(f"tb-deliv-warmup-{k}", PLAIN, to="L1Billing", within=5.0)
                        break
                    except TimeoutError:
                        pass
                calls[0] = 0  # the phase's turns: answered, failed, answered, ...

                def op(i: int) -> object:
                    return watcher.turn(f"tb-deliv-{i}", PLAIN, to="L1Billing", within=10.0)

                phase = await _phase("plain turns, every other fails", watcher, None, client, 1, 1.5, op)
            finally:
                await watcher.stop()
                await client.close()
    assert phase.ops >= 2 and phase.errors >= 2 and phase.lost == 0, (phase.ops, phase.errors, phase.lost)
    assert phase.deliveries_per_turn == 1.0, (phase.deliveries_per_turn, phase.ops, phase.errors)
