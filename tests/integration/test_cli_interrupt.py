"""Ctrl-C ends a ``convlog`` command a person waits on: exit 130, no traceback.

Found in a review: ``convlog send SID -`` (or ``--file`` a FIFO) waiting for its
message on standard input ignored Ctrl-C.  asyncio.run's Ctrl-C handler only
cancels the command's task, and the task, blocked in the read, never came back
to the event loop to see it: the read went on, a second Ctrl-C was needed, and
an input closed after the first Ctrl-C sent nothing but said ``the message is
empty`` (exit 2).
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.support.natsd import free_port
from tests.support.procs import REPO_ROOT

# The number of read(2), to see the process block in it (/proc/PID/syscall).
_READ = {"x86_64": 0, "aarch64": 63}.get(platform.machine())


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update(CONVLOG_DATA_DIR=str(tmp / "data"), CONVLOG_EMBEDDED="false",
               CONVLOG_NATS_URL=f"nats://127.0.0.1:{free_port()}")
    return env


def _syscall(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return []


async def _blocked_reading(pid: int, fd: int | None) -> None:
    """Until ``pid`` sits in read(2) (of ``fd``, when given)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        fields = await asyncio.to_thread(_syscall, pid)
        if fields and fields[0] == str(_READ) and (fd is None or int(fields[1], 16) == fd):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} never blocked reading its input")


async def _writer_of(fifo: Path, proc: asyncio.subprocess.Process) -> int:
    """A write end of ``fifo``, once ``proc`` has opened it to read."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.returncode is None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            await asyncio.sleep(0.05)
    raise AssertionError("convlog send never opened the FIFO")


@pytest.mark.skipif(_READ is None or not Path("/proc/self/syscall").exists(),
                    reason="needs /proc/PID/syscall on x86_64 or aarch64")
@pytest.mark.parametrize("source", ["-", "--file FIFO"])
async def test_ctrl_c_while_send_waits_for_its_message_exits_130(tmp_path: Path, source: str) -> None:
    if source == "-":
        args, fd = ["-"], 0
    else:
        fifo = tmp_path / "message.fifo"
        os.mkfifo(fifo)
        args, fd = ["--file", str(fifo)], None  # blocked in open(2) of the FIFO, then read(2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "send", "s", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_env(tmp_path), cwd=REPO_ROOT)
    writer = None
    try:
        if fd is None:  # a writer that opens the FIFO and writes nothing: the read blocks
            writer = await _writer_of(fifo, proc)
        await _blocked_reading(proc.pid, fd)
        proc.send_signal(signal.SIGINT)  # one Ctrl-C; the input stays open, as a terminal's does
        try:
            rc = await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            raise AssertionError("Ctrl-C did not end `convlog send` reading its message") from None
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if writer is not None:
            os.close(writer)
    assert rc == 130, err
    assert "Traceback" not in err, err
