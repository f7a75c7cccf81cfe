"""The JetStream store: the log, and its fan-out, in one JetStream stream.

:mod:`.layout` (subjects and stream settings), :mod:`.api` (atomic batch
publish, direct gets), :mod:`.index` (per-session caches), :mod:`.store`
(the :class:`JetStreamStore` recorder on the shared group committer).
"""

from .layout import Layout, ensure_log_stream
from .store import MAX_ITEMS_PER_APPEND, JetStreamStore

__all__ = ["MAX_ITEMS_PER_APPEND", "JetStreamStore", "Layout", "ensure_log_stream"]
