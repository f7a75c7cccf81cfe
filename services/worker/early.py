"""A handoff announced while it is being appended, and the check its target makes.

A handoff-only step (the model's handoff call and its output, one atomic
append) used to reach the next agent only once committed: the handing-off
worker's append, then the log service's notice, then the next agent's model
call, one after another.  Now the handing-off worker publishes the target's
notice *while* its append is in flight (:func:`handoff_notice`): the notice
carries the session's envelopes up to the append's ``expected_last`` and,
as its last ``pending`` items, the items being appended, at the orders they
will have.  Its ``Nats-Msg-Id`` is the one every announcement of that
handoff has (``<sid>:<order>``), so the log service's own notice after the
commit, and the worker's announcement after a crash, are dropped by the work
stream: still one delivery to the target.

The target starts at once -- reads nothing, asks its model -- and before its
first write checks that the log holds exactly those items at those orders
(:func:`committed`: item id, author, kind and content; the append is atomic,
so it holds all of them or none).  What it then writes rests on what the log
holds, as every write of a worker does; ``expected_last`` = the handoff's
order does the rest.  When the log holds other items there (the append was
refused: a retry writes elsewhere and announces itself anew), the answer is
dropped and the notice acked; when the log has not moved past the
handoff's place yet (the append is still in flight, or its worker died), the
check looks again for a while and then the notice is redelivered later: it
is never acked while the handoff may still be committed at that order, since
a later announcement of it would be dropped as a duplicate.

Only a worker that takes the items notices carry (no signature checks, see
:mod:`.trust`) announces early: a worker that checks signatures reads what it
acts on from the log, and would only wait for the commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import msgspec

from shared.client import LogClient
from shared.messages import AppendItem, Envelope
from shared.work import Notice, now

from .turn_types import Uncommitted

__all__ = ["committed", "handoff_notice", "pending_of"]

#: A session whose orders reach this far is carried whole (the receiver folds its window from it).
YOUNG = 32
#: Otherwise the last envelopes before the handoff carried (as the log service's notices do).
TAIL = 8
#: Most bytes of envelopes a notice carries (else no early announcement).
MAX_BYTES = 64 * 1024
#: Seconds the check waits for the log to move past the handoff's place before giving up.
WAIT = 2.0

_encode = msgspec.json.Encoder().encode
_envelope = msgspec.json.Decoder(Envelope)


def handoff_notice(session_id: str, raw: Sequence[Envelope], items: Sequence[AppendItem],
                   expected_last: int) -> Notice | None:
    """The target's notice for ``items`` (a handoff-only step ending with the handoff
    output) appended after ``expected_last``, or ``None`` when ``raw`` (the session's
    envelopes as the log holds them) does not reach ``expected_last`` contiguously."""
    before = [e for e in raw if e.item_order <= expected_last]
    orders = [e.item_order for e in before]
    if not before or orders != list(range(orders[0], expected_last + 1)) or not all(e.hash for e in before):
        return None  # a gap, or an envelope not read from the log: the announcement waits for the commit
    order = expected_last + len(items)
    if orders[0] != 1 or order > YOUNG:
        before = before[-TAIL:]
    appended = [Envelope(session_id=session_id, item_order=expected_last + 1 + i, item_id=it.item_id or "",
                         agent=it.agent, kind=it.kind, data=it.data, created_at="", hash="")
                for i, it in enumerate(items)]
    carried = tuple(msgspec.Raw(_encode(e)) for e in (*before, *appended))
    if sum(len(r) for r in carried) > MAX_BYTES:
        return None
    return Notice(session_id=session_id, item_order=order, kind="handoff", ts=now(), items=carried,
                  pending=len(items))


def pending_of(notice: Notice) -> list[Envelope] | None:
    """The envelopes ``notice`` says are being appended (its last ``pending`` items),
    or ``None``: it announces a committed item (or what it carries is unreadable)."""
    if not notice.pending or notice.kind != "handoff" or len(notice.items) < notice.pending:
        return None
    try:
        pending = [_envelope.decode(raw) for raw in notice.items[-notice.pending:]]
    except msgspec.DecodeError:
        return None
    orders = [e.item_order for e in pending]
    if orders[-1] != notice.item_order or orders != list(range(orders[0], orders[0] + len(orders))) \
            or any(e.session_id != notice.session_id for e in pending):
        return None
    return pending


def _same(a: Envelope, b: Envelope) -> bool:
    return (a.item_order, a.item_id, a.agent, a.kind, a.data) == (b.item_order, b.item_id, b.agent, b.kind, b.data)


async def committed(client: LogClient, session_id: str, pending: Sequence[Envelope], *,
                    wait: float = WAIT) -> list[Envelope]:
    """Wait until the log holds ``pending`` at their orders; return the envelopes it holds.

    Raises:
        Uncommitted: ``obsolete`` when the log holds other items there; not
            ``obsolete`` when nothing came after the handoff's place within ``wait`` s.
        ConvlogError: the log could not be read (the caller retries later).
    """
    after = pending[0].item_order - 1
    deadline = time.monotonic() + wait
    pause = 0.0005
    while True:
        held: list[Envelope] = []
        more = True
        while more and len(held) < len(pending):
            page = await client.read(session_id, after=after + len(held), limit=len(pending) - len(held),
                                     raw=True)
            held += page.items
            more = page.more and bool(page.items)
        if held:
            if len(held) == len(pending) and all(_same(h, p) for h, p in zip(held, pending, strict=True)):
                return held
            raise Uncommitted(obsolete=True)
        if time.monotonic() + pause > deadline:
            raise Uncommitted(obsolete=False)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)
