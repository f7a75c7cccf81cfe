"""``convlog replay``: audit replay of every envelope, from the service, the
SQLite file (no service needed) or a JSONL export, with hash-chain verification."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TextIO

import msgspec

from shared.chain import GENESIS_HASH, Problem, envelope_hash
from shared.client import LogClient
from shared.codec import encode_envelope_line
from shared.errors import BadRequestError, NotFoundError
from shared.messages import Envelope
from shared.subjects import validate_session_id

from .render import render_line

__all__ = ["Replayer", "envelopes_from_db", "envelopes_from_file"]

_decoder = msgspec.json.Decoder(Envelope)


class _Undecodable:
    """A stored row that no longer decodes as an envelope (tampered)."""

    def __init__(self, order: int, error: str) -> None:
        self.item_order = order
        self.error = error


def _decode(raw: bytes | str, fallback_order: int) -> Envelope | _Undecodable:
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return _Undecodable(fallback_order, str(e))


def envelopes_from_db(path: Path, session_id: str) -> Iterator[Envelope | _Undecodable]:
    """Every stored envelope of a session, read straight from the SQLite file."""
    if not path.exists():
        raise NotFoundError(f"no database at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        try:
            cur = conn.execute(
                "SELECT item_order, envelope FROM items WHERE session_id = ? ORDER BY position",
                (session_id,),
            )
        except sqlite3.DatabaseError as e:  # not SQLite at all, or not convlog's schema
            raise BadRequestError(f"{path} is not a convlog database: {e}") from e
        for order, raw in cur:
            yield _decode(raw, order)
    finally:
        conn.close()


def envelopes_from_file(path: Path, session_id: str | None) -> Iterator[Envelope | _Undecodable]:
    """Envelopes from a JSONL export (one envelope per line)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
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
    """

    def __init__(self, out: TextIO = sys.stdout, *, fmt: str = "text", quiet: bool = False) -> None:
        if fmt not in ("text", "jsonl"):
            raise BadRequestError(f"unknown format {fmt!r}: use text or jsonl")
        self.out = out
        self.fmt = fmt
        self.quiet = quiet
        self.count = 0
        self.problem: Problem | None = None
        self._prev = GENESIS_HASH
        self._expected = 1

    def feed(self, env: Envelope | _Undecodable, session_id: str) -> None:
        if isinstance(env, _Undecodable):
            if self.problem is None:
                self.problem = Problem(self._expected, f"stored envelope does not decode: {env.error}")
            return
        self.count += 1
        if not self.quiet:
            if self.fmt == "jsonl":
                self.out.write(encode_envelope_line(env).decode() + "\n")
            else:
                self.out.write(render_line(env) + "\n")
        if self.problem is not None:
            return
        if env.session_id != session_id:
            self.problem = Problem(self._expected, f"belongs to session {env.session_id!r}")
        elif env.item_order != self._expected:
            self.problem = Problem(self._expected, f"expected item_order {self._expected}, found {env.item_order}")
        elif envelope_hash(env, self._prev) != env.hash:
            self.problem = Problem(self._expected, "hash does not match the envelope and its predecessor")
        else:
            self._prev = env.hash
            self._expected += 1

    def run_sync(self, source: Iterator[Envelope | _Undecodable], session_id: str) -> None:
        for env in source:
            self.feed(env, session_id)

    async def run_async(self, source: AsyncIterator[Envelope], session_id: str) -> None:
        async for env in source:
            self.feed(env, session_id)


async def replay_from_service(client: LogClient, session_id: str, replayer: Replayer) -> None:
    validate_session_id(session_id)
    await replayer.run_async(client.iter_items(session_id, raw=True), session_id)
