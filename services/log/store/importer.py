"""Copy envelopes into a store as they are: the one way in that is not an append.

``convlog migrate`` moves a log between stores with every envelope
byte-identical (its ``created_at`` and hash kept), so it cannot go through
:meth:`LogStore.append`, which stamps and hashes anew.  :func:`import_envelopes`
writes a run of envelopes right after a session's head, in one transaction
(SQLite) or chained atomic batches (JetStream), after checking that they
continue the session's chain; it refuses with ``ConflictError`` when the head
moved.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence

import msgspec

from shared.chain import envelope_hash
from shared.codec import MAX_DEPTH, json_ok
from shared.errors import BadRequestError, ConflictError, UnavailableError
from shared.messages import Envelope, null_optional_field

from .base import LogStore
from .ordering import Row, checked_retract

__all__ = ["import_envelopes"]


class _StrictEnvelope(Envelope, forbid_unknown_fields=True):
    """An envelope with nothing beside its fields: a field the hash does not cover is
    tampering (as ``convlog replay`` reads it), not something to copy along."""


_env = msgspec.json.Decoder(_StrictEnvelope)


def _rows(sid: str, raw: Sequence[bytes], after: int, prev_hash: str, stored_kinds: dict[int, str]) -> list[Row]:
    """Rows for envelopes continuing a chain at ``after``/``prev_hash``
    (``stored_kinds``: order -> kind of the stored items their retracts target).

    Raises:
        BadRequestError: an envelope is of another session, out of order or off the
            chain, or a retract that an append would refuse (its target is not an
            earlier item of the session: each store would fold it its own way).
    """
    rows: list[Row] = []
    kinds = dict(stored_kinds)
    prev = prev_hash
    for k, b in enumerate(raw, start=after + 1):
        try:
            e = _env.decode(b)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadRequestError(f"{sid}: item {k} is not a convlog envelope: {exc}") from None
        except RecursionError:  # msgspec's nesting limit
            raise BadRequestError(f"{sid}: item {k} nests its data too deeply to decode") from None
        if not json_ok(e.data, keys=False):  # what an append would refuse, the store would choke on
            raise BadRequestError(
                f"{sid}: item {k} holds a number RFC 8785 cannot represent exactly, or nests its data "
                f"more than {MAX_DEPTH} levels deep"
            )
        if (e.sig is None or e.key_id is None) and (field := null_optional_field(b)) is not None:
            raise BadRequestError(f"{sid}: item {k} has a null {field} (absent is not null to the hash)")
        if e.session_id != sid or e.item_order != k:
            raise BadRequestError(f"envelope {e.session_id}:{e.item_order} where {sid}:{k} belongs")
        if envelope_hash(e, prev) != e.hash:
            raise BadRequestError(f"{sid}: item {k} does not continue the hash chain")
        target = 0
        if e.kind == "retract":
            try:
                target = checked_retract(sid, e.data, k, kinds.get)
            except BadRequestError as err:
                raise BadRequestError(f"{sid}: item {k} retracts {e.data.get('target')!r}: {err.message}") from None
        kinds[k] = e.kind
        rows.append((0, sid, k, e.item_id, e.kind, b, target))
        prev = e.hash
    return rows


async def import_envelopes(store: LogStore, sid: str, raw: Sequence[bytes], *, after: int) -> None:
    """Write ``raw`` (orders ``after+1 ..``) after the session's head ``after``.

    Raises:
        ConflictError: the session's head is not ``after`` (nothing written).
        BadRequestError: the envelopes do not continue the session's chain.
        UnavailableError: the store failed; nothing was written.
    """
    if not raw:
        return
    from .jetstream import JetStreamStore
    from .sqlite import SQLiteStore

    if not isinstance(store, SQLiteStore | JetStreamStore):
        raise TypeError(f"cannot import into {type(store).__name__}")
    kinds = await _stored_kinds(store, sid, raw, after)
    if isinstance(store, SQLiteStore):
        _import_sqlite(store, sid, raw, after, kinds)
    else:
        await _import_jetstream(store, sid, raw, after, kinds)


class _Retract(msgspec.Struct):
    kind: str
    data: dict[str, object] = {}


async def _stored_kinds(store: LogStore, sid: str, raw: Sequence[bytes], after: int) -> dict[int, str]:
    """The kinds of the stored items (orders up to ``after``) the retracts of ``raw`` target."""
    targets: set[int] = set()
    for b in raw:
        if ('"retract"' if isinstance(b, str) else b'"retract"') not in b:  # type: ignore[operator]
            continue
        with contextlib.suppress(msgspec.DecodeError, RecursionError):  # _rows says what is wrong
            e = msgspec.json.decode(b, type=_Retract)
            t = e.data.get("target")
            if e.kind == "retract" and isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= after:
                targets.add(t)
    kinds: dict[int, str] = {}
    for t in sorted(targets):
        page = await store.read(sid, after=t - 1, limit=1, max_bytes=1)
        if page.items:
            kinds[t] = msgspec.json.decode(page.items[0], type=_Retract).kind
    return kinds


def _import_sqlite(store: object, sid: str, raw: Sequence[bytes], after: int, kinds: dict[int, str]) -> None:
    from .sqlite import SQLiteStore

    assert isinstance(store, SQLiteStore)
    w = store._w
    assert w is not None, "the store is not open"
    store._load_states({sid})
    st = store._states[sid]
    if st.last_order != after:
        raise ConflictError(f"session {sid!r} is at {st.last_order}, not {after}", last_order=st.last_order)
    rows = _rows(sid, raw, after, st.last_hash, kinds)
    position = store._position
    rows = [(position + n, *r[1:]) for n, r in enumerate(rows, start=1)]
    last = _env.decode(raw[-1])
    clear = max([r[2] for r in rows if r[4] == "clear"], default=st.last_clear)
    try:
        w.execute("BEGIN IMMEDIATE")
        w.executemany(
            "INSERT INTO items (position, session_id, item_order, item_id, kind, envelope) VALUES (?, ?, ?, ?, ?, ?)",
            [r[:6] for r in rows],
        )
        hides = [(r[2], sid, r[6]) for r in rows if r[4] == "retract"]  # hidden = the retract's order
        w.executemany("UPDATE items SET hidden = ? WHERE session_id = ? AND item_order = ? AND hidden = 0", hides)
        w.execute(
            "INSERT INTO sessions (session_id, last_order, last_hash, last_clear, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET last_order = excluded.last_order, "
            "last_hash = excluded.last_hash, last_clear = excluded.last_clear, updated_at = excluded.updated_at",
            (sid, last.item_order, last.hash, clear, last.created_at),
        )
        w.execute("COMMIT")
    except sqlite3.Error as e:
        with contextlib.suppress(sqlite3.Error):
            w.execute("ROLLBACK")
        raise UnavailableError(f"cannot import into {store.path}: {e}") from e
    store._position = rows[-1][0]
    st.last_order, st.last_hash, st.last_clear = last.item_order, last.hash, clear


async def _import_jetstream(store: object, sid: str, raw: Sequence[bytes], after: int, kinds: dict[int, str]) -> None:
    from .jetstream import JetStreamStore

    assert isinstance(store, JetStreamStore)
    s = await store._session(sid, fresh=True)
    if s.last_order != after:
        raise ConflictError(f"session {sid!r} is at {s.last_order}, not {after}", last_order=s.last_order)
    await store.import_rows(sid, _rows(sid, raw, after, s.last_hash, kinds), after)
