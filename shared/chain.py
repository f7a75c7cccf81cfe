"""The RFC 8785 hash chain.

``hash_n = sha256(JCS(obj_n))`` where ``obj_n`` is the envelope without
``hash`` plus ``"prev_hash": hash_{n-1}``, and ``hash_0`` is 64 zeros.  Anyone
with an export and any RFC 8785 implementation can recompute it.  A signed
item's ``sig`` and ``key_id`` are envelope fields like the others: hashed when
present, absent from ``obj_n`` otherwise (so unsigned logs hash as before).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import rfc8785

from .messages import Envelope

__all__ = [
    "GENESIS_HASH", "Problem", "canonical", "envelope_hash", "item_hash", "needs_reference", "sorted_encoder", "verify",
]

GENESIS_HASH = "0" * 64


def needs_reference(value: Any) -> bool:
    """True when the fast encoder might differ from RFC 8785.

    msgspec's JSON encoder with sorted keys produces RFC 8785 bytes for
    strings, integers, booleans and null (same escapes, no whitespace, UTF-8),
    as long as no object key sorts differently by UTF-16 code unit than by
    code point (only keys with characters above U+FFFF can).  Floats use
    ECMAScript number formatting, so they go to the reference implementation.
    The property test in tests/unit/test_chain.py holds the two equal.  Any
    other type (a tuple, a set, a dict subclass, an enum: what a caller's data
    may hold before it is sent as JSON) is encoded differently, too.
    """
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            for k, item in v.items():
                if type(k) is not str or not k.isascii() and max(k) > "\uffff":
                    return True
                if type(item) not in _PLAIN_SCALARS:
                    stack.append(item)
        elif t is list:
            stack.extend(item for item in v if type(item) not in _PLAIN_SCALARS)
        else:  # a float, or not a JSON type
            return True
    return False


_PLAIN_SCALARS = (str, int, bool, type(None))
sorted_encoder = msgspec.json.Encoder(order="sorted")


def canonical(obj: Any) -> bytes:
    """Return the RFC 8785 canonical JSON bytes of ``obj`` as JSON carries it
    (what a verifier decodes from the JSON sent: a tuple or a set is an array,
    in the order sent; an enum its value)."""
    if needs_reference(obj):
        return rfc8785.dumps(_as_sent(obj))
    return sorted_encoder.encode(obj)


def _as_sent(obj: Any) -> Any:
    return _json_decode(_json_encode(obj))


_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


class _Hashed(msgspec.Struct):
    """The hashed object: the envelope without ``hash``, plus ``prev_hash``.

    Fields are declared in RFC 8785 order (sorted by name), so the sorted
    encoder writes them as JCS does without building a dict first.
    """

    agent: str
    created_at: str
    data: dict[str, Any]
    item_id: str
    item_order: int
    kind: str
    prev_hash: str
    session_id: str


class _HashedSigned(msgspec.Struct):
    """:class:`_Hashed` of a signed item, fields again in RFC 8785 order."""

    agent: str
    created_at: str
    data: dict[str, Any]
    item_id: str
    item_order: int
    key_id: str
    kind: str
    prev_hash: str
    session_id: str
    sig: str


def item_hash(
    *,
    session_id: str,
    item_order: int,
    item_id: str,
    agent: str,
    kind: str,
    data: dict[str, Any],
    created_at: str,
    prev_hash: str,
    sig: str | None = None,
    key_id: str | None = None,
) -> str:
    """Compute ``hash_n`` for one envelope's fields and the previous hash.

    ``sig`` and ``key_id`` enter the hashed object only when not ``None``.
    """
    # Only ``data`` can hold floats or non-BMP keys; the other fields are
    # strings and an integer under fixed ASCII keys.
    if needs_reference(data):
        obj_d: dict[str, Any] = {
            "session_id": session_id,
            "item_order": item_order,
            "item_id": item_id,
            "agent": agent,
            "kind": kind,
            "data": data,
            "created_at": created_at,
            "prev_hash": prev_hash,
        }
        if sig is not None:
            obj_d["sig"] = sig
        if key_id is not None:
            obj_d["key_id"] = key_id
        return hashlib.sha256(rfc8785.dumps(obj_d)).hexdigest()
    if sig is not None and key_id is not None:
        signed = _HashedSigned(
            agent, created_at, data, item_id, item_order, key_id, kind, prev_hash, session_id, sig
        )
        return hashlib.sha256(sorted_encoder.encode(signed)).hexdigest()
    if sig is not None or key_id is not None:  # half-signed: hash what is there, exactly
        return hashlib.sha256(canonical({
            "session_id": session_id, "item_order": item_order, "item_id": item_id,
            "agent": agent, "kind": kind, "data": data, "created_at": created_at,
            "prev_hash": prev_hash,
            **({"sig": sig} if sig is not None else {}),
            **({"key_id": key_id} if key_id is not None else {}),
        })).hexdigest()
    obj = _Hashed(agent, created_at, data, item_id, item_order, kind, prev_hash, session_id)
    return hashlib.sha256(sorted_encoder.encode(obj)).hexdigest()


def envelope_hash(env: Envelope, prev_hash: str) -> str:
    """Recompute the hash an envelope should carry, given its predecessor's."""
    return item_hash(
        session_id=env.session_id,
        item_order=env.item_order,
        item_id=env.item_id,
        agent=env.agent,
        kind=env.kind,
        data=env.data,
        created_at=env.created_at,
        prev_hash=prev_hash,
        sig=env.sig,
        key_id=env.key_id,
    )


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a replayed session."""

    item_order: int
    reason: str

    def __str__(self) -> str:
        return f"item_order {self.item_order}: {self.reason}"


def verify(
    envelopes: Iterable[Envelope], *, session_id: str | None = None, after: int = 0, prev_hash: str = GENESIS_HASH
) -> Problem | None:
    """Check contiguity from 1 and the hash chain; return the first problem or ``None``.

    With ``after`` and ``prev_hash`` (item ``after``'s hash), ``envelopes`` are
    checked as continuing a chain verified up to ``after``: a long log is
    verified page by page.

    The reported ``item_order`` is the position where the log stops being
    trustworthy: for an edited envelope its own order, for a removed one the
    order that is missing, for a swap the first out-of-place order.
    """
    prev = prev_hash
    expected = after + 1
    for env in envelopes:
        if session_id is not None and env.session_id != session_id:
            return Problem(expected, f"belongs to session {env.session_id!r}, not {session_id!r}")
        if env.item_order != expected:
            return Problem(expected, f"expected item_order {expected}, found {env.item_order}")
        if envelope_hash(env, prev) != env.hash:
            return Problem(expected, "hash does not match the envelope and its predecessor")
        prev = env.hash
        expected += 1
    return None
