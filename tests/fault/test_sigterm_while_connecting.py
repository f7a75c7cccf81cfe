"""A shutdown (SIGTERM) while a process's first NATS connect stalls ends it promptly.

A nats-server frozen with SIGSTOP accepts TCP connections (the kernel completes the
handshake) but never answers.  nats-py retries the first connect forever (unlimited
reconnects), and the log service's shutdown waited for its start to end: `convlog log`
hung after SIGTERM until the server answered again, then logged "log service ready",
and a worker's shutdown finished while its start still waited on the connect.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.worker.model import make_model_client
from services.worker.spec import load_spec
from services.worker.worker import Worker
from shared.config import load_settings
from tests.support.natsd import NatsServer
from tests.support.procs import Proc
from tests.support.workerstack import solo_spec


def _connections_to(port: int) -> int:
    """TCP connections established to 127.0.0.1:``port`` (the client side, from /proc)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


async def _until_connected(port: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    end = time.monotonic() + timeout
    while _connections_to(port) == 0:
        assert time.monotonic() < end, f"nothing connected to port {port}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_sigterm_to_convlog_log_while_its_first_connect_stalls_exits_promptly(
    nats_server: NatsServer, tmp_path: Path, store: str
) -> None:
    nats_server.pause()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env["CONVLOG_DATA_DIR"] = str(tmp_path / "data")
    proc = Proc([sys.executable, "-m", "services.cli.main", "log", "--nats-url", nats_server.url,
                 "--store", store],
                log_dir=tmp_path, env=env, name="log")
    with proc.start():
        try:
            await _until_connected(nats_server.port)  # its connect waits for the server's INFO
            await asyncio.sleep(0.5)
            os.kill(proc.pid, signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 5)
        finally:
            nats_server.resume()
        assert code == 0, proc.output()
        assert "stopped while starting" in proc.output(), proc.output()
        assert "log service ready" not in proc.output(), proc.output()


async def test_a_worker_shut_down_while_its_first_connect_stalls_returns_promptly(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = load_settings({"nats_url": nats_server.url}, environ={})
    spec = load_spec(solo_spec(tmp_path / "solo.toml"))
    model = make_model_client(None, None)
    worker = Worker(settings, spec, "Solo", model)
    nats_server.pause()
    try:
        run = asyncio.create_task(worker.run())
        await _until_connected(nats_server.port)
        await asyncio.sleep(0.5)
        await asyncio.wait_for(worker.shutdown(), 5)
        done, _ = await asyncio.wait({run}, timeout=5)
        assert done, "worker.run() still waits on the connect after its shutdown"
        await run
        assert worker.nc is None or worker.nc.is_closed
    finally:
        nats_server.resume()
        await model.client.close()
