"""The store protocol every log backend implements.

A store owns ordering: it assigns ``item_order`` (1, 2, 3, ... per session),
computes the hash chain, enforces ``item_id`` idempotency and
``expected_last``, and makes every append durable before it returns.  It also
keeps a global commit *position* (a total order across sessions) that the
outbox uses to publish committed items in order.  The conformance suite in
``tests/contract/store_suite.py`` pins these semantics for every backend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from shared.errors import ConvlogError
from shared.messages import AppendReply, AppendRequest, SessionInfo

__all__ = ["AppendDone", "Committed", "LogStore", "Page", "StoreClosedError"]


class StoreClosedError(RuntimeError):
    """The store was used after :meth:`LogStore.close`."""


@dataclass(frozen=True, slots=True)
class Page:
    """Envelopes as encoded JSON bytes, in ``item_order``.

    Attributes:
        items: each envelope's canonical stored JSON encoding.
        last_order: the session's last ``item_order`` (0 for an empty session).
        more: more items follow the page (forward reads only).
    """

    items: list[bytes]
    last_order: int
    more: bool


@dataclass(frozen=True, slots=True)
class Committed:
    """One committed envelope at its global position (for the outbox)."""

    position: int
    session_id: str
    item_order: int
    envelope: bytes


CommitListener = Callable[[Sequence[Committed]], Awaitable[None] | None]
#: Called once, on the event loop, with an append's reply or its error.
AppendDone = Callable[["AppendReply | ConvlogError"], None]


@runtime_checkable
class LogStore(Protocol):
    """An append-only, per-session ordered, durable log.

    Semantics every implementation guarantees:

    * ``append`` gives the new items of one request contiguous orders right
      after the session's last order, or writes nothing (all-or-nothing).
    * It returns only after the items are durable (survive ``kill -9``).
    * An ``item_id`` already in the session is not written again; the reply
      carries its original order and hash with ``duplicate=True``.
    * With ``expected_last``, the append happens only if the session's last
      order equals it; otherwise a retry is answered by ids: all present ->
      duplicates, none present -> ``ConflictError(last_order)``, some present
      -> ``BadRequestError``.
    * Every commit is reported to commit listeners in global position order.
    """

    async def open(self) -> None:
        """Open (and create or migrate) the store. Idempotent."""

    async def close(self) -> None:
        """Finish in-flight commits, then release resources. Idempotent."""

    async def append(self, session_id: str, request: AppendRequest) -> AppendReply:
        """Append durably; see the class docstring for the rules.

        Raises:
            ConflictError: ``expected_last`` does not match and no item is present.
            BadRequestError: a bad retract target, or a partial retry.
            UnavailableError: the commit failed; nothing was written.
        """

    def submit(self, session_id: str, request: AppendRequest, done: AppendDone) -> None:
        """Queue an append and return at once; ``done`` gets its outcome.

        The same rules as :meth:`append`, without a coroutine or a future per
        request: the log service answers straight from ``done``.  ``done`` is
        called exactly once, after the commit (or with the error), in the order
        the requests were submitted.

        Raises:
            StoreClosedError: the store is closed (``done`` is not called).
        """

    async def read(
        self, session_id: str, *, after: int, limit: int, max_bytes: int, visible: bool = False
    ) -> Page:
        """Envelopes with ``item_order > after`` (only visible items when
        ``visible``), at most ``limit`` and at most ``max_bytes`` of encoded JSON
        (but at least one item if there is any)."""

    async def tail(
        self, session_id: str, n: int, *, visible: bool = True, max_bytes: int | None = None
    ) -> Page:
        """The last ``n`` items (visible ones, or every envelope when not
        ``visible``), in chronological order.  With ``max_bytes``, items whose
        encoded JSON (plus one byte each) is over it are not all read: the page
        is then empty with ``more`` set (the tail cannot fit)."""

    async def last_order(self, session_id: str) -> int:
        """The session's last order, 0 when it has none."""

    async def sessions(self, *, after: str | None, limit: int) -> tuple[list[SessionInfo], bool]:
        """Sessions sorted by id, strictly after ``after``; and whether more follow."""

    async def committed_after(self, position: int, limit: int) -> list[Committed]:
        """Committed envelopes with global position > ``position``, in order."""

    async def position_of(self, session_id: str, item_order: int) -> int | None:
        """The global position of one envelope, or ``None`` if it does not exist."""

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener`` with each committed batch, in position order."""
