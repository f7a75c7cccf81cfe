"""Compare-and-set on a NATS KV key that only moves forward: what the routing
writer and the head witness store, where several log-service instances may
write the same key and an older value must never replace a newer one."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors

__all__ = ["put_forward"]

_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)


async def put_forward(
    kv: Any, key: str, value_over: Callable[[bytes | None], bytes | None | Awaitable[bytes | None]], *,
    attempts: int = 10,
) -> bool | None:
    """Write ``value_over(current)`` to ``key`` with compare-and-set on its revision
    (``current``: the stored value, ``None`` when there is none; ``value_over`` may be
    a coroutine function); a key written meanwhile is read again and decided again.

    Returns:
        True: written; False: ``value_over`` returned ``None`` (what is stored is as
        new or newer); None: written by others under every one of ``attempts`` tries.
    """
    for _ in range(attempts):
        try:
            entry = await kv.get(key)
        except _MISSING:
            entry = None
        value = value_over(entry.value if entry is not None else None)
        if inspect.isawaitable(value):
            value = await value
        if value is None:
            return False
        try:
            if entry is None:
                await kv.create(key, value)
            else:
                await kv.update(key, value, last=entry.revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # written meanwhile: look again
    return None
