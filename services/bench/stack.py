"""A private stack for a bench: an embedded nats-server, ``convlog log`` on a
temporary database and, optionally, worker processes; all stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from services.cli.stack import EmbeddedNats, stop_process
from shared.client import LogClient
from shared.config import Settings

__all__ = ["CONNECTION", "connection_env", "connection_settings", "local_stack", "wait_service"]

#: What a bench needs of the command's settings to reach a running log service.
CONNECTION = ("prefix", "creds", "nkey", "user", "password", "token", "tls_ca", "tls_cert", "tls_key",
              "request_timeout", "nats_seam")


def connection_settings(settings: Settings | None, url: str) -> Settings:
    """Settings to reach the log service at ``url`` with ``settings``' prefix and
    credentials (nothing else: a signing key, say, would change what is measured)."""
    if settings is None:
        return Settings(nats_url=url)
    return Settings(nats_url=url, **{name: getattr(settings, name) for name in CONNECTION})


def connection_env(settings: Settings | None) -> dict[str, str]:
    """The environment of a bench's child process that connects as ``settings`` say:
    ours minus any ``CONVLOG_*``, plus the ``CONNECTION`` values set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    for name in CONNECTION if settings is not None else ():
        if (value := getattr(settings, name)) is not None:
            env[f"CONVLOG_{name.upper()}"] = str(value)
    return env


@contextlib.contextmanager
def local_stack(
    keep_dir: str | None = None, *, workers: Sequence[Sequence[str]] = (),
    started: list[subprocess.Popen[bytes]] | None = None,
) -> Iterator[str]:
    """An embedded nats-server plus ``convlog log`` on a temporary database,
    and one ``convlog worker`` process per entry of ``workers`` (its arguments);
    the worker processes are appended to ``started`` when given."""
    with tempfile.TemporaryDirectory(prefix="convlog-bench-") as tmp:
        base = Path(keep_dir or tmp)
        nats_server = EmbeddedNats(base / "nats", port=-1).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
        log_proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "log", "--nats-url", nats_server.url,
             "--db", str(base / "bench.db"), "--no-embedded", "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, env=env,
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "worker", *w, "--nats-url",
                 nats_server.url, "--no-embedded", "--log-level", "WARNING"],
                stdin=subprocess.DEVNULL, env=env,
            )
            for w in workers
        ]
        if started is not None:
            started.extend(procs)
        try:
            yield nats_server.url
        finally:
            for proc in procs:
                stop_process(proc)
            stop_process(log_proc)
            nats_server.stop()


async def wait_service(client: LogClient, within: float = 20.0) -> None:
    end = time.monotonic() + within
    while True:
        try:
            await client.read("bench-ready", tail=0)
            return
        except Exception:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)
