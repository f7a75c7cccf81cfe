"""The ``Session`` methods that hide history: ``pop_item``, ``clear_session``
and the compaction's ``_atomic_replace_items`` and ``_get_compaction_snapshot``
(mixed into ``ConvlogSession``).

Nothing is destroyed: ``pop_item`` appends a ``retract`` of the newest visible
item, ``clear_session`` a ``clear``; audit replay still shows the hidden
items and what hid them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from .agents_sdk import compaction_snapshot_type, finish, plain, tracked
from .client import new_item_id
from .errors import ConflictError, TooLargeError, UnavailableError
from .failures import CONFLICT_BACKOFF
from .work import NO_TURN_PREFIX

__all__ = ["HidingEdits"]

POP_ATTEMPTS = 50
_TAIL_MAX = 100_000  # the largest ``tail`` a read request may ask for


class HidingEdits:
    """``pop_item``, ``clear_session``, ``_atomic_replace_items`` on what the session provides."""

    session_id: str
    # what ConvlogSession provides
    _log: Callable[[], Any]
    _current_copy: Callable[..., Any]
    _acked: Callable[..., None]
    _log_read: Callable[..., Any]  # a read of the session, never behind this connection's writes
    _agent_for: Callable[[Any], str]
    _author: Callable[[Mapping[str, Any], str], str]
    _items_are_plain: Callable[[], bool]  # add_items/get_items not overridden
    # the retract, expected_last and item of a pop that ended without a known outcome
    _unknown_pop: tuple[dict[str, Any], int, Any] | None = None

    @tracked
    async def pop_item(self, *, wrapper: Any = None) -> dict[str, Any] | None:
        """Hide the newest visible item with a ``retract`` and return it (``None`` when empty).

        The retract is conditional on the session's last order, so a write by
        another process in between makes this pop look again rather than hide
        an item that is no longer the newest.  A pop that ended without a known
        outcome (``UnavailableError``) is finished by the next ``pop_item`` of
        this session object, unless it added or cleared meanwhile: it sends the
        same retract again (the log answers it as a duplicate if it landed) and
        returns that item, never hiding two.
        """
        client = await self._log()
        agent = self._agent_for(wrapper)
        # A pop that ended without a known outcome: its retract is sent again first, with
        # its id and expected_last, so the log answers it as a duplicate if it landed
        # (this pop then hid that item) instead of this call hiding one more.
        unknown, self._unknown_pop = self._unknown_pop, None
        behind: int | None = None  # the log's last order a conflict showed behind the copy
        for attempt in range(POP_ATTEMPTS):
            copy = await self._current_copy(client, 1)
            if copy is not None and behind is not None and copy.last <= behind:
                behind = None  # the copy is no further than the log: it answers again
            if unknown is not None:
                (retract, last, data), unknown = unknown, None
            else:
                newest = copy.newest() if copy is not None else None
                if copy is not None and newest is not None and behind is None:
                    (order, data), last = newest, copy.last
                else:  # an empty copy may not have another process's write yet: ask the log
                    # (a copy the log is behind, which it never reaches if the copy took a
                    # forged delivery: the log's newest, not waiting for the copy's order;
                    # the retract is conditional on the log's last order anyway)
                    rep = await self._log_read(client, tail=1, deliveries=behind is None)
                    if not rep.items:
                        return None
                    order, data, last = rep.items[0].item_order, rep.items[0].data, rep.last_order
                retract = {
                    "item_id": f"{new_item_id()}.r",
                    "agent": agent,
                    "kind": "retract",
                    "data": {"target": order},
                }
            try:
                await finish(self._write(client, [retract], expected_last=last))
            except ConflictError as e:
                if copy is not None and e.last_order < copy.last:
                    behind = e.last_order  # the copy took a delivery the log does not hold (yet)
                elif copy is not None:
                    behind = None
                    await copy.fill()  # someone wrote after what the copy holds
                await asyncio.sleep(CONFLICT_BACKOFF.delay(attempt - 1) if attempt else 0)
                continue
            except UnavailableError:
                self._unknown_pop = (retract, last, data)
                raise
            except asyncio.CancelledError as e:  # finish chains the write's own failure
                if isinstance(e.__cause__, UnavailableError):
                    self._unknown_pop = (retract, last, data)
                raise
            return data
        raise UnavailableError(
            f"pop_item on session {self.session_id!r} lost the race to other writers "
            f"{POP_ATTEMPTS} times in a row"
        )

    @tracked
    async def clear_session(self, *, wrapper: Any = None) -> None:
        """Hide every item so far with a ``clear``; nothing is written when nothing is visible."""
        client = await self._log()
        self._unknown_pop = None  # a later pop is a new one
        copy = await self._current_copy(client, 1)
        if copy is None or copy.newest() is None:  # an empty copy may be behind: ask the log
            if not (await self._log_read(client, tail=1)).items:
                return
        entry = {
            "item_id": f"{new_item_id()}.c",
            "agent": self._agent_for(wrapper),
            "kind": "clear",
            "data": {},
        }
        await finish(self._write(client, [entry]))

    @tracked
    async def _atomic_replace_items(self, items: list[Any]) -> bool:
        """Replace the visible history with ``items``: a ``clear`` and the items, in ONE append.

        The SDK's ``OpenAIResponsesCompactionSession`` calls this (when the
        session has it) instead of ``clear_session()`` then ``add_items()``, so
        no reader ever sees the history empty in between and a crash leaves
        the old history or the new one.  The log keeps every item the clear
        hides.  Like the SDK's own stores, it does not check whether the
        history changed since the compaction read it.  The clear and the
        non-user items are recorded as ``system`` (compaction is nobody's turn).
        None of it starts a turn (``noturn:`` ids): the user messages put back
        were answered when they were first added.

        Returns:
            True when replaced; False for a subclass that overrides how items
            are read or written (the SDK then clears and adds through them).
        """
        if not self._items_are_plain():
            return False
        client = await self._log()
        self._unknown_pop = None  # a later pop is a new one
        key = NO_TURN_PREFIX + new_item_id()
        batch = [{"item_id": f"{key}.c", "agent": "system", "kind": "clear", "data": {}}]
        batch += [
            {"item_id": f"{key}.{i}", "agent": self._author(d, "system"), "kind": "item", "data": d}
            for i, d in enumerate(plain(i) for i in items)
        ]
        await finish(self._write(client, batch))
        return True

    async def _get_compaction_snapshot(self, limit: int, *, prune_prefix: Any = None) -> Any:
        """The last ``limit`` visible items for the SDK's automatic compaction, with a
        replacement conditional on the log not having changed since (``expected_last``).

        Like the SDK's ``SQLiteSession``: a write by anyone after this read (another
        process's ``add_items``) makes the replacement return False, so the SDK skips
        it instead of hiding that write under the compacted history.  A replacement of
        the whole history is a ``clear`` and the new items; of a newer part only, a
        ``retract`` of each replaced item and the new items; one append either way.
        ``None`` (the SDK then reads through ``get_items``) for a subclass that
        overrides how items are read or written, or a read too large for one reply.
        ``prune_prefix`` (the SDK's ``EncryptedSession`` naming expired items the
        store may delete) is ignored: the log deletes nothing.
        """
        snapshot = compaction_snapshot_type()
        if snapshot is None or not self._items_are_plain() or limit + 1 > _TAIL_MAX:
            return None

        client = await self._log()
        try:
            rep = await self._log_read(client, tail=limit + 1)
        except TooLargeError:
            return None
        envs = list(rep.items)
        complete = len(envs) <= limit
        envs = envs[-limit:] if limit > 0 else []
        last = rep.last_order

        async def replace_suffix(start: int, output: list[Any]) -> bool:
            return await self._replace_suffix(client, envs, complete, last, start, output)

        return snapshot([env.data for env in envs], complete, replace_suffix)

    @tracked
    async def _replace_suffix(
        self, client: Any, envs: list[Any], complete: bool, last: int, start: int, output: list[Any]
    ) -> bool:
        """Replace ``envs[start:]`` with ``output`` if the log's last order is still ``last``."""
        replaced = envs[start:]
        if not replaced:
            return False
        self._unknown_pop = None  # a later pop is a new one
        key = NO_TURN_PREFIX + new_item_id()
        if start == 0 and complete:
            batch = [{"item_id": f"{key}.c", "agent": "system", "kind": "clear", "data": {}}]
        else:
            batch = [
                {"item_id": f"{key}.r{j}", "agent": "system", "kind": "retract",
                 "data": {"target": env.item_order}}
                for j, env in enumerate(replaced)
            ]
        batch += [
            {"item_id": f"{key}.{i}", "agent": self._author(d, "system"), "kind": "item", "data": d}
            for i, d in enumerate(plain(i) for i in output)
        ]
        try:
            await finish(self._write(client, batch, expected_last=last))
        except ConflictError:
            return False
        return True

    async def _write(self, client: Any, batch: list[dict[str, Any]], **kw: Any) -> None:
        """Append ``batch`` and tell the copy (in the task :func:`finish` runs, so a
        caller cancelled meanwhile still reads its write afterwards)."""
        reply = await client.append(self.session_id, batch, **kw)
        self._acked(client, reply.items, batch)
