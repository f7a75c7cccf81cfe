"""Every message on the wire, as frozen msgspec Structs.

Inbound requests forbid unknown fields, so a typo such as ``expectd_last`` is
refused instead of silently ignored.  New fields must always get defaults.
Field names and shapes are fixed by the contract (DESIGN.md).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "AgentName",
    "AppendItem",
    "AppendReply",
    "AppendRequest",
    "AppendedItem",
    "Envelope",
    "ErrorBody",
    "ErrorDetail",
    "ItemId",
    "KeyId",
    "Kind",
    "MAX_APPEND_ITEMS",
    "NonNegInt",
    "Order",
    "ReadReply",
    "ReadRequest",
    "SessionId",
    "SessionInfo",
    "SessionsReply",
    "SessionsRequest",
    "KEY_ID_PATTERN",
    "SIG_PATTERN",
    "SignedHead",
    "Sig",
    "UserMessage",
    "null_optional_field",
    "signature_shape_error",
]

# `\Z`, not `$`: in Python regexes `$` also matches before a trailing newline.
SessionId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,128}\Z")]
ItemId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:@=+/-]{1,200}\Z")]
AgentName = Annotated[str, Meta(pattern=r"^[^\x00-\x1f\x7f]{1,128}\Z")]
Order = Annotated[int, Meta(ge=1, le=2**53 - 1)]
NonNegInt = Annotated[int, Meta(ge=0, le=2**53 - 1)]
PageLimit = Annotated[int, Meta(ge=1, le=100_000)]
Kind = Literal["item", "retract", "clear"]
#: Most items one append may carry.  Checked after decoding (not as the
#: field's ``max_length``) so that a longer batch is ``too_large``, as every
#: size limit is, and not ``bad_request``.
MAX_APPEND_ITEMS = 10_000


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A committed item, exactly as stored, served, published and exported.

    ``sig`` and ``key_id`` are present only on signed items (see
    :mod:`shared.signing`); absent, the envelope and its hash are as before.
    """

    session_id: str
    item_order: int
    item_id: str
    agent: str
    kind: Kind
    data: dict[str, Any]
    created_at: str
    hash: str
    sig: str | None = None
    key_id: str | None = None


class _Optional(msgspec.Struct):
    sig: Any = msgspec.UNSET
    key_id: Any = msgspec.UNSET


_optional = msgspec.json.Decoder(_Optional)


def null_optional_field(raw: bytes | str) -> str | None:
    """The optional field (``sig`` or ``key_id``) an envelope's JSON sets to ``null``, or ``None``.

    A decoded :class:`Envelope` cannot tell ``null`` from absent, but the hash can:
    ``"sig": null`` is a field to RFC 8785 (and the web console), so such an
    envelope is not one the log wrote and hashed.
    """
    if ("null" if isinstance(raw, str) else b"null") not in raw:
        return None
    o = _optional.decode(raw)
    return "sig" if o.sig is None else "key_id" if o.key_id is None else None


#: base64url Ed25519 signature (86 characters) and nkey public key (56).
#: An Ed25519 signature, base64url; or a batch signature with its Merkle path
#: (``<signature>.<path>``, up to 16 steps of 33 bytes; see shared/signing.py).
SIG_PATTERN = r"^[A-Za-z0-9_-]{86}(?:\.[A-Za-z0-9_-]{44,704})?\Z"
KEY_ID_PATTERN = r"^U[A-Z2-7]{55}\Z"
Sig = Annotated[str, Meta(pattern=SIG_PATTERN)]
KeyId = Annotated[str, Meta(pattern=KEY_ID_PATTERN)]
_SIG = re.compile(SIG_PATTERN)
_KEY_ID = re.compile(KEY_ID_PATTERN)
_KEY_IDS_KEPT = 1024
_good_key_ids: set[str] = set()  # key ids that matched lately (one signer's appends share one)


def signature_shape_error(req: AppendRequest) -> str | None:
    """What is wrong with the shape of an append's ``sig`` or ``key_id`` fields, as
    msgspec says it of a :data:`Sig` or :data:`KeyId` (``None``: nothing).

    :class:`AppendItem` declares them as plain strings and :func:`shared.codec.decode`
    checks them here, after decoding, with the same patterns: msgspec's call of a
    pattern per field cost a signed append's decoding 2 us, more than the regexes.
    """
    for i, it in enumerate(req.items):
        sig, key_id = it.sig, it.key_id
        if sig is not None and not _SIG.search(sig):
            return f"Expected `str` matching regex {SIG_PATTERN!r} - at `$.items[{i}].sig`"
        if key_id is not None and key_id not in _good_key_ids:
            if not _KEY_ID.search(key_id):
                return f"Expected `str` matching regex {KEY_ID_PATTERN!r} - at `$.items[{i}].key_id`"
            if len(_good_key_ids) >= _KEY_IDS_KEPT:
                _good_key_ids.clear()
            _good_key_ids.add(key_id)
    return None


class AppendItem(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One item to append; ``item_id`` is assigned by the client if missing.

    ``sig`` is a :data:`Sig` and ``key_id`` a :data:`KeyId`, checked after decoding
    (:func:`signature_shape_error`)."""

    agent: AgentName
    data: dict[str, Any] = {}
    kind: Kind = "item"
    item_id: ItemId | None = None
    sig: str | None = None
    key_id: str | None = None


class AppendRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``convlog.append.<sid>``: all items get contiguous orders, or none are written.

    At most :data:`MAX_APPEND_ITEMS` items (the log service refuses more with
    ``too_large``)."""

    items: Annotated[list[AppendItem], Meta(min_length=1)]
    expected_last: NonNegInt | None = None


class AppendedItem(msgspec.Struct, frozen=True, kw_only=True):
    item_order: int
    item_id: str
    hash: str
    duplicate: bool = False


class AppendReply(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    first_order: int
    last_order: int
    items: list[AppendedItem]


class ReadRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """``convlog.read.<sid>``: ``after``+``limit`` pages forward; ``tail`` gives the
    last n visible items; ``raw`` gives every envelope (audit); ``head`` asks for
    the session's head signed by the log service (when it has a key)."""

    after: NonNegInt | None = None
    limit: PageLimit | None = None
    tail: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    raw: bool = False
    head: bool = False


class SignedHead(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The log service's signed statement: session ``session_id`` had
    ``item_order`` items ending in ``hash`` at ``signed_at`` (see shared.signing)."""

    session_id: str
    item_order: int
    hash: str
    signed_at: str
    key_id: str
    sig: str


class ReadReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    session_id: str
    items: list[Envelope]
    last_order: int
    more: bool
    head: SignedHead | None = None


class SessionsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    after: SessionId | None = None
    limit: PageLimit | None = None


class SessionInfo(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    last_order: int
    updated_at: str


class SessionsReply(msgspec.Struct, frozen=True, kw_only=True):
    sessions: list[SessionInfo]
    more: bool


class UserMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """``convlog.in.<sid>``: a user message; ``to`` picks the entry agent of a new session.

    ``sig`` signs the item the message becomes (stored with it); ``to_sig``,
    by the same key, signs the ``to`` (routing metadata, kept outside the log),
    so an edited ``to`` is refused (``shared.signing.route_signing_input``).
    """

    content: str
    item_id: ItemId | None = None
    to: AgentName | None = None
    sig: Sig | None = None
    key_id: KeyId | None = None
    to_sig: Sig | None = None


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str
    last_order: int | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorDetail
