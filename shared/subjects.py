"""Subject names and session-id validation.

All subjects live under one prefix (``convlog`` by default).  A session id is
validated *before* it is ever put into a subject, so ``*``, ``>``, dots and
spaces can never widen a subscription or address the wrong session.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadRequestError, InvalidSessionIdError

__all__ = ["SESSION_ID_PATTERN", "Subjects", "inbox_prefix", "validate_session_id"]

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it matches ``[A-Za-z0-9_-]{1,128}``.

    Raises:
        InvalidSessionIdError: for anything else, naming the value.
    """
    # fullmatch: with match(), ``$`` also accepts a trailing newline ("abc\n").
    if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
        shown = repr(session_id)[:80]
        raise InvalidSessionIdError(
            f"session id {shown} is invalid: it must match [A-Za-z0-9_-]{{1,128}}"
        )
    return session_id


def inbox_prefix(key_id: str) -> str:
    """The reply subjects of the nkey user ``key_id``: nats-users.conf lets it subscribe
    to ``<this>.>`` only, and its connections use it as their inbox prefix."""
    return f"_INBOX.{key_id}"


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject builders and parsers for one prefix."""

    prefix: str = "convlog"

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX_RE.fullmatch(self.prefix):
            raise BadRequestError(
                f"subject prefix {self.prefix!r} is invalid: use dot-separated [A-Za-z0-9_-] tokens"
            )

    def inbound(self, sid: str) -> str:
        return f"{self.prefix}.in.{validate_session_id(sid)}"

    def append(self, sid: str) -> str:
        return f"{self.prefix}.append.{validate_session_id(sid)}"

    def read(self, sid: str) -> str:
        return f"{self.prefix}.read.{validate_session_id(sid)}"

    def items(self, sid: str) -> str:
        return f"{self.prefix}.items.{validate_session_id(sid)}"

    @property
    def sessions(self) -> str:
        return f"{self.prefix}.sessions"

    @property
    def inbound_all(self) -> str:
        return f"{self.prefix}.in.>"

    @property
    def append_all(self) -> str:
        return f"{self.prefix}.append.>"

    @property
    def read_all(self) -> str:
        return f"{self.prefix}.read.>"

    @property
    def items_all(self) -> str:
        return f"{self.prefix}.items.>"

    @property
    def stream_name(self) -> str:
        """JetStream stream capturing ``<prefix>.items.>``."""
        return self.prefix.replace(".", "_").upper() + "_ITEMS"

    @property
    def routing_bucket(self) -> str:
        """NATS KV bucket with per-session routing metadata (active agent)."""
        return self.prefix.replace(".", "_") + "_routing"

    @property
    def heads_bucket(self) -> str:
        """NATS KV bucket with each session's latest witness head (services/log/heads.py)."""
        return self.prefix.replace(".", "_") + "_heads"

    def session_of(self, subject: str) -> str:
        """Extract and validate the session id, the last token of ``subject``.

        Raises:
            InvalidSessionIdError: when the token is not a valid session id
                (a subject with extra tokens, e.g. ``convlog.append.a.b``).
        """
        head, _, sid = subject.rpartition(".")
        depth = self.prefix.count(".") + 2
        if head.count(".") + 1 != depth:
            raise InvalidSessionIdError(
                f"subject {subject[:160]!r} does not end in a single valid session id token"
            )
        return validate_session_id(sid)
