"""The JetStream store: the log in N log streams, their fan-out in one.

:mod:`.layout` (subjects and stream settings), :mod:`.api` (publishes and
atomic batches with their acks, direct gets), :mod:`.index` (per-session
caches), :mod:`.commit` (the write side), :mod:`.reads` (the read side),
:mod:`.store` (the :class:`JetStreamStore` recorder on the shared group
committer).
"""

from .layout import Layout, ensure_streams
from .store import MAX_ITEMS_PER_APPEND, JetStreamStore

__all__ = ["MAX_ITEMS_PER_APPEND", "JetStreamStore", "Layout", "ensure_streams"]
