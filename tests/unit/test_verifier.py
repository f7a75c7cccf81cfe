"""The log service's verifier thread: outcomes come back on the loop, in the
order the appends were submitted, good and bad signatures alike -- and a
request checked on the loop (batch signatures) waits for the ones before it."""

from __future__ import annotations

import asyncio

import msgspec

from services.log.authorize import Authorizer
from services.log.verifier import Verifier
from shared.errors import ConvlogError, ForbiddenError
from shared.messages import AppendItem, AppendRequest
from shared.signing import KeyEntry, Keyring, Signer, sign_item


async def test_outcomes_arrive_in_submission_order_on_the_loop() -> None:
    signer, _ = Signer.generate()
    ring = Keyring([KeyEntry(key_id=signer.key_id, role="agent", agent="A", created_at="2026-01-01T00:00:00Z")])
    auth = Authorizer(ring, require=True)
    loop = asyncio.get_running_loop()
    verifier = Verifier(auth, loop, max_batch=7)
    outcomes: list[tuple[int, ConvlogError | None]] = []
    done = asyncio.Event()
    n = 60

    def record(i: int):  # noqa: ANN202
        def cb(err: ConvlogError | None) -> None:
            assert asyncio.get_running_loop() is loop  # delivered on the loop, not the thread
            outcomes.append((i, err))
            if len(outcomes) == n:
                done.set()
        return cb

    try:
        for i in range(n):
            item = sign_item(signer, "s", AppendItem(agent="A", data={"i": i}, item_id=f"id-{i}"))
            if i % 5 == 0:  # every fifth one edited after signing
                item = msgspec.structs.replace(item, data={"i": -1})
            req = AppendRequest(items=[item])
            assert auth.precheck("s", req)  # the rules pass; the cryptography decides
            verifier.submit("s", req, record(i))
        await asyncio.wait_for(done.wait(), 20)
    finally:
        await asyncio.to_thread(verifier.close)
    assert [i for i, _ in outcomes] == list(range(n))
    assert [i for i, err in outcomes if err is not None] == list(range(0, n, 5))
    assert all(isinstance(err, ForbiddenError) for _, err in outcomes if err is not None)


async def test_a_request_checked_on_the_loop_waits_for_the_ones_before_it() -> None:
    signer, _ = Signer.generate()
    ring = Keyring([KeyEntry(key_id=signer.key_id, role="agent", agent="A", created_at="2026-01-01T00:00:00Z")])
    verifier = Verifier(Authorizer(ring), asyncio.get_running_loop(), threads=2)
    order: list[str] = []
    finished = asyncio.Event()

    def done(name: str, err: ConvlogError | None) -> None:
        order.append(f"{name}:{'ok' if err is None else err.code}")
        if len(order) == 4:
            finished.set()

    try:
        # A: 200 plain signatures (milliseconds of Ed25519 on a thread); C: one bad signature.
        slow = AppendRequest(items=[sign_item(signer, "s", AppendItem(agent="A", data={"i": i}, item_id=f"a{i}"))
                                    for i in range(200)])
        bad = AppendRequest(items=[sign_item(signer, "other", AppendItem(agent="A", data={}, item_id="c"))])
        verifier.submit("s", slow, lambda e: done("A", e))
        assert verifier.busy
        verifier.submit_verified(lambda e: done("B", e))  # checked on the loop meanwhile
        verifier.submit("s", bad, lambda e: done("C", e))
        verifier.submit_verified(lambda e: done("D", e))
        assert order == []  # B may not overtake A
        await asyncio.wait_for(finished.wait(), 10)
        assert order == ["A:ok", "B:ok", "C:forbidden", "D:ok"]
        assert not verifier.busy
        # With nothing pending, a request checked on the loop is released at once.
        verifier.submit_verified(lambda e: order.append("E"))
        assert order[-1] == "E"
    finally:
        await asyncio.to_thread(verifier.close)
