"""``convlog migrate --from sqlite:PATH --to jetstream`` (and the reverse).

Copies every session (or those named) from one store to the other with each
envelope byte-identical, then reads the destination back and verifies it:
the same bytes as the source and an intact hash chain.  Resumable: a session
the destination already holds a prefix of continues after it, one that is
complete is skipped.  A session whose destination head differs from the
source's envelope at that order is refused and left untouched (exit 1).
Sessions are copied and verified page by page, so memory does not grow with a
session's length.  Progress goes to stderr, one line per session, and within a
long one a line every few seconds (items copied, then verified, of its total).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from services.log.store.base import LogStore
from services.log.store.factory import open_store
from services.log.store.importer import import_envelopes
from shared.chain import GENESIS_HASH, verify
from shared.codec import decode
from shared.config import Settings
from shared.errors import BadRequestError, ConvlogError, NotFoundError, UnavailableError
from shared.messages import Envelope
from shared.subjects import validate_session_id

from .common import EXIT_FAIL, require_nats, stderr
from .storage import check_service_db, db_in_use, db_lock_path, holds_no_tables

__all__ = ["cmd_migrate", "migrate_arguments"]

_PAGE = 1_000  # items a page of a session's copy holds at most (one JetStream import batch)
_PAGE_BYTES = 4 << 20  # and bytes (or one item): memory does not grow with the session
_BIG = 1 << 40
_PROGRESS_EVERY = 5.0  # seconds between the progress lines within a long session


def _store(spec: str, settings: Settings, *, source: bool = False) -> LogStore:
    """``sqlite:PATH`` or ``jetstream`` (the settings' NATS URL and prefix); a
    ``source`` must exist and hold a log (opening it would create an empty one to copy).  A
    ``sqlite:PATH`` passes the log service's checks (:func:`check_service_db`):
    an SQLite file that is not convlog's never gets convlog's tables, and a
    mistyped directory is not created."""
    kind, _, path = spec.partition(":")
    if kind == "sqlite" and path:
        from services.log.store.sqlite import SQLiteStore

        if source and not Path(path).expanduser().exists():
            raise NotFoundError(f"there is no SQLite log at {path}")
        check_service_db(Path(path).expanduser(), name="--from" if source else "--to")
        if source and holds_no_tables(Path(path).expanduser()):
            raise NotFoundError(f"there is no SQLite log at {path} (the file holds no tables)")
        return SQLiteStore(Path(path).expanduser())
    if kind == "jetstream" and not path:
        from services.log.store.jetstream import JetStreamStore
        from shared.client import connect_options

        require_nats(settings)  # else the store's connection retries forever
        return JetStreamStore(
            connect_options(settings, name="convlog-migrate"),
            subjects=settings.subjects,
            replicas=settings.stream_replicas,
            shards=settings.shards,
            timeout=max(settings.request_timeout, 10.0),
            create=not source,
        )
    raise BadRequestError(f"store {spec!r} is not sqlite:PATH or jetstream")


async def _pages(store: LogStore, sid: str, after: int, last: int) -> AsyncIterator[tuple[int, list[bytes]]]:
    """The session's envelopes ``after+1 .. last`` as ``(order before the page, page)``,
    a page at most ``_PAGE`` items and ``_PAGE_BYTES`` (or one item): what is held at
    once does not grow with the session.

    Raises:
        UnavailableError: the store ends before ``last``.
    """
    while after < last:
        page = (await store.read(sid, after=after, limit=min(_PAGE, last - after), max_bytes=_PAGE_BYTES)).items
        if not page:
            raise UnavailableError(f"the store ends at item {after} of session {sid!r}, not {last}")
        yield after, page
        after += len(page)


def _digest(h: Any, page: list[bytes]) -> None:
    """Feed envelopes to a digest, each with its length (no two runs of bytes hash as
    one) and its type (an SQLite row edited by hand can hold text, not bytes)."""
    for b in page:
        raw = b if isinstance(b, bytes) else str(b).encode("utf-8", "surrogatepass")
        h.update(b"b" if raw is b else b"s")
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)


def _verified(sid: str, page: list[bytes], after: int, prev: str) -> str:
    """The hash of a page's last envelope, the page continuing the chain at ``after``/``prev``
    (its decoded envelopes go with the call: only a page of bytes is held meanwhile).

    Raises:
        BadRequestError: the page breaks the chain.
    """
    envelopes = [decode(b, Envelope) for b in page]
    problem = verify(envelopes, session_id=sid, after=after, prev_hash=prev)
    if problem is not None:
        raise BadRequestError(f"verification failed after copying: {problem}")
    return envelopes[-1].hash


async def _sessions(store: LogStore) -> list[str]:
    out: list[str] = []
    after = None
    while True:
        infos, more = await store.sessions(after=after, limit=1000)
        out += [i.session_id for i in infos]
        if not more or not infos:
            return out
        after = infos[-1].session_id


async def _landed(dst: LogStore, sid: str, page: list[bytes], after: int) -> int:
    """How many of ``page`` (orders after ``after``) a failed import of it stored all
    the same (the JetStream store imports in batches of up to 1000); 0 if unknown."""
    try:
        head = await dst.last_order(sid)
        if head <= after:
            return 0
        there = (await dst.read(sid, after=after, limit=min(head - after, len(page)), max_bytes=_BIG)).items
    except ConvlogError:
        return 0
    done = 0
    for theirs, ours in zip(there, page, strict=False):
        if theirs != ours:
            break
        done += 1
    return done


class _Progress:
    """Progress lines within a long session: at most one every ``_PROGRESS_EVERY`` seconds."""

    def __init__(self, where: str, total: int, say: Callable[[str], None]) -> None:
        self.where, self.total, self.say = where, total, say
        self.next = time.monotonic() + _PROGRESS_EVERY

    def __call__(self, doing: str, done: int) -> None:
        if time.monotonic() >= self.next:
            self.say(f"migrate {self.where}: {doing} {done} of {self.total} items")
            self.next = time.monotonic() + _PROGRESS_EVERY


async def _copy(src: LogStore, dst: LogStore, sid: str, where: str, say: Callable[[str], None],
                stored: list[int]) -> tuple[int, int]:
    """Copy one session page by page, then verify the destination's copy page by page;
    ``(items in the source, destination's head before)``.  ``stored[0]`` counts the
    items this run stored, as it goes (what a failure leaves copied).

    The source's envelopes are read once, each page fed to a digest and the part after
    the destination's head imported; the destination is then read back once, its chain
    verified and its bytes fed to a digest of their own: equal digests are the same
    bytes, and neither session is ever held whole.

    Raises:
        ConvlogError: the session cannot be copied, or its copy does not verify.
    """
    last = await src.last_order(sid)  # a JetStream source may grow meanwhile: this much is copied
    if not last:
        raise NotFoundError(f"the source has no session {sid!r}")
    head = await dst.last_order(sid)
    if head > last:
        raise BadRequestError(f"destination holds {head} items, the source only {last}")
    if head:
        there = (await dst.read(sid, after=head - 1, limit=1, max_bytes=_BIG)).items
        ours = (await src.read(sid, after=head - 1, limit=1, max_bytes=_BIG)).items
        if there != ours:
            raise BadRequestError(f"destination item {head} differs from the source's")
    progress = _Progress(where, last, say)
    source = hashlib.sha256()
    async for after, page in _pages(src, sid, 0, last):
        _digest(source, page)
        new = page[max(0, head - after):]
        if new:
            at = after + len(page) - len(new)
            try:
                await import_envelopes(dst, sid, new, after=at)
            except ConvlogError:
                stored[0] += await _landed(dst, sid, new, at)
                raise
            stored[0] += len(new)
        progress("copied", max(head, after + len(page)))  # a prefix held already counts as copied
    copy, prev = hashlib.sha256(), GENESIS_HASH
    async for after, page in _pages(dst, sid, 0, last):
        _digest(copy, page)
        prev = _verified(sid, page, after, prev)
        progress("verified", after + len(page))
    if copy.digest() != source.digest():
        raise BadRequestError("verification failed after copying: bytes differ")
    return last, head


async def migrate(
    src: LogStore, dst: LogStore, sessions: list[str] | None, say: Callable[[str], None]
) -> int:
    """Copy and verify; the number of sessions refused or failed."""
    sids = sessions if sessions is not None else await _sessions(src)
    failed = 0
    copied_total = 0
    for n, sid in enumerate(sids, 1):
        where = f"[{n}/{len(sids)}] {sid}"
        stored = [0]
        try:
            last, head = await _copy(src, dst, sid, where, say, stored)
        except ConvlogError as e:
            failed += 1
            if isinstance(e, UnavailableError) and not all(getattr(st, "connected", True) for st in (src, dst)):
                # NATS went away: every session left would wait out its timeouts in turn
                say(f"migrate {where}: FAILED (run again to resume): {e.message}")
                raise UnavailableError(f"{e.message}; stopped at session {n} of {len(sids)}, "
                                       "run again to resume") from e
            done = stored[0]
            if done:
                copied_total += done
                say(f"migrate {where}: FAILED after copying {done} items (run again to resume): {e.message}")
            else:
                say(f"migrate {where}: REFUSED, left untouched: {e.message}")
            continue
        copied_total += last - head
        resumed = f" (resumed after {head})" if head else ""
        say(f"migrate {where}: {last - head} copied{resumed}, {last} items verified")
    say(f"migrate: {len(sids) - failed} of {len(sids)} sessions verified, {copied_total} items copied, "
        f"{failed} refused")
    return failed


def _where(spec: str) -> str:
    """What a store spec names: ``sqlite:`` with its file's resolved path (``a.db`` and
    ``./a.db`` are one file), or the spec itself."""
    kind, _, path = spec.partition(":")
    return f"sqlite:{Path(path).expanduser().resolve()}" if kind == "sqlite" and path else spec


async def _check_login(settings: Settings) -> None:
    """Log in to NATS once, as the JetStream store will: the store's own connection
    retries a refused login for ever.

    Raises:
        ConfigError: NATS refused the credentials (naming the setting).
    """
    from shared.client import connect_options
    from shared.nats_connect import connect

    nc = await connect(settings, connect_options(settings, name="convlog-migrate"))
    await nc.close()


def _beside(spec: str, other: str) -> bool:
    """``spec`` is a ``sqlite:`` file that SQLite or convlog keeps beside ``other``'s
    database (its write-ahead log, shared memory, rollback journal, lock file): opened
    as a log of its own, it would be written under the other store's feet."""
    kind, _, path = spec.partition(":")
    okind, _, opath = other.partition(":")
    if not (kind == okind == "sqlite" and path and opath):
        return False
    db = Path(opath).expanduser().resolve()
    sides = {Path(f"{db}{end}") for end in ("-wal", "-shm", "-journal")} | {db_lock_path(db)}
    return Path(path).expanduser().resolve() in sides


def _held(spec: str) -> bool:
    """A ``sqlite:PATH`` whose file a running log service holds (its lock)."""
    kind, _, path = spec.partition(":")
    return kind == "sqlite" and db_in_use(Path(path).expanduser())


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    for flag, spec, other in (("--to", args.dest, args.source), ("--from", args.source, args.dest)):
        if _beside(spec, other):
            # The copy went into the source's WAL while the source had it open, was
            # verified there, and the source's close truncated it: exit 0, nothing copied.
            raise BadRequestError(f"{flag} {spec} is a file SQLite keeps beside the other store's "
                                  "database (its -wal, -shm, -journal or lock file): name another file")
    src, dst = _store(args.source, settings, source=True), _store(args.dest, settings)
    if _where(args.source) == _where(args.dest):
        raise BadRequestError("--from and --to name the same store")
    for flag, spec in (("--from", args.source), ("--to", args.dest)):
        if _held(spec):  # running: not "unavailable" (exit 3)
            stderr(f"convlog migrate: a log service holds {spec.partition(':')[2]} ({flag}); stop it first")
            return EXIT_FAIL
    sessions = [validate_session_id(s) for s in args.sessions.split(",")] if args.sessions is not None else None
    if "jetstream" in (args.source, args.dest):
        await _check_login(settings)
    await open_store(src, wait=0)  # JetStream's refusal to set it up (another stream on its subjects): exit 2
    try:
        await open_store(dst, wait=0)
        try:
            failed = await migrate(src, dst, sessions, lambda m: print(m, file=sys.stderr, flush=True))
        finally:
            await dst.close()
    finally:
        await src.close()
    return 1 if failed else 0


def migrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="STORE",
                   help="sqlite:PATH or jetstream (CONVLOG_NATS_URL, CONVLOG_PREFIX)")
    p.add_argument("--to", dest="dest", required=True, metavar="STORE", help="sqlite:PATH or jetstream")
    p.add_argument("--sessions", help="only these sessions (comma-separated)")
