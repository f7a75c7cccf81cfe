"""A running log service and worker follow their keyring file: `convlog keys rotate`
takes effect without a restart (the retired key's new signatures refused, the new
key's accepted).  They read it once at start before, so a rotated-out (stolen) key
kept working, and the new key was refused, until every process was restarted."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path

import nats
import pytest

from services.cli.keys_cmds import make_keys
from services.cli.main import main
from services.log.service import LogService
from services.worker.trust import EnvelopeGate
from shared.client import LogClient
from shared.config import load_settings
from shared.errors import ForbiddenError
from shared.messages import AppendItem
from shared.signing import Keyring, LiveKeyring, Signer
from tests.support.natsd import NatsServer
from tests.support.procs import run_cli

AGENTS = ["Triage", "L1Billing"]
SAY = {"type": "message", "role": "assistant", "content": "hello"}


async def _signed_service(nats_server: NatsServer, tmp_path: Path, *, log_key: bool = False) -> tuple[Path, LogService]:
    """Keys for ``AGENTS`` in ``tmp_path/keys``, and a started log service that requires
    signatures under their keyring (``log_key``: it signs heads too, every 0.1 s)."""
    keys = tmp_path / "keys"
    make_keys(keys, AGENTS)
    options: dict[str, object] = {"nats_url": nats_server.url, "db": str(tmp_path / "log.db"),
                                  "keyring": str(keys / "keyring.json"), "require_signatures": True}
    env: dict[str, str] = {}
    if log_key:
        options["head_interval"] = 0.1
        env["CONVLOG_SIGNING_KEY"] = str(keys / "log.nk")
    service = LogService(load_settings(options, env))
    await service.start()
    return keys, service


async def test_a_rotated_key_is_refused_and_the_new_one_accepted_without_a_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    keys, service = await _signed_service(nats_server, tmp_path)
    ring = keys / "keyring.json"
    nc = await nats.connect(nats_server.url)
    old = Signer.load(keys / "Triage.nk")
    try:
        before = LogClient(nc, timeout=5, deadline=20, signer=old)
        await before.append("rot", [AppendItem(agent="Triage", data=SAY)])
        gate = EnvelopeGate.from_settings(before, load_settings({"keyring": str(ring)}, {}), "L1Billing")
        assert await asyncio.to_thread(main, ["keys", "rotate", "Triage", "--dir", str(keys)]) == 0
        new = Signer.load(keys / "Triage.nk")
        assert new.key_id != old.key_id
        after = LogClient(nc, timeout=5, deadline=20, signer=new)

        await asyncio.sleep(1.2)  # the file is looked at once a second at most
        with pytest.raises(ForbiddenError, match="retired"):
            await before.append("rot", [AppendItem(agent="Triage", data=SAY)])
        await after.append("rot", [AppendItem(agent="Triage", data=SAY)])
        items = await after.items("rot")
        assert [e.key_id for e in items] == [old.key_id, new.key_id]
        # A worker's gate takes the new key's items too (it refused an unknown key).
        assert gate.signature_refusal(items[1]) is None
        assert gate.signature_refusal(items[0]) is None  # signed before the rotation
    finally:
        await nc.close()
        await service.shutdown()


def test_a_keyring_file_that_breaks_keeps_the_keys_read_before(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, AGENTS)
    ring_path = keys / "keyring.json"
    live = LiveKeyring(ring_path, every=0.0)
    first = {e.key_id for e in live.entries}
    ring_path.write_text("not a keyring")
    assert live.get(next(iter(first))) is not None  # kept
    assert {e.key_id for e in live.entries} == first
    # A good file again (another mtime): read.
    fresh = tmp_path / "other"
    make_keys(fresh, AGENTS)
    os.replace(fresh / "keyring.json", ring_path)
    assert live.get(next(iter(first))) is None
    assert {e.key_id for e in live.entries} == {e.key_id for e in Keyring.load(ring_path).entries}


async def test_a_rotated_log_key_is_followed_so_heads_signed_after_it_still_verify(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`convlog keys rotate log` retires the running service's own key: every head it
    signed afterwards (the witness heads, the head of each export) was signed by the
    retired key, so `convlog replay --verify --keyring` failed every session written
    to after the rotation ('head signed at ... by a key retired at ...') until the
    service was restarted."""
    keys, service = await _signed_service(nats_server, tmp_path, log_key=True)
    ring = keys / "keyring.json"
    nc = await nats.connect(nats_server.url)
    try:
        triage = LogClient(nc, timeout=5, deadline=20, signer=Signer.load(keys / "Triage.nk"))
        await triage.append("lr", [AppendItem(agent="Triage", data=SAY)])
        old = Signer.load(keys / "log.nk").key_id
        assert await asyncio.to_thread(main, ["keys", "rotate", "log", "--dir", str(keys)]) == 0
        new = Signer.load(keys / "log.nk").key_id
        await asyncio.sleep(1.2)  # the file is looked at once a second at most
        await triage.append("lr", [AppendItem(agent="Triage", data=SAY)])
        await asyncio.sleep(0.5)  # a witness head of order 2
        head = await triage.signed_head("lr")
        assert head is not None and head.item_order == 2 and head.key_id == new != old
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
        code, _, err = await run_cli("replay", "lr", "--verify", "--keyring", str(ring),
                                     "--nats-url", nats_server.url, env=env, timeout=60)
        assert code == 0, err
        assert "signed head at item_order 2" in err
    finally:
        await nc.close()
        await service.shutdown()


