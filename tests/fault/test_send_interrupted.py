"""Ctrl-C while ``convlog send`` waits for the log to store its message (found in a
review): the outcome is unknown then -- the message may be stored or not -- and send
ended with 130 and not a word, so the only safe retry (``--id`` with the message's
id, which it says when the log stops answering) was not known to the user, and
sending again wrote the message twice once the log caught up.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import nats

from tests.support.logsvc import LogServiceProc
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT, service_env


async def test_ctrl_c_before_the_log_answers_says_how_to_retry(
    nats_server: NatsServer, tmp_db: Path, tmp_path: Path, log_services: Callable[..., LogServiceProc]
) -> None:
    svc = await asyncio.to_thread(log_services, nats_server.url, tmp_db)
    watcher = await nats.connect(nats_server.url)
    proc = None
    try:
        sent = await watcher.subscribe("convlog.in.s")
        await asyncio.to_thread(svc.pause)  # SIGSTOP: the message reaches it, no answer comes
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "send", "s", "hello", "--timeout", "30",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**service_env(tmp_path / "cli"), "CONVLOG_NATS_URL": nats_server.url}, cwd=REPO_ROOT)
        msg = await sent.next_msg(timeout=30)  # the message is out; its outcome unknown
        item_id = msgspec.json.decode(msg.data)["item_id"]
        proc.send_signal(signal.SIGINT)
        _, err_b = await asyncio.wait_for(proc.communicate(), 20)
        err = err_b.decode()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await watcher.close()
        await asyncio.to_thread(svc.resume)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert f"--id {item_id}" in err, err  # how to send it again without writing it twice
