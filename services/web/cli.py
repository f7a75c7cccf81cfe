"""``convlog web``: serve the audit console (and :func:`serve`, used by ``demo --web``).

Loopback only by default.  Bound to any other address the console refuses to
start without a token (``--token`` or ``CONVLOG_WEB_TOKEN``), which every
request must then carry as ``Authorization: Bearer`` or as the password of
HTTP basic auth; with ``--certfile``/``--keyfile`` it serves HTTPS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.cli.common import is_loopback_host, port_number
from shared.config import Settings

if TYPE_CHECKING:  # the web stack loads only when the console runs, not for every command
    from shared.client import LogClient

    from .app import WebOptions

__all__ = ["WEB_DESCRIPTION", "run", "serve", "web_arguments"]

EXIT_OK, EXIT_USAGE = 0, 2
CUT_AFTER = 0.5  # seconds a response still being sent may take once the console stops


WEB_DESCRIPTION = (
    "Serve the audit console over the log service: sessions, conversations in agent lanes, "
    "live tail, and a hash-chain check that runs in the reviewer's browser."
)


def web_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``convlog web`` (its entry is in :mod:`services.cli.commands`)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=port_number, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--token", help="require this token: Bearer or basic-auth password "
                   "[CONVLOG_WEB_TOKEN]")
    p.add_argument("--certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--keyfile", help="the certificate's private key (PEM)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: a free one)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


def console_url(sock: socket.socket, *, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}/"


async def serve(client: LogClient, sock: socket.socket, options: WebOptions, stop: asyncio.Event,
                *, certfile: str | None = None, keyfile: str | None = None) -> None:
    """Serve the console on ``sock`` until ``stop`` is set."""
    import uvicorn

    from .app import build_app

    class _Server(uvicorn.Server):
        """uvicorn without its own signal handling: the caller decides when to stop."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # A response still being sent once the others are done (an export whose reader is
            # slow to take it) is cut off as a dropped connection, so its reader sees an
            # incomplete body: uvicorn would wait out its graceful timeout, then cancel it
            # with a traceback.  The live tails end on their own (``stop``).
            stopping = asyncio.ensure_future(super().shutdown(sockets))
            done, _ = await asyncio.wait({stopping}, timeout=CUT_AFTER)
            if not done:  # uvicorn's connection set (<1): without it, its own timeout applies
                for connection in list(getattr(getattr(self, "server_state", None), "connections", ())):
                    transport = getattr(connection, "transport", None)
                    if transport is not None:
                        transport.abort()
            await stopping

    # ``stop`` also ends the live tails: uvicorn would wait for them, then cancel them.
    config = uvicorn.Config(build_app(client, options, stopping=stop), log_level="warning", access_log=False,
                            lifespan="off", ssl_certfile=certfile, ssl_keyfile=keyfile,
                            timeout_graceful_shutdown=2)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="convlog-web")
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        waiter.cancel()
        await task


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM, SIGINT and SIGHUP set ``stop`` (once set, a signal again changes nothing)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    from services.cli.common import connect_client

    from .app import WebOptions

    token = args.token or settings.web_token or None
    loopback = is_loopback_host(args.host)
    if not loopback and not token:
        print(f"convlog web: refusing to serve on {args.host} without a token: set --token or "
              "CONVLOG_WEB_TOKEN (or bind 127.0.0.1)", file=sys.stderr)
        return EXIT_USAGE
    if bool(args.certfile) != bool(args.keyfile):
        print("convlog web: --certfile and --keyfile go together", file=sys.stderr)
        return EXIT_USAGE
    if args.certfile:  # now, not once the console is announced (uvicorn loads them as it starts)
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.certfile, args.keyfile)
        except OSError as e:  # ssl.SSLError too
            print(f"convlog web: --certfile {args.certfile} / --keyfile {args.keyfile}: cannot load the "
                  f"certificate and key: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"convlog web: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    client = await connect_client(settings)
    client.deadline = 10.0
    stop = asyncio.Event()
    stop_on_signals(stop)
    print(f"convlog web: console at {console_url(sock, tls=bool(args.certfile))} "
          f"(NATS {settings.nats_url}{', token required' if token else ''}); Ctrl-C stops it",
          file=sys.stderr, flush=True)
    try:
        await serve(client, sock, WebOptions(token=token, loopback_only=loopback), stop,
                    certfile=args.certfile, keyfile=args.keyfile)
    finally:
        await client.close()
    return EXIT_OK


async def serve_demo_console(client: LogClient, *, nats_url: str, port: int, say: Callable[[str], None]) -> None:
    """``convlog demo --web``: serve the console on loopback until Ctrl-C or SIGTERM.

    ``port`` 8080 busy (or 0): a free port instead, and the URL says which.
    """
    from .app import WebOptions

    try:
        sock = bind("127.0.0.1", port)
    except OSError:
        sock = bind("127.0.0.1", 0)
    stop = asyncio.Event()
    # Left in place once the console stops: the demo then stops its stack, and a signal
    # again (Python's default ended the demo at once) must not leave the stack running.
    stop_on_signals(stop)
    say(f"web console: {console_url(sock)}  (NATS {nats_url}; Ctrl-C stops the console and the stack)")
    await serve(client, sock, WebOptions(), stop)
