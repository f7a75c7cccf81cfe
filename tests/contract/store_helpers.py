"""Helpers of the store conformance suite (:mod:`.store_suite`): request builders,
whole-session reads, and :class:`SuiteBase`, the abstract store every part of the
suite runs on."""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.log.store.base import LogStore
from shared.messages import AppendItem, AppendRequest, Envelope

__all__ = [
    "BIG",
    "RFC3339_MICRO",
    "SuiteBase",
    "clear",
    "contents",
    "envs",
    "item",
    "item_id_suffix",
    "orders",
    "read_all",
    "req",
    "retract",
]

BIG = 1 << 30
RFC3339_MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


# -- helpers -------------------------------------------------------------------


def item(content: str = "hi", *, item_id: str | None = None, agent: str = "user") -> AppendItem:
    """A user message item as the Agents SDK stores it."""
    return AppendItem(agent=agent, data={"role": "user", "content": content}, item_id=item_id)


def retract(target: Any, *, item_id: str | None = None) -> AppendItem:
    return AppendItem(agent="system", kind="retract", data={"target": target}, item_id=item_id)


def clear(*, item_id: str | None = None) -> AppendItem:
    return AppendItem(agent="system", kind="clear", item_id=item_id)


def req(*items: AppendItem, expected_last: int | None = None) -> AppendRequest:
    return AppendRequest(items=list(items), expected_last=expected_last)


def envs(raw: Sequence[bytes]) -> list[Envelope]:
    return [msgspec.json.decode(b, type=Envelope) for b in raw]


async def read_all(store: LogStore, sid: str, *, visible_only: bool = False) -> list[Envelope]:
    page = await store.read(sid, after=0, limit=100_000, max_bytes=BIG, visible=visible_only)
    assert not page.more
    return envs(page.items)


def contents(items: Sequence[Envelope]) -> list[str]:
    return [e.data["content"] for e in items]


def orders(items: Sequence[Envelope]) -> list[int]:
    return [e.item_order for e in items]


def item_id_suffix(i: int) -> AppendItem:
    """A second item per request with a predictable id (``id-<i>``)."""
    return item(f"{i}b", item_id=f"id-{i}")


class SuiteBase(abc.ABC):
    """The store under test: a backend implements :meth:`make_store`; the ``store``
    fixture opens one per test and closes it."""

    @abc.abstractmethod
    async def make_store(self, tmp_path: Path) -> LogStore:
        """Return an *opened* store whose data lives under ``tmp_path``.

        Calling it again with the same ``tmp_path`` must open the same data
        (the durability and exclusive-ownership tests rely on it).
        """

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[LogStore]:
        s = await self.make_store(tmp_path)
        try:
            yield s
        finally:
            await s.close()
