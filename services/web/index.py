"""The sessions listing behind ``/``: newest first, filtered by id prefix.

``convlog.sessions`` pages in session-id order, so "newest first" needs the
whole list: it is fetched through :class:`~shared.client.LogClient` and kept
for ``ttl`` seconds.  A prefix filter scans only from the prefix on (ids are
served in order).  The agents of a session are found by reading its raw
envelopes once and then only what was appended since, so a page of sessions
costs one read per session that changed.  A long session is scanned at most
``scan_budget`` envelopes per listing, and a listing's sessions together at most
``listing_budget`` (an equal share each), so the first listing of a page of
sessions with millions of items stays fast; the agents of a session not scanned
to its end are marked as partial and the next listing continues where this one
stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from shared.client import LogClient
from shared.messages import Envelope, SessionInfo

__all__ = ["SessionIndex", "SessionRow"]

_NOT_AGENTS = frozenset({"user", "system"})


@dataclass
class _Authors:
    last_order: int = 0
    agents: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    items: int
    updated_at: str
    agents: list[str]
    agents_partial: bool = False

    def as_json(self) -> dict[str, object]:
        return {"session_id": self.session_id, "items": self.items, "updated_at": self.updated_at,
                "agents": self.agents, "agents_partial": self.agents_partial}


def _cursor(info: SessionInfo) -> str:
    return f"{info.updated_at}|{info.session_id}"


class SessionIndex:
    """Cached, sorted session listings and the agents of each session.

    Args:
        client: the log client.
        ttl: seconds a fetched listing is reused.
        max_sessions_cached: bound on the per-session agents cache (LRU).
        scan_budget: envelopes one session is scanned for its agents per listing.
        listing_budget: envelopes the sessions of one page are scanned together, each
            an equal share: a page of 50 long sessions at ``scan_budget`` each read a
            million envelopes (10-30 s) before the page showed anything.
    """

    def __init__(self, client: LogClient, *, ttl: float = 2.0, max_sessions_cached: int = 50_000,
                 scan_budget: int = 20_000, listing_budget: int = 10_000) -> None:
        self.client = client
        self.scan_budget = scan_budget
        self.listing_budget = listing_budget
        self.ttl = ttl
        self.max_cached = max_sessions_cached
        self._lists: OrderedDict[str, tuple[float, list[SessionInfo]]] = OrderedDict()
        self._authors: OrderedDict[str, _Authors] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._reads = asyncio.Semaphore(8)

    async def _listing(self, prefix: str) -> list[SessionInfo]:
        hit = self._lists.get(prefix)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        out: list[SessionInfo] = []
        # Ids come in byte order: start just before the prefix, stop past it.
        after: str | None = (prefix[:-1] or None) if prefix else None
        done = False
        while not done:
            rep = await self.client.sessions(after=after, limit=1000)
            for s in rep.sessions:
                if s.session_id.startswith(prefix):
                    out.append(s)
                elif s.session_id[: len(prefix)] > prefix:
                    done = True
                    break
            if not rep.sessions or not rep.more:
                break
            after = rep.sessions[-1].session_id
        out.sort(key=lambda s: (s.updated_at, s.session_id), reverse=True)
        self._lists[prefix] = (now, out)
        self._lists.move_to_end(prefix)
        while len(self._lists) > 32:
            self._lists.popitem(last=False)
        return out

    async def agents(self, info: SessionInfo, budget: int | None = None) -> tuple[list[str], bool]:
        """The agents (not ``user`` or ``system``) that wrote in the session, first seen
        first, and whether the scan is still short of the session's end.  At most
        ``budget`` (default ``scan_budget``) envelopes are scanned, read in pages of
        that many (up to the log's default page of 10,000; the page it reads ahead is
        asked for, then dropped)."""
        budget = max(1, min(self.scan_budget, budget or self.scan_budget))
        sid = info.session_id
        lock = self._locks.setdefault(sid, asyncio.Lock())
        async with lock:
            entry = self._authors.get(sid) or _Authors()
            if entry.last_order < info.last_order:
                async with self._reads:
                    # audit_items: an envelope that does not decode (a log edited by hand) has
                    # no agent to show; the page of the session names it.
                    async for env in self.client.audit_items(sid, after=entry.last_order, page=min(budget, 10_000)):
                        if isinstance(env, Envelope) and env.agent not in _NOT_AGENTS and env.agent not in entry.agents:
                            entry.agents.append(env.agent)
                        entry.last_order = env.item_order
                        budget -= 1
                        if budget <= 0:
                            break
            self._authors[sid] = entry
            self._authors.move_to_end(sid)
            while len(self._authors) > self.max_cached:
                old, _ = self._authors.popitem(last=False)
                self._locks.pop(old, None)
        return list(entry.agents), entry.last_order < info.last_order

    async def page(self, *, prefix: str = "", cursor: str | None = None,
                   limit: int = 50) -> tuple[list[SessionRow], str | None, int]:
        """One page, newest first: (rows, cursor of the next page or ``None``, total matching)."""
        listing = await self._listing(prefix)
        start = 0
        if cursor:
            # The first entry strictly older than the cursor (the list is sorted descending).
            lo, hi = 0, len(listing)
            while lo < hi:
                mid = (lo + hi) // 2
                if _cursor(listing[mid]) >= cursor:
                    lo = mid + 1
                else:
                    hi = mid
            start = lo
        chosen = listing[start : start + limit]
        share = self.listing_budget // max(1, len(chosen))  # what one session's scan may read
        agents = await asyncio.gather(*(self.agents(s, share) for s in chosen))
        rows = [SessionRow(s.session_id, s.last_order, s.updated_at, a, partial)
                for s, (a, partial) in zip(chosen, agents, strict=True)]
        more = start + limit < len(listing)
        return rows, (_cursor(chosen[-1]) if more and chosen else None), len(listing)
