"""The log service as a real subprocess.

Used by the fault and property tests::

    svc = LogServiceProc(nats_server.url, db_path, log_dir=tmp_path).start()
    svc.kill9(); svc.start()            # a crash and a restart on the same file
    ...
    svc.stop()                          # always, in ``finally`` (fixtures do it)

Every process is started with :data:`sys.executable` from the checkout root,
talks to 127.0.0.1 only, and is stopped by its own PID.  The load writers are
in :mod:`.load`, the end-state checks in :mod:`.logcheck`; both are
re-exported here.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from .load import (
    Acks,
    ack_count,
    read_acks,
    release_together,
    start_writers,
    wait_for_acks,
    writer_proc,
    writer_procs,
)
from .logcheck import (
    SUBJECTS,
    assert_load_kept,
    check_session,
    check_sessions,
    following,
    read_stream,
    stream_matches_log,
)
from .procs import Proc, ProcError, service_env

__all__ = [
    "READY_LINE",
    "SUBJECTS",
    "Acks",
    "ack_count",
    "LogServiceProc",
    "assert_load_kept",
    "check_session",
    "check_sessions",
    "following",
    "log_services",
    "read_acks",
    "read_stream",
    "release_together",
    "service_env",
    "start_writers",
    "stream_matches_log",
    "wait_for_acks",
    "writer_proc",
    "writer_procs",
]

READY_LINE = r"log service ready"


class LogServiceProc:
    """``python -m services.cli.main log --nats-url URL --db PATH --no-embedded``.

    Each :meth:`start` launches a new process on the same database file (its
    log file is numbered), so crash/restart cycles are ``kill9()`` + ``start()``.
    """

    def __init__(
        self, nats_url: str, db: str | os.PathLike[str], *, log_dir: str | os.PathLike[str], store: str = "sqlite",
        env: Mapping[str, str] | None = None, name: str = "log-service",
    ) -> None:
        self.store = store
        self.extra_env = dict(env or {})  # CONVLOG_* settings on top of service_env()
        self.name = name
        self.nats_url = nats_url
        self.db = Path(db)
        self.log_dir = Path(log_dir)
        self.proc: Proc | None = None
        self.starts = 0
        self._paused = False

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> LogServiceProc:
        """Start a new process and wait for its ready line (unless ``wait`` is false).

        Raises:
            ProcError: it exited or did not become ready (the message has its output).
        """
        if self.proc is not None and self.proc.running:
            raise ProcError(f"log service already running (pid {self.proc.pid})")
        self.starts += 1
        self.proc = Proc(
            [sys.executable, "-m", "services.cli.main", "log", "--nats-url", self.nats_url,
             "--db", str(self.db), "--no-embedded", "--store", self.store],
            log_dir=self.log_dir, env={**service_env(self.log_dir / "convlog-data"), **self.extra_env},
            name=f"{self.name}-{self.starts}",
        ).start()
        self._paused = False
        if not wait:
            return self
        try:
            self.proc.wait_for_line(READY_LINE, timeout=timeout)
        except BaseException:
            self.proc.kill9()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "log service not started"
        return self.proc.pid

    def kill9(self) -> None:
        """SIGKILL the running process (a crash) and reap it."""
        if self.proc is not None:
            self.proc.kill9()
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: the process keeps its connections but answers nothing."""
        if self.proc is not None and self.proc.running and not self._paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused process."""
        if self.proc is not None and self._paused:
            if self.proc.running:
                os.kill(self.proc.pid, signal.SIGCONT)
            self._paused = False

    def stop(self, timeout: float = 10.0) -> int | None:
        """Graceful stop (SIGTERM, wait, then SIGKILL), by PID. Idempotent."""
        if self.proc is None:
            return None
        self.resume()  # a stopped process would not act on SIGTERM
        return self.proc.terminate(timeout)

    def output(self) -> str:
        return self.proc.output() if self.proc is not None else ""


# -- fixtures (re-exported by the fault and property conftests) ----------------


@pytest.fixture
def log_services(tmp_path: Path) -> Iterator[Callable[..., LogServiceProc]]:
    """Start log services: ``log_services(nats_url, db)`` -> a started :class:`LogServiceProc`.

    Every one is stopped by PID in teardown (resumed first if paused).
    """
    started: list[LogServiceProc] = []

    def factory(nats_url: str, db: str | os.PathLike[str]) -> LogServiceProc:
        svc = LogServiceProc(nats_url, db, log_dir=tmp_path)
        started.append(svc)
        return svc.start()

    try:
        yield factory
    finally:
        for svc in started:
            svc.stop()