async def test_a_client_follows_its_key_file_across_a_rotation(nats_server: NatsServer, tmp_path: Path) -> None:
    """`convlog keys rotate Triage` retires the key a running worker signs with and
    writes the new one to its CONVLOG_SIGNING_KEY file, but LogClient had read the
    file once: every append of the worker was refused ('retired') until it was
    restarted, so the agent's turns failed.  The client now follows its key file."""
    keys, service = await _signed_service(nats_server, tmp_path)
    client = await LogClient.connect(settings=load_settings(
        {"nats_url": nats_server.url}, {"CONVLOG_SIGNING_KEY": str(keys / "Triage.nk")}))
    try:
        await client.append("kf", [AppendItem(agent="Triage", data=SAY)])
        old = Signer.load(keys / "Triage.nk").key_id
        assert await asyncio.to_thread(main, ["keys", "rotate", "Triage", "--dir", str(keys)]) == 0
        new = Signer.load(keys / "Triage.nk").key_id
        await asyncio.sleep(1.2)  # the files are looked at once a second at most
        await client.append("kf", [AppendItem(agent="Triage", data=SAY), AppendItem(agent="Triage", data=SAY)])
    finally:
        items = await client.items("kf", raw=True)
        await client.close()
        await service.shutdown()
    assert [e.key_id for e in items] == [old, new, new] != [old] * 3


async def test_what_the_log_took_during_a_rotation_still_verifies(nats_server: NatsServer, tmp_path: Path) -> None:
    """`convlog keys rotate` retired the old key at the moment of the command, while a
    running log service reads the keyring (and its own key file) again only within a
    second: an item the service took from the old key meanwhile, and the heads it
    signed with its old key meanwhile, were later than the retirement, so
    `convlog replay --verify --keyring` called an intact log a bad signature."""
    keys, service = await _signed_service(nats_server, tmp_path, log_key=True)
    ring = keys / "keyring.json"
    nc = await nats.connect(nats_server.url)
    try:
        old = LogClient(nc, timeout=5, deadline=20, signer=Signer.load(keys / "Triage.nk"))
        await old.append("mid", [AppendItem(agent="Triage", data=SAY)])  # the keyring was just read
        for who in ("Triage", "log"):
            assert await asyncio.to_thread(main, ["keys", "rotate", who, "--dir", str(keys)]) == 0
        await old.append("mid", [AppendItem(agent="Triage", data=SAY)])  # taken: not read again yet
        await asyncio.sleep(0.5)  # a witness head of order 2
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
        code, _, err = await run_cli("replay", "mid", "--verify", "--keyring", str(ring),
                                     "--nats-url", nats_server.url, env=env, timeout=60)
        assert code == 0, err
        assert "2 signatures valid" in err and "signed head at item_order 2" in err, err
    finally:
        await nc.close()
        await service.shutdown()


