"""``convlog replay``: audit replay of every envelope, from the service, the
SQLite file (no service needed) or a JSONL export, with hash-chain verification
(and, for a SQLite file, a cross-check of every row's columns)."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

import msgspec

from shared.chain import GENESIS_HASH, Problem, envelope_hash
from shared.client import LogClient
from shared.codec import encode_envelope_line, numbers_ok
from shared.errors import BadRequestError, NotFoundError
from shared.messages import Envelope, null_optional_field
from shared.signing import Keyring, SignedHead
from shared.subjects import validate_session_id

from .audit import SignatureAudit, decode_head_line, encode_head_line
from .render import render_line
from .storage import read_only_uri

__all__ = ["Replayer", "envelopes_from_db", "envelopes_from_file"]

class _StrictEnvelope(Envelope, forbid_unknown_fields=True):
    """An envelope with nothing beside its fields: a field the hash does not cover is tampering."""


_decoder = msgspec.json.Decoder(_StrictEnvelope)


class _Undecodable:
    """A stored row that no longer decodes as an envelope (tampered)."""

    def __init__(self, order: int, error: str) -> None:
        self.item_order = order
        self.error = error


def _decode(raw: bytes | str, fallback_order: int) -> Envelope | _Undecodable:
    try:
        env = _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return _Undecodable(fallback_order, str(e))
    except RecursionError:  # msgspec's nesting limit
        return _Undecodable(fallback_order, "JSON nested too deeply to decode")
    if not numbers_ok(env.data, keys=False):  # RFC 8785 cannot hash it: no verifier could agree
        return _Undecodable(fallback_order, "a number outside what RFC 8785 represents exactly")
    if (env.sig is None or env.key_id is None) and (field := null_optional_field(raw)) is not None:
        return _Undecodable(fallback_order, f"{field} is null (absent is not null to the hash)")
    if (name := _duplicated_name(raw)) is not None:
        return _Undecodable(fallback_order, f"an object holds {name!r} more than once "
                            "(the hash covers only the last)")
    return env


class _Duplicated(Exception):
    pass


def _unique_names(pairs: list[tuple[str, object]]) -> None:
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise _Duplicated(k)
        seen.add(k)


def _duplicated_name(raw: bytes | str) -> str | None:
    """A name an object of the JSON holds twice, or ``None``. msgspec keeps the last
    value; RFC 8785 canonicalizes I-JSON, where each name appears once, and the
    first value is text the hash does not cover (a reader of the line sees it)."""
    try:
        json.loads(raw, object_pairs_hook=_unique_names)
    except _Duplicated as e:
        return str(e.args[0])
    except (ValueError, RecursionError):  # msgspec decoded it: nested past Python's limit
        return None
    return None


class _BadRow:
    """A stored row whose indexed columns disagree with its own envelope, or a
    session's summary row that disagrees with its items (a tampered SQLite file).

    Attributes:
        item_order: the first order the disagreement makes untrustworthy.
        reason: what disagrees, naming the row.
        envelope: the row's envelope, still printed by a replay, if it decodes.
    """

    def __init__(self, order: int, reason: str, envelope: Envelope | None = None) -> None:
        self.item_order = order
        self.reason = reason
        self.envelope = envelope


Stored = Envelope | _Undecodable | _BadRow | SignedHead

# In item_order, as the service serves them: a row whose item_order column was
# changed is met where readers would meet it.
_ROWS = (
    "SELECT position, item_order, item_id, kind, hidden, envelope FROM items "
    "WHERE session_id = ? ORDER BY item_order"
)
_SUMMARY = "SELECT last_order, last_hash, last_clear FROM sessions WHERE session_id = ?"


def envelopes_from_db(path: Path, session_id: str) -> Iterator[Stored]:
    """Every stored envelope of a session, read straight from the SQLite file.

    Each row's indexed columns (session, order, id, kind, commit position,
    hidden flag) and the session's summary row (last order, last hash, last
    clear) are checked against the envelopes, which the hash chain covers; a
    disagreement comes out as a :class:`_BadRow` naming the row.
    """
    if not path.exists():
        raise NotFoundError(f"no database at {path}")
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None)
    except sqlite3.Error as e:  # unreadable (its mode, a directory it is in)
        raise BadRequestError(f"{path}: cannot open it: {e}") from e
    try:
        try:
            conn.execute("BEGIN")  # one snapshot for the rows and the summary
            summary = conn.execute(_SUMMARY, (session_id,)).fetchone()
            cur = conn.execute(_ROWS, (session_id,))
        except sqlite3.DatabaseError as e:  # not SQLite at all, or not convlog's schema
            raise BadRequestError(f"{path} is not a convlog database: {e}") from e
        yield from _checked_rows(cur, summary, session_id)
    finally:
        conn.close()


def _checked_rows(
    rows: Iterable[tuple[int, int, str, str, int, bytes]],
    summary: tuple[int, str, int] | None,
    session_id: str,
) -> Iterator[Stored]:
    prev_position = first_order = last_order = last_clear = 0
    last_hash = GENESIS_HASH
    hidden: dict[int, int] = {}  # order -> its hidden flag, where set
    retracted: dict[int, int] = {}  # order a retract envelope targets -> the first such retract
    for position, order, item_id, kind, hidden_flag, raw in rows:
        if hidden_flag:
            hidden[order] = hidden_flag
        env = _decode(raw, order)
        if isinstance(env, _Undecodable):
            yield env
        else:
            columns = (session_id, order, item_id, kind)
            reason = _row_disagreement(env, columns, position, prev_position)
            yield env if reason is None else _BadRow(order, reason, env)
            if env.kind == "retract" and isinstance(env.data.get("target"), int):
                retracted.setdefault(env.data["target"], env.item_order)
            elif env.kind == "clear":
                last_clear = env.item_order
            last_hash = env.hash
        prev_position, last_order = position, order
        first_order = first_order or order
    if hidden.keys() != retracted.keys():
        k = min(hidden.keys() ^ retracted.keys())
        yield _BadRow(k, f"the row of item_order {k} is marked hidden, but no retract targets it"
                      if k in hidden else
                      f"item_order {k} is retracted, but its row is not marked hidden")
    # The flag is the order of the retract that hid the row (1 in databases made before):
    # a larger one shows the row to every read as of an earlier head.
    wrong = [k for k, flag in hidden.items() if k in retracted and flag not in (retracted[k], 1)]
    if wrong:
        k = min(wrong)
        yield _BadRow(k, f"the row of item_order {k} is marked hidden as of item_order {hidden[k]}, "
                      f"but item_order {retracted[k]} retracts it")
    if summary is None:
        if last_order:
            yield _BadRow(first_order, f"the sessions table has no row for session {session_id!r}")
        return
    s_last, s_hash, s_clear = summary
    if s_last != last_order:
        yield _BadRow(min(s_last, last_order) + 1, f"the sessions table says the session ends "
                      f"at item_order {s_last}, but its last row is item_order {last_order}")
    elif s_hash != last_hash:
        yield _BadRow(last_order, f"the sessions table's last hash {s_hash[:16]}... is not the "
                      f"hash of item_order {last_order}")
    elif s_clear != last_clear:
        yield _BadRow(min(x for x in (s_clear, last_clear) if x), f"the sessions table says "
                      f"the last clear is item_order {s_clear}, but the log's is {last_clear}")


def _row_disagreement(
    env: Envelope, columns: tuple[str, int, str, str], position: int, prev_position: int
) -> str | None:
    """What a row's columns say that its (hashed) envelope does not, or ``None``."""
    session_id, order, item_id, kind = columns
    where = f"row {position} (item_order column {order})"
    if env.session_id != session_id:
        return (f"{where} is filed under session {session_id!r} but holds an envelope of "
                f"session {env.session_id!r}")
    if env.item_order != order:
        return f"{where} holds the envelope of item_order {env.item_order}"
    if env.item_id != item_id:
        return f"{where} has item_id column {item_id!r} but its envelope says {env.item_id!r}"
    if env.kind != kind:
        return f"{where} has kind column {kind!r} but its envelope says {env.kind!r}"
    if position <= prev_position:
        return (f"{where} was committed before item_order {order - 1} "
                f"(position {position} <= {prev_position})")
    return None


