"""The two kinds of Agents SDK session the SDK bench compares, and its items."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from shared.agents_session import ConvlogSession
from shared.config import Settings

__all__ = ["ConvlogSessions", "SQLiteSessions", "Sessions", "bench_item"]

_ITEM_TEXT = "I was charged twice for my subscription this month, can you refund one? " * 2


def bench_item(tag: str, n: int, role: str = "user") -> dict[str, Any]:
    if role == "user":
        return {"role": "user", "content": f"[{tag} {n}] {_ITEM_TEXT}"}
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": f"[{tag} {n}] noted", "annotations": []}],
    }


class Sessions:
    """Makes sessions of one kind; every session made is closed by :meth:`close`."""

    name = ""

    def __init__(self) -> None:
        self.sessions: list[Any] = []

    def session(self, sid: str) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        for s in self.sessions:
            result = s.close()
            if asyncio.iscoroutine(result):
                await result
        self.sessions.clear()


class SQLiteSessions(Sessions):
    name = "SQLiteSession"

    def __init__(self, db_path: Path) -> None:
        super().__init__()
        self.db_path = db_path

    def session(self, sid: str) -> Any:
        from agents import SQLiteSession

        s = SQLiteSession(sid, self.db_path)
        self.sessions.append(s)
        return s


class ConvlogSessions(Sessions):
    name = "ConvlogSession"

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        super().__init__()
        self.url = url
        self.settings = settings  # the prefix and credentials of the service at url

    def session(self, sid: str) -> Any:
        opts = {"settings": self.settings} if self.settings is not None else {}
        s = ConvlogSession.from_url(sid, url=self.url, agent="bench", **opts)
        self.sessions.append(s)
        return s
