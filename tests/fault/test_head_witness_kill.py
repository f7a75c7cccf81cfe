"""``kill -9`` of a signing log service within ``CONVLOG_HEAD_INTERVAL`` of a commit.

The witness signs each written session's head within the interval of its commit
(README, "Signed heads"); a crash before its next round lost the sessions it had
still to sign, and an idle session's newest items then stayed without a witness
head for good (until written again), so a later loss of that tail went unseen.
After the restart those heads are signed within the interval.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.cli.keys_cmds import make_keys
from services.log.heads import read_witness_head
from shared.client import LogClient
from shared.subjects import Subjects
from tests.support.eventually import assert_eventually
from tests.support.logsvc import LogServiceProc
from tests.support.natsd import NatsServer
from tests.support.workerstack import signing_env

INTERVAL = 3.0


async def test_heads_of_commits_a_kill_left_unsigned_are_signed_after_the_restart(
    nats_server: NatsServer, tmp_db: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, [])
    env = {**signing_env(keys, "log", require=False), "CONVLOG_HEAD_INTERVAL": str(INTERVAL)}
    svc = LogServiceProc(nats_server.url, tmp_db, log_dir=tmp_path, env=env).start()
    try:
        async with await LogClient.connect(nats_server.url) as client:
            for text in ("one", "two"):
                reply = await client.append("idle", [{"agent": "user", "data": {"role": "user", "content": text}}])
            svc.kill9()  # well within the interval: no witness round has run
            await asyncio.to_thread(svc.start)

            async def signed() -> None:
                head = await read_witness_head(client.nc, Subjects("convlog"), "idle")
                assert head is not None and head.item_order == 2, head
                assert head.hash == reply.items[-1].hash

            await assert_eventually(signed, timeout=3 * INTERVAL, interval=0.2)
    finally:
        svc.stop()
