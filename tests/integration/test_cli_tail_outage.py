"""``convlog tail`` through a nats-server outage: one line says NATS went away,
not one a reconnect attempt (found in a review).

nats-py reports each failed reconnect attempt, every 0.25 s (convlog's
``reconnect_time_wait``), and each was logged at WARNING: a tail left running
through a 3 s outage printed a dozen ``nats: ConnectionRefusedError ...`` lines
between the session's items, and a log service a line every quarter second
for as long as NATS was down.  The same failure again is now said at DEBUG,
and once more at WARNING every 30 s while it lasts.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from shared.client import LogClient
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT, service_env


async def test_a_tail_through_a_nats_outage_says_it_once_and_goes_on(
    nats_server: NatsServer, log_url: str, tmp_path: Path
) -> None:
    client = await LogClient.connect(log_url)
    proc = None
    try:
        await client.append("s", [{"agent": "user", "data": {"role": "user", "content": "before"}}])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "tail", "s", "--count", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**service_env(tmp_path / "cli"), "CONVLOG_NATS_URL": log_url}, cwd=REPO_ROOT)
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert first.startswith(b"#1 "), first
        nats_server.stop()
        await asyncio.sleep(3)  # about 12 reconnect attempts
        nats_server.start()
        deadline = time.monotonic() + 20
        while True:  # the log service's own connection is back too
            try:
                await client.append("s", [{"agent": "user", "data": {"role": "user", "content": "after"}}])
                break
            except Exception:
                assert time.monotonic() < deadline, "the log service did not come back"
                await asyncio.sleep(0.2)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.close()
    assert proc.returncode == 0, err
    assert [line.split()[0] for line in (first + out).splitlines()] == [b"#1", b"#2"], out
    said = [line for line in err.decode().splitlines() if "WARNING" in line]
    assert len(said) <= 2, "\n".join(said)  # the connection lost, the first refused attempt


async def test_nats_py_takes_the_shared_options_as_they_are(nats_server: NatsServer) -> None:
    """``convlog up`` and the JetStream store connect with :func:`connect_options` as
    they are (no wrapper around its callbacks): nats-py refuses an error callback
    that is not a coroutine function."""
    from shared.client import connect_options
    from shared.config import Settings
    from shared.nats_connect import open_client

    nc = await open_client(**connect_options(Settings(nats_url=nats_server.url), name="t"))
    await nc.close()
