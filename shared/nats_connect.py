"""The first connection to NATS: a credentials problem fails at once, in one line.

convlog connects with unlimited reconnects (services outlive server restarts),
and nats-py applies that to the first connection too: a server that refuses
the credentials, or a creds file that is missing, is retried forever, with a
warning every quarter second.  A refusal is not going to heal by itself, so
:func:`connect` gives up on the first one, while the connection is being made,
and says what is wrong with which setting.  Once connected, reconnects stay
unlimited.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client

from .config import ConfigError, Settings
from .nats_seam.login import NonceCheckingClient

__all__ = ["check_credentials", "connect", "open_client"]


class _Stopped(Exception):
    """``stop`` was set while the first connect was under way."""


async def _unless(connecting: Any, stop: asyncio.Event | None) -> None:
    """Await ``connecting``; once ``stop`` is set, cancel it and raise :class:`_Stopped`."""
    if stop is None:
        await connecting
        return
    work = asyncio.ensure_future(connecting)
    halt = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, halt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        halt.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
    if work.cancelled():
        raise _Stopped
    work.result()


async def open_client(*, stop: asyncio.Event | None = None, **options: Any) -> Client:
    """``nats.connect(**options)`` with a :class:`NonceCheckingClient`; ``stop`` set ends
    the first connect (see :func:`connect`).

    Raises:
        nats.errors.ConnectionClosedError: ``stop`` was set first.
    """
    nc = NonceCheckingClient()
    try:
        await _unless(nc.connect(**options), stop)
    except _Stopped:
        await _close(nc)
        raise nats.errors.ConnectionClosedError from None
    return nc


class _Refused(Exception):
    """Raised from nats-py's error callback to end its connect loop."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _refusal(e: BaseException) -> bool:
    """An error no retry can fix: the server refused the credentials, or a
    credentials file cannot be read."""
    if isinstance(e, nats.errors.AuthorizationError):
        return True
    if isinstance(e, nats.errors.Error):
        text = str(e).lower()
        return "authoriz" in text or "authenticat" in text
    return isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError)


def _which(settings: Settings) -> str:
    """The credential settings in use, as a user wrote them."""
    named = [
        f"CONVLOG_CREDS={settings.creds}" if settings.creds else "",
        "CONVLOG_NKEY" if settings.nkey else "",
        f"CONVLOG_USER={settings.user}" if settings.user else "",
        "CONVLOG_TOKEN" if settings.token else "",
    ]
    return ", ".join(n for n in named if n) or "no credentials"


def check_credentials(settings: Settings) -> None:
    """Refuse credentials settings that cannot work, before connecting.

    Raises:
        ConfigError: the creds file cannot be read or is not one, or the
            ``nkeys`` package (nats-py's ``nkeys`` extra) is missing.
    """
    if settings.creds:
        path = Path(settings.creds)
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise ConfigError(f"CONVLOG_CREDS={settings.creds}: cannot read it: {e.strerror or e}") from e
        if "NATS USER JWT" not in text or "NKEY SEED" not in text:
            raise ConfigError(
                f"CONVLOG_CREDS={settings.creds} is not a NATS credentials file "
                "(it needs a user JWT and an nkey seed, as `nsc generate creds` writes them)"
            )
    if settings.creds or settings.nkey:
        try:
            import nkeys  # noqa: F401  (nats-py imports it lazily, at connect)
        except ImportError as e:
            raise ConfigError(
                "NATS credentials (CONVLOG_CREDS / CONVLOG_NKEY) need the nkeys package: "
                "pip install 'nats-py[nkeys]'"
            ) from e


async def connect(settings: Settings, options: dict[str, Any], *, stop: asyncio.Event | None = None) -> Client:
    """``nats.connect(**options)``, except that a refusal ends the first connect,
    and so does ``stop`` (a shutdown begun: a server that accepts the connection
    but never answers is otherwise waited for forever).

    Raises:
        ConfigError: the server refused the credentials (naming the setting
            and the server's words), or they cannot be used.
        nats.errors.ConnectionClosedError: ``stop`` was set first.
    """
    check_credentials(settings)
    on_error = options.get("error_cb")
    connecting = True
    # What goes wrong while connecting is said once the connect ends, unless a
    # refusal ends it: the server closes the socket as it refuses, and the reset
    # may reach nats-py first, a second line that says nothing the refusal does not.
    held: list[Exception] = []

    async def error_cb(e: Exception) -> None:
        if connecting:
            if _refusal(e):
                raise _Refused(e)  # out of nats-py's connect loop
            held.append(e)
        elif on_error is not None:
            await on_error(e)

    async def say_held() -> None:
        nonlocal connecting
        connecting = False
        for e in held if on_error is not None else ():
            await on_error(e)

    nc = NonceCheckingClient()
    try:
        await _unless(nc.connect(**{**options, "error_cb": error_cb}), stop)
    except _Stopped:
        await _close(nc)
        raise nats.errors.ConnectionClosedError from None
    except _Refused as e:
        await _close(nc)
        raise ConfigError(f"NATS refused the connection ({_which(settings)}): {e.error}") from e.error
    except (nats.errors.Error, OSError, TimeoutError):
        await say_held()
        raise
    except Exception as e:  # nats-py or nkeys choking on the credentials
        await say_held()
        await _close(nc)
        if not (settings.creds or settings.nkey):
            raise
        raise ConfigError(f"cannot sign in with {_which(settings)}: {type(e).__name__}: {e}") from e
    await say_held()
    return nc


async def _close(nc: Client) -> None:
    try:
        await nc.close()
    except Exception:
        pass
