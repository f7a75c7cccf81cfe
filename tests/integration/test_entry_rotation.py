"""A session's entry agent, signed by the gateway (``to_sig``), still counts after
``convlog keys rotate gateway``: a rotated key's earlier signatures verify, so the
session keeps its entry agent -- as long as the message the proof names is in the
log, signed by that key (a fresh signature by the retired key does not count)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats

from services.cli.keys_cmds import make_keys
from services.cli.main import main
from services.log.service import LogService
from services.worker.routing import Routing
from services.worker.spec import load_spec
from shared.client import LogClient
from shared.config import load_settings
from shared.messages import AppendItem
from shared.routing import open_routing_bucket
from shared.signing import Keyring, Signer, route_signing_input
from tests.support.natsd import NatsServer
from tests.support.workerstack import SEED_SPEC


async def test_an_entry_signed_before_a_gateway_rotation_still_counts(nats_server: NatsServer, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, ["Triage", "L1Billing", "L1Technical", "L2Support"])
    ring_path = keys / "keyring.json"
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"),
                              "keyring": str(ring_path), "require_signatures": True}, {})
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(nats_server.url)
    try:
        spec = load_spec(SEED_SPEC)
        assert spec.entry == "Triage"
        old = Signer.load(keys / "gateway.nk")
        gateway = LogClient(nc, timeout=5, deadline=20, signer=old)
        await gateway.send("rot-1", "I was charged twice", to="L1Billing")
        kv = await open_routing_bucket(nc, settings.subjects)
        value = json.loads((await kv.get("rot-1")).value)
        assert value["entry"] == "L1Billing" and value["entry_proof"]["key_id"] == old.key_id

        def routing(ring: Keyring) -> Routing:
            return Routing(kv, gateway, spec, keyring=ring, require=True)

        assert await routing(Keyring.load(ring_path)).active_agent("rot-1", 2) == "L1Billing"
        assert await asyncio.to_thread(main, ["keys", "rotate", "gateway", "--dir", str(keys)]) == 0
        rotated = Keyring.load(ring_path)
        assert rotated.get(old.key_id).retired_at is not None  # type: ignore[union-attr]
        # The message and its `to` were signed before the rotation: L1Billing stays the entry.
        assert await routing(rotated).active_agent("rot-1", 2) == "L1Billing"

        # A proof the retired key signs now, for a message the log does not hold, counts for nothing.
        forged = {**value, "active": "L2Support", "entry": "L2Support",
                  "entry_proof": {"item_id": "never-sent", "key_id": old.key_id,
                                  "to_sig": old.sign(route_signing_input("rot-1", "never-sent", "L2Support"))}}
        await kv.put("rot-1", json.dumps(forged).encode())
        assert await routing(rotated).active_agent("rot-1", 2) == "Triage"
    finally:
        await nc.close()
        await service.shutdown()


async def test_an_entry_proof_behind_large_items_is_found(nats_server: NatsServer, tmp_path: Path) -> None:
    # The message a proof names may follow other items (an append racing the first
    # message); a read page stops at the reply limit, so large items ahead of it cut the
    # first page short of the proof's window: it was not looked for past that page, and
    # the session moved back to the spec's entry agent after a gateway rotation.
    keys = tmp_path / "keys"
    make_keys(keys, ["Triage", "L1Billing", "L1Technical", "L2Support"])
    ring_path = keys / "keyring.json"
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db"),
                              "keyring": str(ring_path)}, {})
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(nats_server.url)
    try:
        spec = load_spec(SEED_SPEC)
        old = Signer.load(keys / "gateway.nk")
        gateway = LogClient(nc, timeout=5, deadline=20, signer=old)
        writer = LogClient(nc, timeout=5, deadline=20)
        big = {"type": "message", "role": "assistant", "content": "x" * 200_000}
        for _ in range(6):  # over 1 MiB together: the first page holds some of them only
            await writer.append("rot-big", [AppendItem(agent="L1Technical", data=big)])
        ack = await gateway.send("rot-big", "I was charged twice", to="L1Billing")
        item = ack.items[0]
        assert item.item_order == 7
        kv = await open_routing_bucket(nc, settings.subjects)
        proof = {"item_id": item.item_id, "key_id": old.key_id,
                 "to_sig": old.sign(route_signing_input("rot-big", item.item_id, "L1Billing"))}
        await kv.put("rot-big", json.dumps({"active": "L1Billing", "order": 0, "entry": "L1Billing",
                                            "entry_proof": proof}).encode())
        assert await asyncio.to_thread(main, ["keys", "rotate", "gateway", "--dir", str(keys)]) == 0
        routing = Routing(kv, gateway, spec, keyring=Keyring.load(ring_path), require=False)
        assert (await gateway.read("rot-big", after=0, limit=8, raw=True)).more  # the page is cut short
        assert await routing.active_agent("rot-big", 8) == "L1Billing"
    finally:
        await nc.close()
        await service.shutdown()
