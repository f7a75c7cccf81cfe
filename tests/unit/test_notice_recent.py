"""What a turn notice carries: the contiguous run of a session's last committed envelopes."""

from __future__ import annotations

from services.log.recent import TAIL, Recent


def _env(order: int, size: int = 10) -> bytes:
    return f'{{"o":{order}}}'.encode().ljust(size)


def _orders(carried: tuple[object, ...]) -> list[int]:
    return [int(bytes(r).decode().strip()[5:-1]) for r in carried]  # type: ignore[call-overload]


def test_a_young_session_is_carried_whole_up_to_the_trigger() -> None:
    r = Recent()
    for o in range(1, 6):
        r.add("s", o, _env(o))
    assert _orders(r.carry("s", 5)) == [1, 2, 3, 4, 5]
    assert _orders(r.carry("s", 3)) == [1, 2, 3]  # items after the trigger are never carried
    assert r.carry("s", 6) == ()  # not committed (here) yet
    assert r.carry("other", 1) == ()


def test_an_older_session_carries_its_last_items_only() -> None:
    r = Recent(items=32)
    for o in range(1, 41):
        r.add("s", o, _env(o))
    assert _orders(r.carry("s", 40)) == list(range(41 - TAIL, 41))
    assert r.carry("s", 8) == ()  # dropped from the run: the worker reads


def test_a_gap_starts_the_run_again() -> None:
    r = Recent()
    for o in (1, 2, 3, 7, 8):  # 4-6 committed by another log-service instance
        r.add("s", o, _env(o))
    assert _orders(r.carry("s", 8)) == [7, 8]
    assert r.carry("s", 3) == ()


def test_items_bytes_and_sessions_are_bounded() -> None:
    r = Recent(sessions=2, items=4, max_bytes=35)
    for o in range(1, 7):
        r.add("a", o, _env(o, 10))
    assert _orders(r.carry("a", 6)) == [4, 5, 6]  # 3 x 10 bytes fit in 35, 4 do not
    r.add("b", 1, _env(1))
    r.add("c", 1, _env(1))
    assert r.carry("a", 6) == ()  # the least recently committed session went
    assert _orders(r.carry("c", 1)) == [1]
