"""A guard on nats-py's nkey login: only a nonce shaped as nats-server's is signed.

The seed that logs in (``CONVLOG_NKEY``) is the one that signs items
(``CONVLOG_SIGNING_KEY``), and nats-py signs the server's nonce as it is: a
server that is not nats-server (an impostor on the path, the host of the NATS
server a worker connects to) could send an item's signing input as the nonce
and get the agent's signature of it.  nats-py has no public hook between its
nkey setup and the signing, so :class:`NonceCheckingClient` wraps what
``Client._setup_nkeys_connect`` leaves in ``Client._signature_cb``.  Where
those names are missing (a nats-py outside the tested range) the login is
nats-py's own, and :func:`guard_missing` says why (logged once at connect).
``tests/integration/test_nkey_nonce.py`` sees the guard work.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import nats.errors
from nats.aio.client import Client

__all__ = ["NonceCheckingClient", "guard_missing"]

log = logging.getLogger("convlog.nats")

#: A nonce as nats-server makes them (base64url of random bytes).  Every convlog
#: signing input starts ``convlog-...-v1\n``, so it can never be one.
NONCE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def guard_missing() -> str:
    """Why the nonce guard cannot be installed ("" when it can)."""
    if not callable(getattr(Client, "_setup_nkeys_connect", None)):
        return "nats-py has no Client._setup_nkeys_connect"
    if not hasattr(Client(), "_signature_cb"):
        return "nats-py's Client has no _signature_cb"
    return ""


_MISSING = guard_missing()
_warned: list[str] = []


def build_message_fits(client: type = Client) -> bool:
    """Whether ``client._build_message`` takes what :class:`NonceCheckingClient`'s
    override passes on (its parameters in the tested nats-py); else the override
    is left out and nats-py's own runs (a subject that is not UTF-8 then stops the
    connection's read loop, as in nats-py)."""
    import inspect

    fn = getattr(client, "_build_message", None)
    try:
        names = list(inspect.signature(fn).parameters) if callable(fn) else []
    except (TypeError, ValueError):
        return False
    return names == ["self", "sid", "subject", "reply", "data", "headers"]


class NonceCheckingClient(Client):
    """nats-py's client, except that its nkey login signs only a nonce shaped as
    nats-server's (see the module docstring)."""

    def _setup_nkeys_connect(self) -> None:
        super()._setup_nkeys_connect()
        if _MISSING:
            if not _warned:
                _warned.append(_MISSING)
                log.warning("the nkey login signs any nonce the server sends (%s): connect only to "
                            "servers you trust, over TLS", _MISSING)
            return
        sign: Any = self._signature_cb
        if sign is None:
            return

        def sign_nonce(nonce: str) -> bytes:
            if not NONCE.fullmatch(nonce):
                raise nats.errors.Error(
                    f"nkey authentication: the server's nonce {nonce[:40]!r} is not one nats-server "
                    "makes; not signed (it could be a convlog signing input)"
                )
            return sign(nonce)

        self._signature_cb = sign_nonce

    def _utf8_build_message(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
        """nats-py's, except for a subject or reply subject that is not UTF-8.

        nats-server passes any bytes but whitespace in a subject, and nats-py's
        ``bytes.decode()`` of one raised in its read loop, which then stopped for
        good: one ``PUB convlog.read.\xff`` left the log service connected and deaf.
        Such a subject is delivered with U+FFFD for its bad bytes (no session id
        has them: refused as ``invalid_session_id``); a reply subject that is not
        UTF-8 cannot be answered, and is dropped.
        """
        try:
            return super()._build_message(sid, subject, reply, data, headers)
        except UnicodeDecodeError:
            subject = subject.decode(errors="replace").encode()
            try:
                reply.decode()
            except UnicodeDecodeError:
                reply = b""
            return super()._build_message(sid, subject, reply, data, headers)


if build_message_fits():
    NonceCheckingClient._build_message = NonceCheckingClient._utf8_build_message  # type: ignore[method-assign]
