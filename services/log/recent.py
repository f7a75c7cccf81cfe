"""The last committed envelopes of busy sessions, for the turn notices to carry.

A worker starting a turn needs the items the log holds up to the trigger that
its own copy of the session lacks -- usually the previous turn's reply and the
new user message.  The log service has just committed them, so a notice can
carry them (:attr:`shared.work.Notice.items`) and spare the worker its read.

Per session only a contiguous run ending at the newest commit this process saw
is kept (a gap -- items committed by another log-service instance, a restart --
starts the run again), at most :data:`ITEMS` items and :data:`BYTES` bytes, for
the :data:`SESSIONS` sessions committed to most recently.  A notice carries the
whole run while it starts at order 1 (a young session: the worker folds the
window from it), else the last :data:`TAIL` items.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import msgspec

__all__ = ["BYTES", "ITEMS", "SESSIONS", "TAIL", "Recent"]

ITEMS = 32
BYTES = 16_384
SESSIONS = 4_096
TAIL = 8


class Recent:
    """Contiguous runs of committed envelopes per session (see the module docstring)."""

    def __init__(self, *, sessions: int = SESSIONS, items: int = ITEMS, max_bytes: int = BYTES) -> None:
        self.sessions = sessions
        self.items = items
        self.max_bytes = max_bytes
        # sid -> (first order kept, envelopes from it on, their bytes)
        self._runs: OrderedDict[str, tuple[int, deque[bytes], int]] = OrderedDict()

    def add(self, sid: str, order: int, envelope: bytes) -> None:
        """One committed envelope (called in commit order)."""
        run = self._runs.get(sid)
        if run is None or run[0] + len(run[1]) != order:
            run = (order, deque(), 0)
        first, envs, size = run
        envs.append(envelope)
        size += len(envelope)
        while envs and (len(envs) > self.items or size > self.max_bytes):
            size -= len(envs.popleft())
            first += 1
        self._runs[sid] = (first, envs, size)
        self._runs.move_to_end(sid)
        if len(self._runs) > self.sessions:
            self._runs.popitem(last=False)

    def carry(self, sid: str, order: int) -> tuple[msgspec.Raw, ...]:
        """What a notice of ``sid``'s item ``order`` carries: the run ending at it, or nothing."""
        run = self._runs.get(sid)
        if run is None:
            return ()
        first, envs, _ = run
        if not first <= order < first + len(envs):
            return ()  # not kept (or not committed yet): the worker reads
        keep = list(envs)[: order - first + 1]
        if first != 1:
            keep = keep[-TAIL:]
        return tuple(msgspec.Raw(e) for e in keep)
