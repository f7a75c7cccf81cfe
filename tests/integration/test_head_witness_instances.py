"""Two log-service instances on the JetStream store (convlog-log@1, @2) each sign
heads for their own commits into the same ``<prefix>_heads`` key: an older head
never replaces a newer one (compare-and-set, forward only). With a plain put, one
instance flushing an older head after the other stored a newer one moved the
witness head back, leaving the items after it covered by no witness head."""

from __future__ import annotations

import nats

from services.log.heads import HeadWitness, read_witness_head
from services.log.store.base import Committed
from shared.signing import Signer
from shared.subjects import Subjects
from tests.support.natsd import NatsServer


def _commit(order: int) -> Committed:
    env = b'{"session_id":"s1","item_order":%d,"hash":"%s"}' % (order, b"a" * 64)
    return Committed(position=order, session_id="s1", item_order=order, envelope=env)


async def test_an_older_head_never_replaces_a_newer_witness_head(nats_server: NatsServer) -> None:
    signer, _ = Signer.generate()
    subjects = Subjects("convlog")
    nc_a = await nats.connect(nats_server.url)
    nc_b = await nats.connect(nats_server.url)
    a = HeadWitness(nc_a, subjects, signer, interval=3600)  # flushed by hand below
    b = HeadWitness(nc_b, subjects, signer, interval=3600)
    try:
        await a.start()
        await b.start()
        a.on_commit([_commit(5)])  # instance A commits #5 of s1 ...
        b.on_commit([_commit(6)])  # ... instance B #6 right after
        await b.flush()  # B's round comes first: head #6
        await a.flush()  # A's round: head #5 over it
        head = await read_witness_head(nc_a, subjects, "s1")
        assert head is not None
        assert head.item_order == 6, f"the witness head went back to #{head.item_order}"
    finally:
        await a.stop()
        await b.stop()
        await nc_a.close()
        await nc_b.close()