def envelopes_from_file(path: Path, session_id: str | None) -> Iterator[Envelope | _Undecodable | SignedHead]:
    """Envelopes from a JSONL export (one envelope per line; a signed head line last).
    With ``session_id``, only that session's envelopes and signed heads: a file may
    hold several sessions' exports one after the other."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            head = decode_head_line(line)
            if head is not None and _duplicated_name(line) is None:  # else no head, as the console reads it
                if session_id is None or head.session_id == session_id:
                    yield head
                continue
            env = _decode(line, n)
            if session_id is None or not isinstance(env, Envelope) or env.session_id == session_id:
                yield env


class Replayer:
    """Print and/or verify a stream of envelopes.

    Args:
        out: where the replay is written.
        fmt: ``text`` (one readable line per envelope) or ``jsonl``.
        quiet: verify without printing envelopes.
        keyring: check every signature (and a signed head) against it.
        verify: a reader that closes ``out`` early (``| head``) stops the printing,
            not the verification (``pipe_closed`` is then true); else BrokenPipeError.
    """

    def __init__(
        self, out: TextIO = sys.stdout, *, fmt: str = "text", quiet: bool = False,
        keyring: Keyring | None = None, verify: bool = False,
    ) -> None:
        if fmt not in ("text", "jsonl"):
            raise BadRequestError(f"unknown format {fmt!r}: use text or jsonl")
        self.out = out
        self.fmt = fmt
        self.quiet = quiet
        self.verify = verify
        self.pipe_closed = False
        self.count = 0
        self.problem: Problem | None = None
        self._prev = GENESIS_HASH
        self._expected = 1
        self.audit = SignatureAudit(keyring)

    def feed(self, env: Stored, session_id: str) -> None:
        if isinstance(env, SignedHead):
            self.audit.heads.append(env)
            return
        if isinstance(env, _BadRow):
            # Rows are met in order, but summary checks come last: keep the earliest.
            if self.problem is None or env.item_order < self.problem.item_order:
                self.problem = Problem(env.item_order, env.reason)
            if env.envelope is not None:
                self.count += 1
                self._print(env.envelope, self.audit.check(env.envelope)[0])
            return
        if isinstance(env, _Undecodable):
            if self.problem is None:
                self.problem = Problem(self._expected, f"stored envelope does not decode: {env.error}")
            return
        self.count += 1
        mark, bad_sig = self.audit.check(env)
        self._print(env, mark)
        if self.problem is not None:
            return
        if env.session_id != session_id:
            self.problem = Problem(self._expected, f"belongs to session {env.session_id!r}")
        elif env.item_order != self._expected:
            self.problem = Problem(self._expected, f"expected item_order {self._expected}, found {env.item_order}")
        elif envelope_hash(env, self._prev) != env.hash:
            self.problem = Problem(self._expected, "hash does not match the envelope and its predecessor")
        elif bad_sig is not None:
            self.problem = Problem(self._expected, f"bad signature: {bad_sig}")
        else:
            self._prev = env.hash
            self._expected += 1

    def _print(self, env: Envelope, mark: str | None = None) -> None:
        try:
            self._write(env, mark)
        except BrokenPipeError:
            if not self.verify:
                raise
            self.quiet = self.pipe_closed = True  # the rest is verified, not printed

    def _write(self, env: Envelope, mark: str | None) -> None:
        if not self.quiet:
            if self.fmt == "jsonl":
                self.out.write(encode_envelope_line(env).decode() + "\n")
            elif mark is None or mark == "unsigned" and self.audit.keyring is None:
                self.out.write(render_line(env) + "\n")
            else:
                self.out.write(f"{render_line(env)}  [{mark}]\n")

    def finish(self, session_id: str) -> None:
        """After the last envelope: check the signed head, write it to a JSONL export."""
        if self.problem is None:
            self.problem = self.audit.finish(session_id, self.count)
        if self.fmt == "jsonl" and not self.quiet:
            try:
                for head in self.audit.heads:
                    self.out.write(encode_head_line(head).decode() + "\n")
            except BrokenPipeError:
                if not self.verify:
                    raise
                self.quiet = self.pipe_closed = True

    def run_sync(self, source: Iterator[Stored], session_id: str) -> None:
        for env in source:
            self.feed(env, session_id)
        self.finish(session_id)

    async def run_async(self, source: AsyncIterator[Stored], session_id: str) -> None:
        async for env in source:
            self.feed(env, session_id)
        self.finish(session_id)


async def replay_from_service(
    client: LogClient, session_id: str, replayer: Replayer,
    each: Callable[[Stored], Stored] = lambda env: env,
) -> None:
    validate_session_id(session_id)
    # The heads first: every item they cover is in the log by then (append-only).
    # The witness head (signed within an interval of each commit, kept outside
    # the store) catches a store that lost its tail; the fresh one covers the export.
    from services.log.heads import read_witness_head

    heads = [await read_witness_head(client.nc, client.subjects, session_id),
             await client.signed_head(session_id)]
    # Known before the items: only their orders' hashes are kept, not the session's.
    replayer.audit.keep = frozenset(h.item_order for h in heads if h is not None)

    signed = max((h.item_order for h in heads if h is not None), default=0)

    async def source() -> AsyncIterator[Stored]:
        # Items that end before a head read ahead of them are read on a moment (a
        # trailing replica's answer, not a truncation): see audit_items_through.
        async for env in client.audit_items_through(session_id, signed,
                                                    done=lambda: replayer.problem is not None):
            yield each(env if isinstance(env, Envelope) else _Undecodable(env.item_order, env.error))
        for head in heads:
            if head is not None:
                yield head

    await replayer.run_async(source(), session_id)