async def test_a_new_key_is_taken_at_once_by_the_log_service_and_a_worker(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`convlog keys rotate` writes the new seed, and a process that starts then (a
    `convlog send` with the gateway key, a worker) signs with it at once; but the log
    service and a worker's gate read the keyring again only once a second: within that
    second the new key was refused ('not in the keyring': the append failed; a worker
    terminated the notice of a message so signed, and the turn was never played)."""
    keys, service = await _signed_service(nats_server, tmp_path)
    ring = keys / "keyring.json"
    nc = await nats.connect(nats_server.url)
    try:
        old = LogClient(nc, timeout=5, deadline=20, signer=Signer.load(keys / "Triage.nk"))
        gate = EnvelopeGate.from_settings(old, load_settings({"keyring": str(ring)}, {}), "L1Billing")
        await old.append("new", [AppendItem(agent="Triage", data=SAY)])  # the keyrings were just read
        assert gate.signature_refusal((await old.items("new"))[0]) is None
        assert await asyncio.to_thread(main, ["keys", "rotate", "Triage", "--dir", str(keys)]) == 0
        new = LogClient(nc, timeout=5, deadline=20, signer=Signer.load(keys / "Triage.nk"))
        await new.append("new", [AppendItem(agent="Triage", data=SAY)])
        items = await new.items("new")
        assert items[1].key_id == new.signer.key_id  # type: ignore[union-attr]
        assert gate.signature_refusal(items[1]) is None
    finally:
        await nc.close()
        await service.shutdown()


async def test_a_running_client_refused_for_its_rotated_key_signs_again_with_its_new_key(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The log service and a running client look at their files independently, once a
    second: when the log service had read the rotated keyring first (at once, as soon as
    another process -- a second worker instance, a `convlog send` -- signed with the new
    key), the client's next append or message, signed with its old key, was refused
    ('forbidden: ... was retired'; a worker's turn failed and was played again) although
    its key file already held the new key.  A refused client looks at its key file at once
    and sends again, signed with the new key."""
    keys, service = await _signed_service(nats_server, tmp_path)
    nc = await nats.connect(nats_server.url)

    def connect(key: str) -> Awaitable[LogClient]:
        return LogClient.connect(settings=load_settings(
            {"nats_url": nats_server.url}, {"CONVLOG_SIGNING_KEY": str(keys / f"{key}.nk")}))

    worker, gateway = await connect("Triage"), await connect("gateway")
    try:
        await worker.append("rr", [AppendItem(agent="Triage", data=SAY)])
        await gateway.send("rr", "hello")
        for who in ("Triage", "gateway"):
            assert await asyncio.to_thread(main, ["keys", "rotate", who, "--dir", str(keys)]) == 0
        new = {who: Signer.load(keys / f"{who}.nk").key_id for who in ("Triage", "gateway")}
        # Another process with the new keys: the log service reads the keyring at once.
        others = LogClient(nc, timeout=5, deadline=20, signer=Signer.load(keys / "Triage.nk"))
        await others.append("rr", [AppendItem(agent="Triage", data=SAY)])
        await LogClient(nc, timeout=5, deadline=20, signer=Signer.load(keys / "gateway.nk")).send("rr", "hi")
        # The running clients, within the second after the rotation (two appends at once:
        # both refused, both sent again).
        await asyncio.gather(*(worker.append("rr", [AppendItem(agent="Triage", data=SAY)]) for _ in range(2)))
        await gateway.send("rr", "again")
        items = await others.items("rr")
        assert [e.key_id for e in items[2:]] == [new["Triage"], new["gateway"], *[new["Triage"]] * 2, new["gateway"]]
    finally:
        await worker.close()
        await gateway.close()
        await nc.close()
        await service.shutdown()
