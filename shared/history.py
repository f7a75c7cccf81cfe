"""The visible-history projection.

The visible history of a session is its ``item`` envelopes minus those hidden
by a later ``retract`` (``{"target": n}``) or ``clear`` (hides every earlier
item).  Agents and the SDK adapter see visible history; audit replay sees all.
"""

from __future__ import annotations

from collections.abc import Iterable

from .messages import Envelope

__all__ = ["retract_target", "visible"]


def retract_target(env: Envelope) -> int | None:
    """The order a ``retract`` envelope hides, or ``None`` for other kinds."""
    if env.kind != "retract":
        return None
    target = env.data.get("target")
    return target if isinstance(target, int) and not isinstance(target, bool) else None


def visible(envelopes: Iterable[Envelope]) -> list[Envelope]:
    """Fold raw envelopes (in ``item_order``) into the visible items, in order."""
    out: list[Envelope] = []
    hidden: set[int] = set()
    for env in envelopes:
        if env.kind == "item":
            out.append(env)
        elif env.kind == "clear":
            out.clear()
        elif env.kind == "retract":
            target = retract_target(env)
            if target is not None:
                hidden.add(target)
    if hidden:
        out = [e for e in out if e.item_order not in hidden]
    return out
