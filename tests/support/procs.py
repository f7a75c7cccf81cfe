"""Run our own services as real subprocesses, stopped by PID in ``finally``.

stdout and stderr go to one log file per process, which tests read with
:meth:`Proc.wait_for_line` / :meth:`Proc.output`::

    with python_module("services.cli.main", "log", log_dir=tmp_path, env=env) as proc:
        proc.wait_for_line(r"log service ready", timeout=10)
        ...
    # the process is stopped here: SIGTERM, wait, then SIGKILL
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

__all__ = [
    "REPO_ROOT", "Proc", "ProcError", "child_pids", "offline_env", "pid_alive", "python_module", "run_cli",
    "service_env", "stop_popen",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout root: the default working directory, so ``-m services...`` imports."""


class ProcError(RuntimeError):
    """A subprocess exited, or did not print what was expected in time."""


class Proc:
    """A subprocess whose output is captured in ``<log_dir>/<name>.log``.

    Args:
        args: the command line.
        log_dir: where the log file goes (usually ``tmp_path``).
        env: the complete environment for the child (``None``: inherit ours).
            ``PYTHONUNBUFFERED=1`` is added unless set, so lines arrive promptly.
        cwd: working directory; defaults to :data:`REPO_ROOT`.
        name: log file stem; defaults to the last argument's basename + a counter.
    """

    _counter = 0

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_dir: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        Proc._counter += 1
        self.args = list(args)
        stem = _slug(name or Path(self.args[-1]).name)
        self.log_path = Path(log_dir) / f"{stem}-{Proc._counter}.log"
        base = dict(os.environ if env is None else env)
        base.setdefault("PYTHONUNBUFFERED", "1")
        self.env = base
        self.cwd = Path(cwd) if cwd is not None else REPO_ROOT
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Launch the process (returns at once; use :meth:`wait_for_line` to sync)."""
        if self._popen is not None:
            raise ProcError(f"{self} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._popen = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd,
            )
        return self

    @property
    def pid(self) -> int:
        """PID of the child."""
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """Exit code (negative signal number if killed), or ``None`` while running."""
        return self._started().poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def output(self) -> str:
        """Everything the process has written so far (stdout and stderr interleaved)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, since: int = 0
    ) -> re.Match[str]:
        """Poll the log until ``pattern`` matches a line (``re.search``, multiline).

        Args:
            pattern: regular expression.
            timeout: seconds to wait.
            since: only look at output after this character offset, e.g.
                ``len(proc.output())`` taken before triggering the line.

        Raises:
            ProcError: the process exited first, or the timeout passed;
                the message includes the output.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.output()
            match = regex.search(text, since)
            if match:
                return match
            if self.returncode is not None:
                # One more read: the line may have landed just before exit.
                match = regex.search(self.output(), since)
                if match:
                    return match
                raise ProcError(
                    f"{self} exited with {self.returncode} before printing "
                    f"{regex.pattern!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise ProcError(f"{self} did not print {regex.pattern!r} in {timeout}s:\n{text}")
            time.sleep(0.02)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit and return the exit code (``subprocess.TimeoutExpired`` on timeout)."""
        return self._started().wait(timeout)

    def terminate(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL and wait. Idempotent.

        Returns:
            The exit code (``-9`` means it had to be killed), ``None`` if never started.
        """
        popen = self._popen
        if popen is None:
            return None
        return stop_popen(popen, timeout)

    def kill9(self) -> None:
        """SIGKILL the process now (a crash) and reap it."""
        popen = self._popen
        if popen is not None and popen.poll() is None:
            popen.kill()
            popen.wait()

    def __enter__(self) -> Self:
        return self.start() if self._popen is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        pid = self._popen.pid if self._popen else None
        return f"Proc({' '.join(self.args[-3:])!r}, pid={pid})"

    def _started(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise ProcError(f"{self} not started")
        return self._popen


def python_module(
    module: str,
    *args: str,
    log_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Proc:
    """A (not yet started) :class:`Proc` for ``python -m module *args`` on this interpreter.

    Use it as a context manager so it is always stopped::

        with python_module("services.cli.main", "worker", "Triage", log_dir=tmp_path, env=env) as p:
            p.wait_for_line("ready")
    """
    return Proc(
        [sys.executable, "-m", module, *args],
        log_dir=log_dir, env=env, cwd=cwd, name=name or " ".join([module, *args]),
    )


def stop_popen(popen: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM ``popen`` if it runs, wait up to ``timeout`` s, then SIGKILL and wait; its exit code."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    return popen.returncode


def child_pids(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children, whichever of its threads started them (Linux /proc)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def outlived(pids: Iterable[int], within: float) -> list[int]:
    """Those of ``pids`` still running after up to ``within`` seconds."""
    pids = list(pids)
    deadline = time.monotonic() + within
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def kill_left(pids: Iterable[int]) -> None:
    """SIGKILL those of ``pids`` still running: what a test's process left behind, by PID."""
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def offline_env() -> dict[str, str]:
    """Our environment for a child without ``CONVLOG_*`` (a developer's settings must
    not leak in) and without a model's key or URL (the offline rules model answers)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("CONVLOG_") and k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}


def service_env(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Our environment minus any ``CONVLOG_*`` (a developer's settings must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env["CONVLOG_DATA_DIR"] = str(data_dir)
    env["CONVLOG_EMBEDDED"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_cli(*args: str, env: Mapping[str, str] | None, timeout: float = 30.0) -> tuple[int, str, str]:  # noqa: ASYNC109
    """Run ``python -m services.cli.main *args`` from the checkout root; (exit code,
    stdout, stderr).  ``env``: its whole environment (``None``: inherit ours).

    The child is killed by its PID if it outlives ``timeout``.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *args, cwd=REPO_ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _slug(text: str) -> str:
    """A file-name-safe stem for a log file."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:60] or "proc"
