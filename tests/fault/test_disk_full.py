"""A disk that fills under load: the log service answers what it cannot write
``unavailable`` naming the cause, writes nothing half, exits 1, and serves again
on the same file once there is room.

The full disk is a file-size limit (``prlimit --fsize``) on the log service's
process: past it, SQLite's writes fail as on a full disk.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import sys
from pathlib import Path

import msgspec
import nats
import pytest

from shared.client import LogClient
from shared.errors import ERROR_CODE_HEADER, ERROR_HEADER
from shared.messages import AppendItem, AppendRequest
from tests.support.natsd import NatsServer
from tests.support.procs import Proc, service_env

LIMIT = 384 * 1024  # bytes any file of the process may reach: the database's WAL passes it first
BURST = 300
CONTENT = "x" * 8000

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")


def _log_service(nats_url: str, db: Path, tmp_path: Path, *, fsize: int | None) -> Proc:
    limit = ["prlimit", f"--fsize={fsize}"] if fsize is not None else []
    return Proc([*limit, sys.executable, "-m", "services.cli.main", "log", "--nats-url", nats_url,
                 "--db", str(db), "--no-embedded"],
                log_dir=tmp_path, env={**service_env(tmp_path / "data"), "CONVLOG_GRACE": "2"}, name="log")


async def test_appends_on_a_full_disk_are_refused_as_unavailable_and_the_service_serves_again_with_room(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "log.db"
    with _log_service(nats_server.url, db, tmp_path, fsize=LIMIT) as proc:
        proc.wait_for_line("log service ready", 20)
        nc = await nats.connect(nats_server.url)
        try:
            async def one(n: int) -> tuple[str, nats.aio.msg.Msg | None]:
                iid = f"a-{n}"
                body = msgspec.json.encode(AppendRequest(items=[AppendItem(
                    item_id=iid, agent="user", data={"role": "user", "content": CONTENT})]))
                try:
                    return iid, await nc.request(f"convlog.append.s{n % 4}", body, timeout=5)
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    return iid, None  # sent as it stopped: unknown

            replies = await asyncio.gather(*(one(n) for n in range(BURST)))
        finally:
            await nc.close()
        assert await asyncio.to_thread(proc.wait, 20) == 1, proc.output()
        output = proc.output()
    assert "convlog-committer stopped" in output
    # What failed was the store: said as such, not as a bug of the service.
    assert "unexpected error" not in output, output
    acked = {}
    refusals = []
    for iid, msg in replies:
        if msg is None:
            continue
        headers = msg.headers or {}
        if ERROR_CODE_HEADER in headers:
            refusals.append(headers.get(ERROR_HEADER, ""))
        else:
            acked[iid] = msgspec.json.decode(msg.data)["items"][0]["item_order"]
    assert refusals, "the disk never filled"
    assert all(r.startswith("unavailable: ") and "internal error" not in r for r in refusals), set(refusals)

    # Room again: the same file serves; every acknowledged append is there, nothing refused is.
    with _log_service(nats_server.url, db, tmp_path, fsize=None) as again:
        again.wait_for_line("log service ready", 20)
        async with await LogClient.connect(nats_server.url) as client:
            reply = await client.append("s0", [AppendItem(agent="user", data={"role": "user", "content": "room"})])
            assert reply.items[0].item_order == 1 + sum(1 for iid in acked if int(iid[2:]) % 4 == 0)
    conn = sqlite3.connect(db)
    try:
        stored = {msgspec.json.decode(env)["item_id"]: order
                  for order, env in conn.execute("SELECT item_order, envelope FROM items")}
    finally:
        conn.close()
    assert {iid: stored.get(iid) for iid in acked} == acked
    refused_ids = {iid for iid, msg in replies if msg is not None and ERROR_CODE_HEADER in (msg.headers or {})}
    assert not refused_ids & stored.keys()
