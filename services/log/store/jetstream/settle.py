"""What an append's answer means when it is not a plain "stored at seq N".

Two answers need the stream's own word before the writer can go on:

* a ``duplicate`` ack: the stream had seen ``<sid>:<order>`` within its
  dedupe window, which may be another writer's item at that order;
* no answer at all (a timeout, a disconnect): the publish may or may not
  have been stored.

:class:`Settler` makes either certain and returns the stored sequences, or
says that ours was not stored (:class:`~.api.WrongLastSequence`: decide
again), or, when even that cannot be found out, raises
:class:`OutcomeStillUnknown` (the caller retries with the same ids).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from shared.errors import ConvlogError, UnavailableError

from ..ordering import Row
from .api import (
    Acks,
    BatchAck,
    IdTaken,
    InProcess,
    Message,
    OutcomeUnknown,
    Refused,
    WrongLastSequence,
)
from .index import seq_of
from .layout import Layout
from .reads import StreamReads

__all__ = ["OutcomeStillUnknown", "Settler"]

_ATTEMPTS = 16


class OutcomeStillUnknown(UnavailableError):
    """No answer came to a publish, nor to the copies sent to settle it."""


def _unknown() -> OutcomeStillUnknown:
    return OutcomeStillUnknown("the outcome of an append is unknown; retry it with the same item_ids")


class Settler:
    """Settles duplicate and lost answers against the stream.

    Args:
        acks: returns the store's publisher.
        layout: the store's subjects.
        reads: the read side (its direct gets find an item by its id's subject).
    """

    def __init__(self, acks: Callable[[], Acks], layout: Layout, reads: StreamReads) -> None:
        self._acks = acks
        self.layout = layout
        self.reads = reads

    async def confirmed(self, sid: str, ack: BatchAck, rows: Sequence[Row]) -> list[int]:
        """The sequences of a stored publish.  A ``duplicate`` ack may be
        another writer's item at that order: it is ours only if the id holds
        our hash.

        Raises:
            WrongLastSequence: another append holds that order (decide again).
        """
        if not ack.duplicate:
            return list(range(ack.first_seq, ack.first_seq + len(rows)))
        found = await self.ours(sid, rows)
        if found is None:
            raise WrongLastSequence("another append holds that order")
        return found

    async def ours(self, sid: str, rows: Sequence[Row]) -> list[int] | None:
        """The sequences of ``rows`` if the stream holds exactly them, else None
        (a publish is all or nothing, so the first row decides)."""
        get = self.reads.get(sid)
        subject = self.layout.item_subject(sid, rows[0][3])
        first = await get.last(subject)
        if first is None:  # or a replica that trails the leader has not applied it yet
            first = await get.last_from_leader(subject)
        if first is None or first.data != rows[0][5]:
            return None
        start = seq_of(first)
        return list(range(start, start + len(rows)))

    async def unknown(self, sid: str, msgs: list[Message], rows: Sequence[Row]) -> list[int]:
        """No answer came: make the outcome certain, then read it.

        A lookup alone could run before a publish still in flight lands.  So
        the same message (or batch) is sent again: the stream takes one
        connection's messages in order, so once the copy is answered the
        original, if it arrived, has been stored or refused.  If the copy is
        stored, the original was not (it would have failed the copy's
        expectations); otherwise the item subject of the first row says
        whether the stream holds ours.  A copy answered "in process" (on a cluster
        without quorum the original may still be replicating, and be stored once
        it is back) settles nothing: it is sent again.  A copy the stream refuses (a
        limit reached) is answered: if ours is not stored either, that refusal is
        the append's.

        Raises:
            WrongLastSequence: ours was not stored (decide again).
            Refused: ours was not stored, and the stream refuses it (its reason).
            OutcomeStillUnknown: no answer to the copies either.
        """
        acks = self._acks()
        refused: Refused | None = None
        for _ in range(_ATTEMPTS):
            try:
                ack = await (acks.publish(*msgs[0]) if len(msgs) == 1 else acks.publish_atomic(msgs))
            except Refused as e:  # an answer: the original was stored or refused before it
                refused = e
                break
            except (InProcess, OutcomeUnknown, UnavailableError):
                await asyncio.sleep(0.5)
                continue
            except (WrongLastSequence, IdTaken):
                break
            if not ack.duplicate:
                return list(range(ack.first_seq, ack.first_seq + len(rows)))
            break
        else:
            raise _unknown()
        found = await self.ours(sid, rows)
        if found is None:
            if refused is not None:
                raise refused  # nothing stored, and the stream says why (a full stream)
            raise WrongLastSequence("another append was stored first")  # decide again
        return found

    async def combined(self, msgs: list[Message], sid: str, first_rows: Sequence[Row]) -> int | None:
        """A combined batch (several sessions) got no answer: send it again
        (see :meth:`unknown`; again while it is answered "in process"); the
        subject of its first row (``first_rows``, of session ``sid``) says
        whether the stream holds ours.  Returns the
        batch's first sequence, or None when ours was not stored.

        Raises:
            OutcomeStillUnknown: the stream could not be asked, or a batch with
                its ids was still in process (replicating) after every copy.
        """
        for _ in range(_ATTEMPTS):
            try:
                ack = await self._acks().publish_atomic(msgs)
                if not ack.duplicate:
                    return ack.first_seq
            except InProcess:  # the original may be stored yet: not settled
                await asyncio.sleep(0.5)
                continue
            except (WrongLastSequence, IdTaken, OutcomeUnknown, UnavailableError):
                pass
            break
        else:
            raise _unknown()
        try:
            found = await self.ours(sid, first_rows)
        except ConvlogError as e:
            raise _unknown() from e
        return found[0] if found else None
