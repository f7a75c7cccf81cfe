"""``convlog worker`` started before NATS JetStream is up: it waits and retries
(with backoff, one clear line), then serves; after ``--start-wait`` it exits 3."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import nats

from shared.subjects import Subjects
from shared.work import ensure_work_stream
from tests.support.logsvc import service_env
from tests.support.natsd import NatsServer, free_port
from tests.support.procs import REPO_ROOT, Proc
from tests.support.workerstack import READY

SPEC = REPO_ROOT / "deploy" / "agents.toml"


def _worker(tmp: Path, url: str, *extra: str) -> Proc:
    env = service_env(tmp / "data")
    env.pop("OPENAI_API_KEY", None)  # the built-in rules model: no model server needed
    env.pop("OPENAI_BASE_URL", None)
    cmd = [sys.executable, "-m", "services.cli.main", "worker", "Triage", "--agents", str(SPEC),
           "--nats-url", url, "--no-embedded", "--grace", "1", *extra]
    return Proc(cmd, log_dir=tmp, env=env, name="worker-Triage")


async def test_a_worker_started_before_jetstream_waits_then_serves(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    worker = _worker(tmp_path, url).start()
    server = NatsServer(tmp_path / "nats", port=port)
    try:
        await asyncio.to_thread(worker.wait_for_line, r"waiting for NATS JetStream at \S+127\.0\.0\.1", 20)
        assert worker.running, worker.output()
        server.start()
        await asyncio.to_thread(worker.wait_for_line, r"NATS JetStream answers at", 20)
        # The log service creates the work stream; here the test does, as it would.
        nc = await nats.connect(server.url)
        try:
            await ensure_work_stream(nc.jetstream(), Subjects("convlog"))
        finally:
            await nc.close()
        await asyncio.to_thread(worker.wait_for_line, READY, 20)
        assert worker.running, worker.output()
    finally:
        rc = worker.terminate()
        server.stop()
    assert rc == 0, worker.output()


async def test_a_worker_gives_up_after_start_wait_with_exit_3_and_one_line(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    worker = _worker(tmp_path, url, "--start-wait", "1.5").start()
    t0 = time.monotonic()
    try:
        rc = await asyncio.to_thread(worker.wait, 20)
    finally:
        worker.terminate()
    assert rc == 3, worker.output()
    assert time.monotonic() - t0 >= 1.5
    out = worker.output()
    assert "Traceback" not in out, out
    assert "waiting for NATS JetStream" in out, out  # said while waiting
    last = out.strip().splitlines()[-1]
    assert "unavailable" in last and "did not answer" in last and "within 1.5 s" in last, last


# A SIGTERM while the worker (or `convlog log` for a server it does not start) waited for
# JetStream ended it with Python's default: status -15, nothing said; its signal handling
# began only after the wait.  It now stops as a service stopped while starting: exit 0.
async def test_sigterm_while_waiting_for_jetstream_stops_the_worker_with_exit_0(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    worker = _worker(tmp_path, url).start()
    try:
        await asyncio.to_thread(worker.wait_for_line, r"waiting for NATS JetStream at", 20)
    finally:
        rc = worker.terminate()
    assert rc == 0, worker.output()
    assert "stopped while starting" in worker.output(), worker.output()
