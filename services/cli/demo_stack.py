"""``convlog demo``'s stack watch: each part of the supervised stack reported as it
becomes ready (nats-server, the log service, each worker's durable consumer), and a
clear :class:`DemoFailure` with the program's log tail when one is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nats

from shared.subjects import Subjects
from shared.work import work_stream_name

from .supervise import Supervisor

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_UNAVAILABLE", "DemoFailure", "consumer_name", "wait_for_stack"]

EXIT_OK, EXIT_FAIL, EXIT_UNAVAILABLE = 0, 1, 3
LOG_SERVICE_NAME = "convlog-log"


# The same as services.worker.intake.consumer_name() (tests check), not imported:
# see RULES_MODEL_LABEL in demo.py.
def consumer_name(agent: str) -> str:
    """The durable consumer every worker of ``agent`` shares."""
    return f"convlog-agent-{agent}"


class DemoFailure(Exception):
    """The demo could not show what it promises; the message says what went wrong."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _log_tail(log_dir: Path, name: str, n: int = 15) -> str:
    paths = sorted(log_dir.glob(f"{name}.log")) + sorted(log_dir.glob(f"{name}-*.log"))
    if not paths:
        return f"    (no log file {log_dir / name}.log)"
    lines = paths[0].read_text(errors="replace").splitlines()[-n:]
    return "\n".join(f"    | {line}" for line in lines)


async def _check_processes(sup: Supervisor, log_dir: Path) -> list[dict[str, Any]]:
    """Fail fast when supervisord gave up on a program (FATAL: too many failed starts)."""
    try:
        infos: list[dict[str, Any]] = await asyncio.to_thread(sup.processes)
    except Exception as e:  # supervisord itself gone
        raise DemoFailure(f"supervisord stopped answering: {e}", exit_code=EXIT_UNAVAILABLE) from e
    for info in infos:
        if info["statename"] in ("FATAL", "UNKNOWN"):
            raise DemoFailure(
                f"{info['name']} is {info['statename']} ({info.get('spawnerr') or info.get('description')}); "
                f"its log:\n{_log_tail(log_dir, info['name'])}",
                exit_code=EXIT_UNAVAILABLE,
            )
    return infos


async def _consumer_exists(nc: Any, agent: str) -> bool:
    js = nc.jetstream(timeout=2)
    await js.consumer_info(work_stream_name(Subjects()), consumer_name(agent))
    return True


async def wait_for_stack(
    sup: Supervisor,
    *,
    log_dir: Path,
    url: str,
    agents: Sequence[str],
    step: Callable[[str], None],
    timeout: float,  # noqa: ASYNC109 - a deadline for the whole start
) -> None:
    """Report each part of the stack as it becomes ready, in start order.

    nats-server: JetStream answers; the log service: ``$SRV.PING.convlog-log``
    answers; each worker: its agent's durable consumer exists.

    Raises:
        DemoFailure: supervisord gave up on a program (FATAL), or a part was
            not ready within ``timeout`` seconds; the message has its log's tail.
    """
    end = time.monotonic() + timeout
    nc: Any = None

    async def until(what: str, programs: Sequence[str], probe: Callable[[], Any]) -> None:
        while True:
            infos = await _check_processes(sup, log_dir)
            with contextlib.suppress(Exception):
                if await probe():
                    return
            if time.monotonic() > end:
                states = ", ".join(f"{i['name']} {i['statename']}" for i in infos)
                logs = "\n".join(f"  {name}:\n{_log_tail(log_dir, name)}" for name in programs)
                raise DemoFailure(f"{what} not ready after {timeout:.0f}s ({states})\n{logs}",
                                  exit_code=EXIT_UNAVAILABLE)
            await asyncio.sleep(0.1)

    async def _quiet(e: Exception) -> None:
        """The server is still starting: refused connects are expected."""

    async def nats_up() -> bool:
        nonlocal nc
        if nc is None:
            nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=-1,
                                    reconnect_time_wait=0.2, error_cb=_quiet)
        await nc.jetstream(timeout=2).account_info()
        return True

    async def log_up() -> bool:
        await nc.request(f"$SRV.PING.{LOG_SERVICE_NAME}", b"", timeout=0.5)
        return True

    try:
        await until("nats-server", ["nats"], nats_up)
        step(f"{'nats-server':<19}up     {url} (JetStream)")
        await until("log service", ["log"], log_up)
        step(f"{'log service':<19}up     answers $SRV.PING.{LOG_SERVICE_NAME} (SQLite store)")
        for agent in agents:
            await until(f"worker {agent}", [f"worker-{agent}"],
                        lambda agent=agent: _consumer_exists(nc, agent))
            step(f"{'worker ' + agent:<19}up     durable consumer {consumer_name(agent)} exists")
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
