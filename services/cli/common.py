"""What every ``convlog`` command shares: exit codes, the argument parser and
its value types, the connection options, reaching NATS and the log service,
signal handling.  Command modules import this; nothing here imports them.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from shared.config import Settings, nats_servers
from shared.errors import UnavailableError

__all__ = [
    "is_loopback_host",
    "cancelled_by_signals",
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "Parser",
    "connect_client",
    "connection_arguments",
    "install_signal_handlers",
    "is_loopback",
    "maybe_embedded_nats",
    "non_negative_float",
    "non_negative_int",
    "packaged_agents_path",
    "port_number",
    "positive_float",
    "item_order",
    "positive_int",
    "require_nats",
    "setting_source",
    "stderr",
]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 124

#: A person is waiting: give up on a missing log service within seconds.
CLI_DEADLINE = 8.0


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, minimum: float, what: str, maximum: float = float("inf")) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not minimum <= value <= maximum or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


#: ``type=`` for counts that must be at least 1 (``--count``, ``--limit``, ...).
positive_int = _number(int, 1, "a whole number of at least 1")
#: ``type=`` for counts that may be 0.
non_negative_int = _number(int, 0, "a whole number of at least 0")
#: ``type=`` for an item order that may be 0 (``--after``): at most the contract's largest
#: order, 2**53 - 1 (a larger one was sent and refused in the service's own words).
item_order = _number(int, 0, f"an item order from 0 to {2**53 - 1}", 2**53 - 1)


def port_number(text: str) -> int:
    """``type=`` for a TCP port to listen on (0: a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """``type=`` for durations that may be 0 (``--grace``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds of at least 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """``type=`` for durations that must be above 0 (``--timeout``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def connection_arguments(p: argparse.ArgumentParser) -> None:
    """The options every command that talks to NATS or the store takes."""
    g = p.add_argument_group("connection and storage (flags > CONVLOG_* env > defaults)")
    g.add_argument("--nats-url", help="NATS server URL(s), comma-separated [CONVLOG_NATS_URL]")
    g.add_argument("--prefix", help="subject prefix [CONVLOG_PREFIX, default convlog]")
    g.add_argument("--data-dir", help="data directory [CONVLOG_DATA_DIR]")
    g.add_argument("--creds", help="NATS credentials file [CONVLOG_CREDS]")
    g.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL [CONVLOG_LOG_LEVEL]")
    g.add_argument("--no-embedded", dest="embedded", action="store_const", const=False,
                   help="never start a local nats-server [CONVLOG_EMBEDDED=false]")


def setting_source(args: argparse.Namespace, name: str) -> str:
    """What set the setting ``name``, to name it in a message: its flag when the
    command line gave it, else its ``CONVLOG_*`` variable."""
    if getattr(args, name, None) is not None:
        return f"--{name.replace('_', '-')}"
    return f"CONVLOG_{name.upper()}"


def packaged_agents_path() -> Path:
    """The agents spec shipped in the package (the seed's support system)."""
    return Path(str(resources.files("services.cli").joinpath("data/agents.toml")))


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP literal (any of 127/8, ``::1``, bracketed or not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback(url: str) -> bool:
    host = nats_servers(url)[0][0]
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def require_nats(settings: Settings) -> None:
    from .stack import nats_answers

    if not nats_answers(settings.nats_url):
        raise UnavailableError(
            f"no NATS server answers at {settings.nats_url}; start the stack with `convlog up` "
            "(or `convlog log`), or set CONVLOG_NATS_URL"
        )


def maybe_embedded_nats(settings: Settings, data_dir: Path) -> Any:
    """Start a local nats-server when none answers at a loopback URL (embedded default).

    Its JetStream store is ``data_dir/jetstream``, the same directory ``convlog
    up`` gives the nats-server it starts, so both see the same streams.
    """
    from .stack import EmbeddedNats, nats_answers

    if nats_answers(settings.nats_url):
        return None
    if not settings.embedded or not is_loopback(settings.nats_url):
        raise UnavailableError(
            f"no NATS server answers at {settings.nats_url} (start one, or allow the embedded "
            "server by unsetting CONVLOG_EMBEDDED=false and using a loopback URL)"
        )
    host, port = nats_servers(settings.nats_url)[0]
    server = EmbeddedNats(data_dir, host=host, port=port)
    server.start()
    return server


async def connect_client(settings: Settings) -> Any:
    """A :class:`LogClient` for a command a person waits on.

    Says at once when nothing serves the log subjects (instead of retrying
    "no responders" until the deadline).

    Raises:
        UnavailableError: no NATS server, or no log service on it.
    """
    import nats.errors

    from shared.client import LogClient

    require_nats(settings)
    try:
        # Within the deadline: something at the URL that accepts connections but is not
        # NATS (another program's port) was retried forever, the command hung with no word.
        async with asyncio.timeout(CLI_DEADLINE):
            client = await LogClient.connect(settings=settings, name="convlog-cli")
    except TimeoutError:
        raise UnavailableError(
            f"cannot connect to NATS at {settings.nats_url}: no NATS server answered within "
            f"{CLI_DEADLINE:g} s (is it a NATS port?)"
        ) from None
    except (OSError, nats.errors.Error) as e:
        raise UnavailableError(f"cannot connect to NATS at {settings.nats_url}: {e}") from e
    client.deadline = CLI_DEADLINE
    subject = client.subjects.sessions
    try:
        await client.nc.request(subject, b'{"limit":1}', timeout=min(CLI_DEADLINE, 3.0))
    except nats.errors.NoRespondersError:
        await client.close()
        raise UnavailableError(
            f"the log service is not running (nothing answers {subject} at {settings.nats_url}); "
            "start it with `convlog log` or the whole stack with `convlog up`"
        ) from None
    except nats.errors.TimeoutError:
        pass  # a busy service: the command's own deadline decides
    return client


async def stopped_by_signals(coro: Awaitable[object]) -> bool:
    """Await ``coro`` (a wait before a service starts, e.g. for JetStream); SIGTERM or
    SIGHUP cancel it (:func:`cancelled_by_signals`), and then ``True`` comes back: the
    caller stops as a service stopped while starting does (exit 0), where Python's
    default ended the process (status -15) with nothing said."""

    async def waited() -> int:
        await coro
        return EXIT_OK

    return await cancelled_by_signals(waited()) != EXIT_OK


async def cancelled_by_signals(coro: Awaitable[int]) -> int:
    """Run ``coro``; SIGTERM or SIGHUP cancel it, so its ``finally`` blocks stop what it
    started (Python's default ends the process at once and leaves its children running),
    and the exit status is then 128+N, as a shell says.  Only the first signal cancels:
    another must not cancel those ``finally`` blocks while they stop what was started.
    Ctrl-C stays asyncio's own (KeyboardInterrupt, exit 130)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signals = (signal.SIGTERM, signal.SIGHUP)
    got: list[int] = []

    def stop(sig: int) -> None:
        got.append(sig)
        if len(got) == 1:
            task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        code = await coro
    except asyncio.CancelledError:
        if not got:
            raise  # not ours
        return 128 + got[0]
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    # A cancel the coroutine swallowed (Python 3.11's wait_for, under nats-py, returns a
    # result that lands with it) still ends the command as the signal does.
    return 128 + got[0] if got else code


def install_signal_handlers(on_signal: Callable[[], Awaitable[None]]) -> set[asyncio.Task[None]]:
    """SIGTERM/SIGINT/SIGHUP start a graceful shutdown (once).

    SIGHUP too (a closed terminal, ``kill -HUP``): Python's default ended the
    process at once, leaving the embedded nats-server of ``convlog log`` running.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def fire() -> None:
        if not tasks:
            tasks.add(loop.create_task(on_signal()))

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, fire)
    return tasks


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
