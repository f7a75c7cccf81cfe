"""Encoding and decoding of wire messages.

One encoder and one decoder per type, built once at import.  Decoding failures
become :class:`~shared.errors.BadRequestError` whose message is msgspec's
validation text, which names the offending path (``$.items[0].agent``).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import msgspec

from . import messages as m
from .errors import BadRequestError

__all__ = ["MAX_SAFE_INT", "check_json_numbers", "decode", "encode", "encode_envelope_line", "numbers_ok"]

T = TypeVar("T")
MAX_SAFE_INT = 2**53 - 1

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {
    cls: msgspec.json.Decoder(cls)
    for cls in (
        m.AppendRequest,
        m.AppendReply,
        m.ReadRequest,
        m.ReadReply,
        m.SessionsRequest,
        m.SessionsReply,
        m.UserMessage,
        m.Envelope,
    )
}


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain JSON value) as compact UTF-8 JSON."""
    return _encoder.encode(obj)


def encode_envelope_line(env: m.Envelope) -> bytes:
    """One JSONL line of an export (no trailing newline)."""
    return _encoder.encode(env)


def decode(data: bytes, type_: type[T], *, empty_ok: bool = True) -> T:
    """Decode ``data`` strictly as ``type_``.

    An empty body decodes as ``{}`` when ``empty_ok`` (requests whose fields
    all have defaults).

    Raises:
        BadRequestError: malformed JSON, wrong shape, unknown field, or a number
            JSON canonicalization cannot represent exactly.
    """
    if not data.strip():
        if not empty_ok:
            raise BadRequestError(f"empty body: {type_.__name__} needs a JSON object")
        data = b"{}"
    try:
        value = _decoders[type_].decode(data)
    except msgspec.ValidationError as e:
        raise BadRequestError(f"invalid {type_.__name__}: {e}") from e
    except msgspec.DecodeError as e:
        raise BadRequestError(f"malformed JSON: {e}") from e
    except RecursionError as e:  # msgspec's nesting limit (about 1000 levels)
        raise BadRequestError(f"invalid {type_.__name__}: JSON nested too deeply") from e
    if type_ is m.AppendRequest and (problem := m.signature_shape_error(value)) is not None:  # type: ignore[arg-type]
        raise BadRequestError(f"invalid {type_.__name__}: {problem}")
    return value


def numbers_ok(value: Any) -> bool:
    """The common case, fast: no paths built, only numbers inspected."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
        elif t is int:
            if not -MAX_SAFE_INT <= v <= MAX_SAFE_INT:
                return False
        elif t is float and not math.isfinite(v):
            return False
    return True


def check_json_numbers(value: Any, path: str = "$") -> None:
    """Refuse numbers that RFC 8785 cannot represent exactly.

    RFC 8785 numbers are IEEE doubles: integers beyond +/-(2**53-1) would be
    silently rounded and non-finite floats have no JSON form, so both are
    refused at input.

    Raises:
        BadRequestError: naming the JSON path and the value.
    """
    if numbers_ok(value):
        return
    # Something is out of range: walk again, tracking paths, to name it.
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if isinstance(v, int):
            if not -MAX_SAFE_INT <= v <= MAX_SAFE_INT:
                raise BadRequestError(
                    f"integer at {p} is outside +/-(2**53-1) and cannot be hashed exactly: {v}"
                )
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise BadRequestError(f"number at {p} is not finite: {v}")
        elif isinstance(v, dict):
            stack.extend((item, f"{p}.{k}") for k, item in v.items())
        elif isinstance(v, list):
            stack.extend((item, f"{p}[{i}]") for i, item in enumerate(v))
