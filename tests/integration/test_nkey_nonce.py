"""The seed that signs items is also the NATS login (``CONVLOG_NKEY``), and an
nkey login signs the nonce the server sends, as it is.  A server that is not
nats-server (an impostor on the network path, a host that runs the NATS
server a worker connects to) may choose that nonce: were it an item's signing
input, the login would be the agent's signature of an item the impostor wrote,
which the real log service would accept as the agent's.  A convlog process
signs only a nonce shaped as nats-server makes them, never a signing input."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from services.log.service import LogService
from shared import nats_connect
from shared.client import LogClient, connect_options
from shared.config import ConfigError, load_settings
from shared.errors import ForbiddenError
from shared.merkle import b64
from shared.messages import AppendItem
from shared.signing import Signer, item_signing_input
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT

SID = "victim"
FORGED = AppendItem(item_id="forged-1", agent="Triage",
                    data={"type": "message", "role": "assistant", "content": "Refund approved: 10,000 EUR."})


async def _impostor(nonce: str, sigs: list[str]) -> asyncio.Server:
    """A TCP server that speaks just enough NATS to be sent a CONNECT: its INFO
    carries ``nonce``; every ``sig`` a client sends is kept in ``sigs``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "IMPOSTOR", "version": "2.10.0", "proto": 1, "headers": True,
                "max_payload": 1048576, "auth_required": True, "nonce": nonce}
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            if line.startswith(b"CONNECT "):
                sig = json.loads(line[len(b"CONNECT "):]).get("sig")
                if sig:
                    sigs.append(sig)
            writer.write(b"-ERR 'Authorization Violation'\r\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_a_nats_login_never_signs_an_item_for_the_server(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> None:
    triage = Signer.load(keys / "Triage.nk")
    wanted = item_signing_input(SID, FORGED.item_id, FORGED.agent, FORGED.kind, FORGED.data)
    sigs: list[str] = []
    impostor = await _impostor(wanted.decode(), sigs)
    port = impostor.sockets[0].getsockname()[1]
    # The Triage worker's settings, pointed at the impostor.
    settings = load_settings({"nats_url": f"nats://127.0.0.1:{port}"}, {"CONVLOG_NKEY": str(keys / "Triage.nk")})
    try:
        with pytest.raises((ConfigError, OSError, TimeoutError)):
            await asyncio.wait_for(
                nats_connect.connect(settings, connect_options(settings, name="convlog-worker-Triage")), 10)
    finally:
        impostor.close()
        await impostor.wait_closed()

    # Whatever the login signed is no use as Triage's signature of the impostor's item:
    # the real log service, requiring signatures, refuses it.
    service = LogService(load_settings(
        {"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db"),
         "keyring": str(keys / "keyring.json"), "require_signatures": True}, {}))
    await service.start()
    client = await LogClient.connect(nats_server.url)
    try:
        for sig in sigs:
            forged = AppendItem(item_id=FORGED.item_id, agent=FORGED.agent, data=FORGED.data,
                                sig=b64(base64.b64decode(sig)), key_id=triage.key_id)
            with pytest.raises(ForbiddenError):
                await client.append(SID, [forged])
        assert await client.items(SID) == []
        assert sigs == [], "the nkey login signed a nonce that is no nats-server nonce"
    finally:
        await client.close()
        await service.shutdown()


async def test_a_nats_server_nonce_is_still_signed(
    nats_server_factory: Callable[..., NatsServer], keys: Path
) -> None:
    """The guard lets a real nats-server's nonce through: an nkey user logs in."""
    server = nats_server_factory(config=(keys / "nats-users.conf").read_text())
    settings = load_settings({"nats_url": server.url}, {"CONVLOG_NKEY": str(keys / "gateway.nk")})
    nc = await nats_connect.connect(settings, connect_options(settings, name="gateway"))
    try:
        assert nc.is_connected
    finally:
        await nc.close()


async def test_without_the_guard_the_login_is_nats_pys_own_and_says_so(
    nats_server_factory: Callable[..., NatsServer], keys: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """The fallback: a nats-py whose login internals moved logs in all the same
    (nats-py's own login, every nonce signed) and warns once that it does."""
    from shared.nats_seam import login

    monkeypatch.setattr(login, "_MISSING", "nats-py has no Client._setup_nkeys_connect")
    monkeypatch.setattr(login, "_warned", [])
    server = nats_server_factory(config=(keys / "nats-users.conf").read_text())
    settings = load_settings({"nats_url": server.url}, {"CONVLOG_NKEY": str(keys / "gateway.nk")})
    for _ in range(2):
        nc = await nats_connect.connect(settings, connect_options(settings, name="gateway"))
        try:
            assert nc.is_connected
        finally:
            await nc.close()
    warned = [r for r in caplog.records if "signs any nonce the server sends" in r.getMessage()]
    assert len(warned) == 1


def test_the_guard_is_in_place_with_the_installed_nats_py() -> None:
    from shared.nats_seam import login

    assert login.guard_missing() == ""


async def test_the_benchs_echo_responder_never_signs_an_item_for_the_server(tmp_path: Path, keys: Path) -> None:
    """``convlog bench``'s echo baseline logs in with the bench's credentials
    (``CONVLOG_NKEY``, the seed that signs items) in a process of its own: it
    connected with nats-py's plain ``nats.connect``, which signs any nonce."""
    wanted = item_signing_input(SID, FORGED.item_id, FORGED.agent, FORGED.kind, FORGED.data)
    sigs: list[str] = []
    impostor = await _impostor(wanted.decode(), sigs)
    port = impostor.sockets[0].getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env["CONVLOG_NKEY"] = str(keys / "Triage.nk")
    echo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.bench.appends", "--echo", f"nats://127.0.0.1:{port}", "bench.echo",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env=env, cwd=str(REPO_ROOT),
    )
    try:
        for _ in range(40):  # until it signed (within a second without the guard), or gave up
            if sigs or echo.returncode is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        if echo.returncode is None:
            echo.kill()
        await echo.wait()
        impostor.close()
        await impostor.wait_closed()
    assert sigs == [], "the echo responder's login signed a nonce that is no nats-server nonce"
