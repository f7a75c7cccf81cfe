"""The log service's head witness: a stop that lands while a flush is storing
heads still leaves the last commits witnessed (the KV here is a stand-in whose
put takes a while, so the stop reliably lands mid-flush)."""

from __future__ import annotations

import asyncio

from services.log.heads import HeadWitness
from services.log.store.base import Committed
from shared.signing import Signer
from shared.subjects import Subjects


class _SlowKV:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.started = asyncio.Event()

    async def get(self, key: str) -> object:  # (the witness compares before it writes)
        import nats.js.errors

        raise nats.js.errors.KeyNotFoundError()

    async def create(self, key: str, value: bytes) -> int:
        return await self.put(key, value)

    async def put(self, key: str, value: bytes) -> int:
        self.started.set()
        await asyncio.sleep(0.05)  # a KV put in flight
        self.values[key] = value
        return 1


async def test_a_stop_during_a_flush_still_signs_the_last_heads() -> None:
    signer, _ = Signer.generate()
    witness = HeadWitness(None, Subjects("convlog"), signer, interval=0.01)  # type: ignore[arg-type]
    kv = witness._kv = _SlowKV()
    witness._task = asyncio.create_task(witness._loop())
    env = b'{"session_id":"s1","item_order":7,"hash":"' + b"a" * 64 + b'"}'
    witness.on_commit([Committed(position=1, session_id="s1", item_order=7, envelope=env)])
    await asyncio.wait_for(kv.started.wait(), 5)  # the loop's flush is storing s1's head
    await witness.stop()
    assert b'"item_order":7' in kv.values.get("s1", b""), "s1's head at item_order 7 was never witnessed"
