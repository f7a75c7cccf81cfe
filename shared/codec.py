"""Encoding and decoding of wire messages.

One encoder and one decoder per type, built once at import.  Decoding failures
become :class:`~shared.errors.BadRequestError` whose message is msgspec's
validation text, which names the offending path (``$.items[0].agent``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from . import messages as m
from .errors import BadRequestError

__all__ = [
    "MAX_DEPTH", "MAX_SAFE_INT", "check_json", "decode", "decode_as", "encode", "encode_envelope_line", "json_ok",
    "numbers_ok", "unencodable",
]

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


def decode_as(decoder: msgspec.json.Decoder[T], data: bytes, what: str) -> T:
    """``decoder.decode(data)``, with JSON nested past msgspec's limit (about 1000
    levels, where it raises ``RecursionError``) raised as the ``DecodeError`` it is.

    Raises:
        msgspec.DecodeError (ValidationError included): ``data`` is not ``what``.
    """
    try:
        return decoder.decode(data)
    except RecursionError as e:
        raise msgspec.DecodeError(f"not {what}: JSON nested too deeply") from e


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


#: How deeply an item's ``data`` may nest objects and arrays (``data`` itself is
#: level 1).  Far beyond any real payload and far below Python's recursion limit
#: (about 1,000 frames), which msgspec, ``json`` and the RFC 8785 reference
#: encoder all count against: without a fixed limit, whether an item nested ~950
#: deep was taken, hashed and read back depended on how deep in its stack each
#: process met it (one append at 975 levels stopped the log service; items at
#: 950-970 made every read of their session fail in a deeper client).
MAX_DEPTH = 100


def numbers_ok(value: Any, *, keys: bool = True) -> bool:
    """The common case, fast: no paths built, only numbers (and object keys)
    inspected (any depth: what a stored log holds, as replay and migrate read it).
    ``keys=False``: ``value`` was decoded from JSON, so its object keys are strings."""
    return _walk(value, sys.maxsize, keys)


def json_ok(value: Any, *, keys: bool = True) -> bool:
    """:func:`numbers_ok`, and nested at most :data:`MAX_DEPTH` levels: what a
    new item may hold (``keys`` as there)."""
    return _walk(value, MAX_DEPTH, keys)


def _walk(value: Any, max_depth: int, keys: bool) -> bool:
    level = [value]
    depth = 0  # containers around the values of `level`
    while level:
        nested: list[Any] = []
        for v in level:
            t = type(v)
            if t is dict or t is list:
                if depth >= max_depth:
                    return False
                if t is list:
                    nested.extend(v)
                    continue
                # JSON would turn 1 into "1", and {1: .., "1": ..} into one key
                if keys and not all(isinstance(k, str) for k in v):
                    return False
                nested.extend(v.values())
            elif t is int:
                if not -MAX_SAFE_INT <= v <= MAX_SAFE_INT:
                    return False
            elif t is float:
                if not math.isfinite(v):
                    return False
            elif t is str or t is bool or v is None:
                continue
            elif isinstance(v, Mapping | tuple | set | frozenset):  # a caller's data, as JSON sends it
                if depth >= max_depth:
                    return False
                if keys and isinstance(v, Mapping) and not all(isinstance(k, str) for k in v):
                    return False
                nested.extend(v.values() if isinstance(v, Mapping) else v)
            elif isinstance(v, int):  # a subclass (an IntEnum)
                if not -MAX_SAFE_INT <= v <= MAX_SAFE_INT:
                    return False
            elif isinstance(v, float) and not math.isfinite(v):  # a subclass (numpy's float64)
                return False
        level = nested
        depth += 1
    return True


def check_json(value: Any, path: str = "$") -> None:
    """Refuse what :func:`json_ok` refuses, naming where it is.

    RFC 8785 numbers are IEEE doubles: integers beyond +/-(2**53-1) would be
    silently rounded and non-finite floats have no JSON form, so both are
    refused at input, and so is nesting deeper than :data:`MAX_DEPTH` and an
    object key that is not a string (JSON would send ``1`` as ``"1"``, and
    ``{1: "a", "1": "b"}`` as one key, keeping one of the values).

    Raises:
        BadRequestError: naming the JSON path and the value.
    """
    if json_ok(value):
        return
    # Something is wrong: walk again, tracking paths, to name it.
    stack = [(value, path, 0)]
    while stack:
        v, p, depth = stack.pop()
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
        elif not isinstance(v, Mapping | list | tuple | set | frozenset):
            continue
        elif depth >= MAX_DEPTH:
            raise BadRequestError(f"{path} nests objects and arrays more than {MAX_DEPTH} levels deep")
        elif isinstance(v, Mapping):
            for k in v:
                if not isinstance(k, str):
                    raise _key_error(p, k)
            stack.extend((item, f"{p}.{k}", depth + 1) for k, item in v.items())
        else:
            stack.extend((item, f"{p}[{i}]", depth + 1) for i, item in enumerate(v))


def unencodable(value: Any, path: str, error: Exception) -> BadRequestError:
    """The error for ``value``, which has no JSON form (msgspec raised ``error``),
    naming where: a string that is not Unicode text (a lone surrogate), an object
    key that is not a string, or a value of a type JSON has no form for."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            if not _is_text(v):
                return BadRequestError(f"text at {p} has a lone surrogate, which has no UTF-8: {v!r}")
        elif isinstance(v, Mapping):
            for k, item in v.items():
                if not isinstance(k, str):
                    return _key_error(p, k)
                if not _is_text(k):
                    return BadRequestError(f"object key at {p} has a lone surrogate, which has no UTF-8: {k!r}")
                stack.append((item, f"{p}.{k}"))
        elif isinstance(v, list | tuple | set | frozenset):
            stack.extend((item, f"{p}[{i}]") for i, item in enumerate(v))
        elif isinstance(v, msgspec.Struct):
            stack.extend((getattr(v, f), f"{p}.{f}") for f in v.__struct_fields__)
        else:
            try:
                _encoder.encode(v)
            except (TypeError, UnicodeEncodeError) as e:
                return BadRequestError(f"value at {p} has no JSON form: {e}")
    return BadRequestError(f"{path} has no JSON form: {error}")


def _key_error(path: str, key: Any) -> BadRequestError:
    return BadRequestError(f"object key at {path} is not a string: {key!r} ({type(key).__name__})")


def _is_text(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True
