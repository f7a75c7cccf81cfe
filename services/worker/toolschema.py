"""Function tools: import a callable by path and describe it as a JSON schema.

The schema is built from the signature: every parameter must be annotated with
``str``, ``int``, ``float``, ``bool``, ``list``/``list[X]``, ``dict``/``dict[str, X]``,
``Literal[...]`` of strings or numbers, or ``X | None`` / ``Optional[X]`` of
those.  Parameters without a default are required.  Per-parameter
descriptions come from a Google-style ``Args:`` section of the docstring.

A parameter named ``idempotency_key`` (annotated ``str`` or ``str | None``) is
left out of the schema: the worker fills it with the call's idempotency key
(see :mod:`.tools`), never the model.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["IDEMPOTENCY_KEY", "ToolSchemaError", "describe_callable", "import_callable"]

#: The parameter through which a tool receives its call's idempotency key.
IDEMPOTENCY_KEY = "idempotency_key"

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters):\s*$")
_ARG_LINE = re.compile(r"^\s+(\*{0,2}\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


class ToolSchemaError(ValueError):
    """The import path or the callable's signature cannot become a tool."""


def import_callable(import_path: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (``function`` may be dotted, ``Cls.method``).

    Raises:
        ToolSchemaError: the path is malformed, the module cannot be imported,
            the attribute is missing or not callable.
    """
    module_name, sep, attr_path = import_path.partition(":")
    if not sep or not module_name or not attr_path:
        raise ToolSchemaError("import path must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ToolSchemaError(f"cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a relative path (TypeError), the module's own error
        # (a SyntaxError, what its top level raises): a traceback, exit 1, instead of one line
        raise ToolSchemaError(f"cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ToolSchemaError(
                f"module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(obj):
        raise ToolSchemaError(f"{attr_path!r} is not callable")
    return obj


def describe_callable(fn: Callable[..., Any]) -> tuple[str, str, dict[str, Any]]:
    """Return ``(name, description, parameters_json_schema)`` for a tool callable.

    The description is the docstring's first line (empty if there is none).

    Raises:
        ToolSchemaError: a parameter is positional-only, variadic, unannotated
            or annotated with an unsupported type.
    """
    name = getattr(fn, "__name__", type(fn).__name__)
    doc = inspect.getdoc(fn) or ""
    description = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    arg_docs = _arg_descriptions(doc)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # unresolvable forward references, bad annotations
        raise ToolSchemaError(f"cannot resolve type annotations: {e}") from e
    try:
        signature = inspect.signature(fn)
    except (ValueError, TypeError) as e:  # a builtin type such as dict: a traceback, exit 1
        raise ToolSchemaError(f"cannot read its parameters: {e}") from e
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolSchemaError(f"parameter {param.name!r}: *args/**kwargs are not supported")
        if param.kind is param.POSITIONAL_ONLY:
            raise ToolSchemaError(f"parameter {param.name!r}: positional-only is not supported")
        if param.name not in hints:
            raise ToolSchemaError(f"parameter {param.name!r} has no type annotation")
        if param.name == IDEMPOTENCY_KEY:
            if hints[param.name] not in (str, str | None):
                raise ToolSchemaError(
                    f"parameter {IDEMPOTENCY_KEY!r} must be annotated str (the worker passes "
                    "the call's idempotency key)"
                )
            continue  # filled in by the worker, not shown to the model
        try:
            prop = _schema_for(hints[param.name])
        except ToolSchemaError as e:
            raise ToolSchemaError(f"parameter {param.name!r}: {e}") from None
        if param.name in arg_docs:
            prop["description"] = arg_docs[param.name]
        if param.default is param.empty:
            required.append(param.name)
        elif _json_literal(param.default):
            prop["default"] = param.default
        properties[param.name] = prop
    schema = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return name, description, schema


def _schema_for(annotation: Any) -> dict[str, Any]:
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    if annotation is list:
        return {"type": "array"}
    if annotation is dict:
        return {"type": "object"}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and len(args) == 2:
            inner = _schema_for(members[0])
            if "type" in inner:
                inner["type"] = [inner["type"], "null"]
            else:  # enums: allow null as one more value
                inner["enum"] = [*inner["enum"], None]
            return inner
        raise ToolSchemaError(f"unsupported union {annotation!r} (only X | None)")
    if origin is list:
        return {"type": "array", "items": _schema_for(args[0])} if args else {"type": "array"}
    if origin is dict:
        if args and args[0] is not str:
            raise ToolSchemaError("dict keys must be str")
        schema: dict[str, Any] = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = _schema_for(args[1])
        return schema
    if origin is typing.Literal:
        if not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in args):
            raise ToolSchemaError("Literal values must be strings or numbers")
        return {"enum": list(args)}
    raise ToolSchemaError(f"unsupported type annotation {annotation!r}")


def _arg_descriptions(doc: str) -> dict[str, str]:
    """Parse a Google-style ``Args:`` section into ``{name: first line}``."""
    out: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        if _ARGS_HEADER.match(line):
            in_args = True
            continue
        if in_args:
            if line.strip() and not line.startswith((" ", "\t")):
                break  # next section
            m = _ARG_LINE.match(line)
            if m and m.group(2):
                out[m.group(1).lstrip("*")] = m.group(2).strip()
    return out


def _json_literal(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)
