"""``at_least``: how long a log read waits for the connection's floor.

An order the log itself showed (``held``: acks, reads) is waited for until the
deadline (a replica trailing the leader catches up); an order only the copy's
deliveries showed, at most ``DELIVERED_WAIT_S`` (a chain-valid forged delivery
is one the log never reaches).
"""

from __future__ import annotations

import time

import pytest

from shared import session_pool
from shared.errors import UnavailableError
from shared.session_pool import at_least


def _log(answers: list[int]) -> tuple[list[int], object]:
    """A read answering ``answers`` in turn, then the last one for good."""
    asked: list[int] = []

    async def read() -> int:
        asked.append(1)
        return answers[min(len(asked), len(answers)) - 1]

    return asked, read


async def test_a_delivered_order_is_waited_for_while_the_log_catches_up() -> None:
    asked, read = _log([5, 5, 5, 6])
    assert await at_least(6, read, lambda k: k, deadline=5, what="r", held=5) == 6
    assert len(asked) == 4


async def test_a_delivered_order_the_log_never_reaches_is_given_up_after_the_wait() -> None:
    asked, read = _log([5])
    started = time.monotonic()
    assert await at_least(6, read, lambda k: k, deadline=30, what="r", held=5) == 5
    took = time.monotonic() - started
    assert session_pool.DELIVERED_WAIT_S / 2 <= took <= session_pool.DELIVERED_WAIT_S + 0.5, took


async def test_an_order_the_log_showed_is_waited_for_until_the_deadline() -> None:
    asked, read = _log([4])
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="behind order 6"):
        await at_least(6, read, lambda k: k, deadline=1.0, what="r", held=5)
    assert time.monotonic() - started >= 0.5
