"""What an attacker with write access to an export can do to it."""

from __future__ import annotations

import msgspec

from shared.chain import GENESIS_HASH, envelope_hash
from shared.messages import Envelope

__all__ = ["rechain"]


def rechain(envs: list[Envelope]) -> list[Envelope]:
    """Recompute every hash, so the hash chain alone still holds after an edit."""
    out, prev = [], GENESIS_HASH
    for e in envs:
        e = msgspec.structs.replace(e, hash=envelope_hash(e, prev))
        out.append(e)
        prev = e.hash
    return out
