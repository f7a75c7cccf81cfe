"""One error hierarchy keyed by wire code.

Every failure that crosses the wire is a :class:`ConvlogError` subclass whose
``code`` is one of the codes fixed by the contract.  :func:`to_wire` renders an
error as NATS service-API headers plus a JSON body; :func:`from_wire` parses a
reply back into the same typed exception, so callers catch
``ConflictError`` and read ``.last_order`` instead of parsing strings.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

__all__ = [
    "BadRequestError",
    "ConflictError",
    "ConvlogError",
    "ForbiddenError",
    "InvalidSessionIdError",
    "NotFoundError",
    "TooLargeError",
    "UnavailableError",
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "from_wire",
    "to_wire",
]

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"


class ConvlogError(Exception):
    """Base of every error convlog reports.

    Attributes:
        code: the wire code (``bad_request``, ``conflict``, ...).
        message: a human-readable sentence naming the limit and the value.
        extra: additional fields carried in the wire body (e.g. ``last_order``).
    """

    code: ClassVar[str] = "unavailable"
    status: ClassVar[str] = "503"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


class BadRequestError(ConvlogError):
    """The request is malformed, has the wrong shape, or breaks a rule."""

    code = "bad_request"
    status = "400"


class InvalidSessionIdError(BadRequestError):
    """A session id outside ``[A-Za-z0-9_-]{1,128}``."""

    code = "invalid_session_id"
    status = "400"


class TooLargeError(ConvlogError):
    """A body or item over the configured size limit."""

    code = "too_large"
    status = "413"


class ConflictError(ConvlogError):
    """``expected_last`` did not match the session's last order.

    Attributes:
        last_order: the session's actual last ``item_order``.
    """

    code = "conflict"
    status = "409"

    def __init__(self, message: str, *, last_order: int, **extra: Any) -> None:
        super().__init__(message, last_order=last_order, **extra)
        self.last_order = last_order


class ForbiddenError(ConvlogError):
    """The caller may not write this: a missing, unknown or wrong signature,
    or an author its key cannot prove (nothing of the request was written)."""

    code = "forbidden"
    status = "403"


class NotFoundError(ConvlogError):
    """The thing asked for does not exist."""

    code = "not_found"
    status = "404"


class UnavailableError(ConvlogError):
    """The service cannot answer now (store down, timeout, no responders)."""

    code = "unavailable"
    status = "503"


_BY_CODE: dict[str, type[ConvlogError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        InvalidSessionIdError,
        TooLargeError,
        ConflictError,
        ForbiddenError,
        NotFoundError,
        UnavailableError,
    )
}


def to_wire(error: ConvlogError) -> tuple[dict[str, str], bytes]:
    """Render ``error`` as (micro error headers, JSON body)."""
    headers = {ERROR_CODE_HEADER: error.status, ERROR_HEADER: f"{error.code}: {error.message}"[:512]}
    return headers, msgspec.json.encode(error.to_body())


def from_wire(headers: dict[str, str] | None, body: bytes) -> ConvlogError | None:
    """Parse a reply; return the typed error it carries, or ``None`` if it is a success.

    A reply counts as an error when it has the service-error headers or when its
    body is a JSON object with a single ``error`` member.
    """
    has_header = bool(headers) and ERROR_CODE_HEADER in headers
    if not has_header and not body.startswith(b'{"error"'):
        return None
    try:
        parsed = msgspec.json.decode(body)
        detail = parsed["error"]
        code = str(detail.get("code", "unavailable"))
        message = str(detail.get("message", ""))
        extra = {k: v for k, v in detail.items() if k not in ("code", "message")}
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        if not has_header:
            return None
        code = "unavailable"
        message = (headers or {}).get(ERROR_HEADER, "error reply without a body")
        extra = {}
    cls = _BY_CODE.get(code, UnavailableError)
    if cls is ConflictError:
        return ConflictError(message, last_order=int(extra.pop("last_order", -1)), **extra)
    return cls(message, **extra)
