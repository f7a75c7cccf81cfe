"""The session copy's incremental fold equals ``shared.history.visible`` on the same log.

Random valid logs (what the log service accepts: a retract targets an
earlier item, hidden or not) of items, retracts and clears, applied in a shuffled arrival order (a
gap waits until it is filled), with and without a window smaller than the
session: after every arrival the copy answers the visible history of the
contiguous prefix it holds, and nothing else.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from shared.history import visible
from shared.messages import Envelope
from shared.session_copy import SessionCopy


def _log(rng: random.Random, n: int) -> list[Envelope]:
    envs: list[Envelope] = []
    items: list[int] = []
    for order in range(1, n + 1):
        r = rng.random()
        if r < 0.65 or not items:
            kind, data = "item", {"role": "user", "content": f"m{order}"}
            items.append(order)
        elif r < 0.93:
            kind, data = "retract", {"target": rng.choice(items)}
        else:
            kind, data = "clear", {}
        envs.append(Envelope(session_id="s", item_order=order, item_id=f"i{order}", agent="a",
                             kind=kind, data=data, created_at="2026-01-01T00:00:00.000000Z",
                             hash="0" * 64))
    return envs


def _texts(items: list[dict[str, Any]] | None) -> list[str] | None:
    return None if items is None else [i["content"] for i in items]


@pytest.mark.parametrize("seed", range(40))
async def test_fold_matches_visible_history(seed: int) -> None:
    rng = random.Random(seed)
    envs = _log(rng, rng.randint(1, 120))
    window = rng.choice([None, 5, 20])
    copy = SessionCopy(None, "s", max_items=window)  # type: ignore[arg-type]  # no I/O here
    copy.complete = True  # as a seed from order 1 would leave it
    arrivals = list(envs)
    for i in range(len(arrivals) - 1):  # local shuffles: what network reordering looks like
        if rng.random() < 0.3:
            arrivals[i], arrivals[i + 1] = arrivals[i + 1], arrivals[i]
    for env in arrivals:
        copy.apply(env.item_order, env.kind, msgspec.json.encode(env.data))
        expected = [e.data["content"] for e in visible(envs[: copy.last])]
        if copy.complete:
            assert _texts(copy.items(None)) == expected
        held = copy.info()["items"]
        if held:
            assert _texts(copy.items(held)) == expected[len(expected) - held:]
        if held < len(expected):  # older ones exist and are not held: the copy says so
            assert copy.items(len(expected)) is None
    assert copy.last == len(envs)


async def test_the_window_keeps_within_its_byte_limit() -> None:
    copy = SessionCopy(None, "s", max_items=1000, max_bytes=10_000)  # type: ignore[arg-type]
    copy.complete = True
    for order in range(1, 201):
        copy.apply(order, "item", msgspec.json.encode({"content": f"{order:04d}" + "x" * 190}))
    held = copy.info()["items"]
    assert 0 < held < 200 and not copy.complete
    assert sum(len(d) for d in copy._data) <= 10_000
    assert _texts(copy.items(held)) == [f"{o:04d}" + "x" * 190 for o in range(201 - held, 201)]
