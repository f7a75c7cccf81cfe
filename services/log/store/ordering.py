"""The ordering rules of an append, independent of any backend.

Given a session's state (last order, chain head, last clear) and the ids it
already holds, :func:`decide` assigns contiguous orders, computes the hash
chain and builds the envelopes of one request — or refuses it (a conflict, a
partial retry, a bad retract).  A store only has to look up what ``decide``
needs and write the rows it returns atomically; the SQLite store does, and a
JetStream-backed store can reuse the same rules.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from shared.chain import GENESIS_HASH, canonical, item_hash
from shared.errors import BadRequestError, ConflictError
from shared.messages import AppendedItem, AppendItem, AppendReply, AppendRequest, Envelope

__all__ = [
    "Existing", "Row", "SessionState", "checked_retract", "content_digest", "decide", "now_rfc3339", "stored_entry",
]

_encode = msgspec.json.Encoder().encode

#: position, session_id, item_order, item_id, kind, envelope JSON, retract target
Row = tuple[int, str, int, str, str, bytes, int]
#: A stored item_id's order, hash and :func:`content_digest`.
Existing = tuple[int, str, str]


def content_digest(agent: str, kind: str, data: Mapping[str, object]) -> str:
    """What makes two items with one ``item_id`` the same item: author, kind and data.

    Compared as RFC 8785 bytes (so ``1`` and ``1.0`` are equal, as the hash
    chain sees them, but ``1`` and ``true`` are not).
    """
    return hashlib.sha256(canonical({"agent": agent, "data": data, "kind": kind})).hexdigest()


def stored_entry(order: int, envelope: bytes | str) -> Existing:
    """The :data:`Existing` entry of a stored envelope (for a store's id lookup)."""
    env = msgspec.json.decode(envelope)
    return order, env["hash"], content_digest(env["agent"], env["kind"], env["data"])


def now_rfc3339() -> str:
    """UTC now as RFC 3339 with microseconds: ``2026-03-14T09:30:00.123456Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(slots=True)
class SessionState:
    """A session's chain head, as a store keeps it between appends."""

    last_order: int = 0
    last_hash: str = GENESIS_HASH
    last_clear: int = 0
    # What this batch wrote so far, for later requests of the same batch:
    batch_kinds: dict[int, str] = field(default_factory=dict)
    batch_ids: dict[str, tuple[int, str, AppendItem]] = field(default_factory=dict)

    def copy(self) -> SessionState:
        """The chain head alone, for a batch to work on."""
        return SessionState(self.last_order, self.last_hash, self.last_clear)


def checked_retract(sid: str, data: Mapping[str, object], order: int, kind_of: Callable[[int], str | None]) -> int:
    """The order a retract at ``order`` hides (``kind_of``: the kind of an earlier order
    of the session, ``None`` if unknown): the one rule for appends and imports.

    Raises:
        BadRequestError: ``data`` is not ``{"target": <item_order>}``, or the target is
            not an earlier item of the session.
    """
    target = data.get("target")
    if set(data) != {"target"} or not isinstance(target, int) or isinstance(target, bool):
        raise BadRequestError('a retract needs data {"target": <item_order>} and nothing else')
    kind_of_target = kind_of(target)
    if not 1 <= target < order or kind_of_target is None:
        raise BadRequestError(f"retract target {target} is not an item of session {sid!r} (last order {order - 1})")
    if kind_of_target != "item":
        raise BadRequestError(f"retract target {target} is a {kind_of_target!r}, not an item")
    return target


def decide(
    sid: str,
    req: AppendRequest,
    st: SessionState,
    existing: dict[tuple[str, str], Existing],
    stored_kinds: dict[tuple[str, int], str],
    created_at: str,
    position: int,
) -> tuple[AppendReply, list[Row]]:
    """Decide one append request against a session's working state.

    Args:
        sid: the session.
        req: the request (every item has an ``item_id`` by now).
        st: the session's state, including what earlier requests of the same
            batch wrote; updated only when the request succeeds.
        existing: ``(session, item_id) -> (order, hash, content digest)`` of
            stored ids the caller looked up (those that can change the decision);
            see :func:`stored_entry`.
        stored_kinds: ``(session, order) -> kind`` of stored retract targets.
        created_at: the batch's timestamp.
        position: the global position of the last row planned so far.

    Returns:
        The reply and the rows to insert (none for a pure duplicate).

    Raises:
        ConflictError: ``expected_last`` is behind and no id is present; or an
            ``item_id`` is already in the session with different content (only
            a true retry is a duplicate: nobody can pre-empt an id).
        BadRequestError: a partial retry, a repeated id, or a bad retract/clear/item.
    """
    items = req.items
    ids = [it.item_id for it in items]
    if len(ids) > 1 and len(set(ids)) < len(ids):
        seen: set[str | None] = set()
        for iid in ids:
            if iid is not None and iid in seen:
                raise BadRequestError(f"item_id {iid!r} appears twice in one append")
            seen.add(iid)
    present: dict[str, Existing] = {}
    if existing:
        present = {iid: existing[(sid, iid)] for iid in ids if iid is not None and (sid, iid) in existing}
    if st.batch_ids:
        for iid in ids:
            if iid in st.batch_ids:
                o, h, it = st.batch_ids[iid]
                present[iid] = (o, h, content_digest(it.agent, it.kind, it.data))
    if present:
        _refuse_hijack(sid, items, present, st.last_order)
    behind = req.expected_last is not None and req.expected_last != st.last_order
    if behind or present:
        if present and len(present) == len(ids):
            return _duplicates_reply(sid, ids, present), []
        if behind:
            if present:
                raise BadRequestError(
                    f"retry is partial: {len(present)} of {len(ids)} item_ids are already "
                    f"in session {sid!r}, and expected_last {req.expected_last} is behind "
                    f"last_order {st.last_order}"
                )
            raise ConflictError(
                f"expected_last {req.expected_last} but session {sid!r} is at {st.last_order}",
                last_order=st.last_order,
            )
    rows: list[Row] = []
    order, prev, clear = st.last_order, st.last_hash, st.last_clear
    out_items: list[AppendedItem] = []
    kinds_here: dict[int, str] = {}  # orders this request assigns, for its own retracts
    for it in items:
        iid = it.item_id
        if iid is not None and iid in present:
            o, h, _ = present[iid]
            out_items.append(AppendedItem(item_order=o, item_id=iid, hash=h, duplicate=True))
            continue
        if iid is None:  # the service assigns ids before the store; be safe anyway
            iid = uuid.uuid4().hex
        order += 1
        kind, data, target = it.kind, it.data, 0
        if kind == "item":
            if not data:
                raise BadRequestError("an item needs a non-empty data object")
        elif kind == "retract":
            target = checked_retract(
                sid, data, order,
                lambda t: kinds_here.get(t) or st.batch_kinds.get(t) or stored_kinds.get((sid, t)),
            )
        elif kind == "clear":
            if data:
                raise BadRequestError("a clear carries no data: send {} or omit data")
            clear = order
        h = item_hash(
            session_id=sid, item_order=order, item_id=iid, agent=it.agent, kind=kind,
            data=data, created_at=created_at, prev_hash=prev, sig=it.sig, key_id=it.key_id,
        )
        env = Envelope(
            session_id=sid, item_order=order, item_id=iid, agent=it.agent, kind=kind,
            data=data, created_at=created_at, hash=h, sig=it.sig, key_id=it.key_id,
        )
        kinds_here[order] = kind
        position += 1
        rows.append((position, sid, order, iid, kind, _encode(env), target))
        out_items.append(AppendedItem(item_order=order, item_id=iid, hash=h))
        prev = h
    # success: commit to the working state
    for r in rows:
        st.batch_kinds[r[2]] = r[4]
    for a, it in zip(out_items, items, strict=True):
        if not a.duplicate:
            st.batch_ids[a.item_id] = (a.item_order, a.hash, it)
    st.last_order, st.last_hash, st.last_clear = order, prev, clear
    if len(out_items) == 1:
        first = last = out_items[0].item_order
    else:
        orders = [i.item_order for i in out_items]
        first, last = min(orders), max(orders)
    return AppendReply(session_id=sid, first_order=first, last_order=last, items=out_items), rows


def _refuse_hijack(sid: str, items: Sequence[AppendItem], present: dict[str, Existing], last: int) -> None:
    for it in items:
        if it.item_id in present and present[it.item_id][2] != content_digest(it.agent, it.kind, it.data):
            raise ConflictError(
                f"item_id {it.item_id!r} is already in session {sid!r} (item_order "
                f"{present[it.item_id][0]}) with a different author, kind or data; "
                "only a retry of the same item is a duplicate",
                last_order=last, item_id=it.item_id,
            )


def _duplicates_reply(sid: str, ids: Sequence[str | None], present: dict[str, Existing]) -> AppendReply:
    items = [
        AppendedItem(item_order=present[i][0], item_id=i, hash=present[i][1], duplicate=True)
        for i in ids
        if i is not None
    ]
    orders = [i.item_order for i in items]
    return AppendReply(session_id=sid, first_order=min(orders), last_order=max(orders), items=items)
