"""The idempotency keys of ``ConvlogSession.add_items`` calls.

Each call mints one random *call key* and gives item ``i`` the ``item_id``
``"<call key>.<i>"``.  Transport retries inside :class:`~shared.client.LogClient`
resend the same ids, so a reply lost on the way back never doubles anything.
If a call still ends without a known outcome (``UnavailableError``), its key
stays pending for that exact batch: calling ``add_items`` again with equal
items reuses it, and the log answers the items it already holds as
duplicates instead of writing them twice (up to 64 such batches are
remembered per session object; a retry from another process cannot be
recognised, its keys are its own).  The retry also reuses the authors the
call was sent with: the log answers an id as a duplicate only for the same
author, kind and data, and the agent running at the retry may be another.  Once an outcome is known the key is
dropped, so adding equal content later (say the SDK re-adding an item it
popped while rewinding a turn, SDK issue #3852) is a new write and becomes
visible again; so is a concurrent call with equal items, which is not a retry.

A batch is recognised by the SHA-256 of its items as canonical JSON (sorted
keys), computed only when some batch is pending or a call ends unknown.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .agents_sdk import canonical
from .client import new_item_id

__all__ = ["Call", "CallKeys"]

MAX_PENDING = 64


@dataclass(slots=True)
class Call:
    """One ``add_items`` call: its key, its canonical items and their fingerprint,
    and the authors of its items (those of the first call, for a retry)."""

    key: str
    text: bytes
    fingerprint: str | None = None
    authors: list[str] | None = None

    @property
    def size(self) -> int:
        """Bytes of the items as JSON (what the append queue budgets with)."""
        return len(self.text)


class CallKeys:
    """The keys of the calls whose outcome is unknown (see the module docstring)."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._pending: OrderedDict[str, tuple[str, list[str] | None]] = OrderedDict()  # fp -> key, authors

    def __len__(self) -> int:
        return len(self._pending)

    def begin(self, items: Sequence[Mapping[str, Any]]) -> Call:
        """The key of a call adding ``items``: a pending one for an equal batch, else a new one."""
        text = canonical(items)
        if self._pending:
            fp = hashlib.sha256(text).hexdigest()
            pending = self._pending.pop(fp, None)  # one call takes it: an equal one beside it is new
            if pending is not None:
                return Call(pending[0], text, fp, pending[1])
            return Call(new_item_id(), text, fp)
        return Call(new_item_id(), text)

    def unknown(self, call: Call) -> None:
        """The call ended without a known outcome: remember its key for a retry."""
        if call.fingerprint is None:
            call.fingerprint = hashlib.sha256(call.text).hexdigest()
        self._pending[call.fingerprint] = (call.key, call.authors)
        self._pending.move_to_end(call.fingerprint)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def settled(self, call: Call) -> None:
        """The call's outcome is known: its key is never reused."""
        if call.fingerprint is not None:
            pending = self._pending.get(call.fingerprint)
            if pending is not None and pending[0] == call.key:
                del self._pending[call.fingerprint]
