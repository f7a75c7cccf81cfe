"""``convlog replay --verify`` and the web console's export when the items are read from
a replica that trails the stream leader (JetStream store, R3: nats-server lets a
follower answer direct gets once it has caught up to 90%).

The replay reads the signed heads first (the witness head from its KV bucket, a
fresh one from the log service), then the items: on an R3 log another instance
may answer the item reads with the session as it was a few milliseconds before
the head's commit.  Reported as it came, that was a truncated log ("the log
service signed item_order 2 ... but the export ends at item_order 1", exit 1) on
a log that lost nothing.  The console's export (the page's check in the browser)
read the same way and said "truncated" too.

The trailing replica is played by the reading instance's direct gets of the
session's head, which answer with the head as it was before the last append for
its first few reads (as a follower does until it has applied it); the appends,
the stream, the witness, the service, the console and the ``convlog replay`` process
are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.cli.keys_cmds import make_keys
from services.log.handlers import Handlers
from services.log.heads import read_witness_head
from services.log.service import LogService
from services.log.store.jetstream import Layout
from services.log.store.jetstream.api import DirectGet
from services.web.app import WebOptions
from services.web.cli import bind, console_url, serve
from shared.client import LogClient
from shared.config import Settings, load_settings
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer
from tests.support.procs import run_cli

SID = "trailing-audit"


def _signing(settings: Settings, tmp_path: Path) -> tuple[Settings, Path]:
    keys = tmp_path / "keys"
    make_keys(keys, [])
    return load_settings({
        "nats_url": settings.nats_url, "db": str(settings.db), "data_dir": str(settings.data_dir), "store": "jetstream",
        "keyring": str(keys / "keyring.json"), "head_interval": 0.2,
    }, {"CONVLOG_SIGNING_KEY": str(keys / "log.nk")}), keys / "keyring.json"


@contextlib.asynccontextmanager
async def _trailing_instance(
    js_settings: Settings, client: LogClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Path, list[int]]]:
    """Two items written and witnessed, then a log service whose replica has not applied
    item 2 until it has answered two reads (the head and the first page of items):
    (the keyring, the count of reads it answered)."""
    settings, keyring = _signing(js_settings, tmp_path)
    layout = Layout(settings.subjects)
    head_filter = layout.session_filter(SID)
    first = LogService(settings)
    await first.start()
    try:
        await client.append(SID, [{"agent": "user", "data": {"role": "user", "content": "one"}}])
        before = await DirectGet(client.nc, layout.log_streams[0], timeout=2.0).last(head_filter)
        await client.append(SID, [{"agent": "Triage", "data": {"role": "assistant", "content": "two"}}])

        async def witnessed() -> None:
            head = await read_witness_head(client.nc, settings.subjects, SID)
            assert head is not None and head.item_order == 2, head

        await assert_eventually(witnessed, timeout=10, interval=0.1)
    finally:
        await first.shutdown()

    # Another instance answers the audit's reads; its replica has not applied item 2
    # until it has answered the head read and the first page of items.
    lagging = [True]

    def unapplied(body: bytes) -> bool:
        env = json.loads(body)
        return lagging[0] and env.get("session_id") == SID and env.get("item_order", 0) >= 2

    real_last, real_batch, real_bodies = DirectGet.last, DirectGet.batch, DirectGet.bodies

    async def last(self: DirectGet, subject: str) -> Any:
        msg = await real_last(self, subject)
        if msg is not None and unapplied(msg.data):
            return before if subject == head_filter else None
        return msg

    async def batch(self: DirectGet, request: dict[str, object]) -> list[Any]:
        return [m for m in await real_batch(self, request) if not unapplied(m.data)]

    async def bodies(self: DirectGet, request: dict[str, object]) -> list[bytes]:
        return [b for b in await real_bodies(self, request) if not unapplied(b)]

    real_read, reads = Handlers.read, [0]

    async def read(self: Handlers, subject: str, body: bytes) -> bytes:
        try:
            return await real_read(self, subject, body)
        finally:
            reads[0] += 1
            lagging[0] = reads[0] < 2  # caught up (milliseconds, on a real follower)

    for name, patched in (("last", last), ("batch", batch), ("bodies", bodies)):
        monkeypatch.setattr(DirectGet, name, patched)
    monkeypatch.setattr(Handlers, "read", read)
    second = LogService(settings)
    await second.start()
    try:
        yield keyring, reads
    finally:
        await second.shutdown()


async def test_replay_verify_rereads_items_a_trailing_replica_left_out_of_a_signed_head(
    js_settings: Settings, nats_server: NatsServer, client: LogClient, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _trailing_instance(js_settings, client, tmp_path, monkeypatch) as (keyring, reads):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
        code, out, err = await run_cli("replay", SID, "--verify", "--keyring", str(keyring),
                                       "--nats-url", nats_server.url, "--no-embedded", env=env, timeout=60)
        assert reads[0] >= 2, reads  # the trailing replica answered the head and the first page
        assert code == 0, out + err
        assert "truncated" not in out + err
        assert "two" in out


async def test_the_consoles_export_rereads_items_a_trailing_replica_left_out_of_a_signed_head(
    js_settings: Settings, client: LogClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _trailing_instance(js_settings, client, tmp_path, monkeypatch) as (keyring, reads):
        sock = bind("127.0.0.1", 0)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(client, sock, WebOptions(), stop))
        url = console_url(sock) + f"sessions/{SID}/export.jsonl"
        try:
            export = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        finally:
            stop.set()
            await task
        assert reads[0] >= 2, reads  # the trailing replica answered the head and the first page
        # The export is checked as the page checks it (`replay --file --verify` is its twin).
        path = tmp_path / "export.jsonl"
        path.write_bytes(export)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
        code, out, err = await run_cli("replay", SID, "--file", str(path), "--verify", "--keyring", str(keyring),
                                       env=env, timeout=60)
        assert code == 0, out + err
        assert "truncated" not in out + err
        assert "two" in out
