"""``convlog bench --turns``: how the workers' per-part timings become the breakdown."""

from __future__ import annotations

import pytest

from services.bench.turns_watch import Timings


def _part(agent: str, **phases: float) -> dict[str, object]:
    return {"turn": "t", "agent": agent, **phases}


def test_a_plain_turn_sums_its_phases_and_rest_is_what_the_total_leaves() -> None:
    timings = Timings(client=None)  # type: ignore[arg-type]  # breakdown() reads no connection
    timings.parts["t"] = [_part("L1Billing", delivery=0.001, history_read=0.0002, model=0.001,
                                reply_append=0.0015, part=0.003)]

    got = timings.breakdown({"t": (0.0012, 0.006)})

    assert got["model"] == [0.001] and got["routing"] == [0.0]
    # rest: 6.0 - (1.2 append + 1.0 + 0.2 + 1.0 + 1.5 in the phases) ms
    assert got["rest"] == [pytest.approx(0.0011)]
    assert not any("." in k for k in got)  # one part: nothing per part


def test_a_handoff_turn_shows_each_part_by_agent_and_rest_counts_phases_not_overlapping_parts() -> None:
    timings = Timings(client=None)  # type: ignore[arg-type]
    # The handing-off part's "part" (5 ms) runs past the next part's start (its announcement
    # and ack): summing "part"s would leave no rest; the phases do not overlap.
    timings.parts["t"] = [
        _part("L1Billing", delivery=0.0009, model=0.001, reply_append=0.0013, part=0.0028),
        _part("Triage", delivery=0.0006, routing=0.0001, model=0.001, reply_append=0.0015, part=0.005),
    ]

    got = timings.breakdown({"t": (0.0014, 0.009)})

    assert got["model"] == [pytest.approx(0.002)]
    assert got["delivery"] == [pytest.approx(0.0015)]
    assert got["rest"] == [pytest.approx(0.009 - 0.0014 - 0.0015 - 0.0001 - 0.002 - 0.0028)]
    assert got["Triage.reply_append"] == [0.0015] and got["L1Billing.reply_append"] == [0.0013]
    assert got["Triage.part"] == [0.005] and got["L1Billing.delivery"] == [0.0009]


def test_turns_without_timings_are_left_out() -> None:
    timings = Timings(client=None)  # type: ignore[arg-type]
    assert timings.breakdown({"never-recorded": (0.001, 0.004)}) == {}


def test_the_alternating_phases_give_their_own_ratio_per_agent_count() -> None:
    from services.bench.turns import Phase, figures

    def phase(name: str, *ms: float) -> Phase:
        return Phase(name, len(ms), 1.0, [m / 1000 for m in ms])

    fig = figures([
        phase("append round trip (baseline)", 1.0),
        phase("plain turns, 1 session, 20 agents", 4.0),
        phase("handoff turns, 1 at a time, 20 agents", 8.0),  # measured at a busier moment
        phase("plain turns, alternating, 1 at a time, 20 agents", 4.0, 4.2, 4.4),
        phase("handoff turns, alternating, 1 at a time, 20 agents", 6.0, 6.3, 6.6),
        phase("plain turns, alternating, 1 at a time, 3 agents", 5.0),
        phase("handoff turns, alternating, 1 at a time, 3 agents", 7.0),
    ])

    assert fig["handoff_over_plain_p50"] == pytest.approx(2.0)
    assert fig["handoff_over_plain_p50_alternating"] == {"20": pytest.approx(1.5), "3": pytest.approx(1.4)}


def test_the_text_report_shows_each_phases_errors() -> None:
    # The text report dropped the errors column (only --json had it): turns that
    # failed or could not be sent vanished from the figures
    import argparse
    import re

    from services.bench.turns import Phase, figures, report

    phases = [Phase("append round trip (baseline)", 1, 1.0, [0.001]),
              Phase("plain turns, 1 session, 20 agents", 2, 1.0, [0.004, 0.004], errors=7)]
    phases[1].lost = 3
    text = report(figures(phases), argparse.Namespace(duration=1.0))
    assert re.search(r"\berrors\b", text.splitlines()[1]), text
    row = next(line for line in text.splitlines() if line.startswith("plain turns, 1 session"))
    assert re.search(r"\s3\s+0\s+7\s", row), row  # lost, doubled, errors
