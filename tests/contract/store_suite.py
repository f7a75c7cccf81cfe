"""The conformance suite every :class:`~services.log.store.base.LogStore` passes.

``StoreSuite`` is not collected by itself (no ``Test`` prefix). Each backend's
test module subclasses it, implements :meth:`StoreSuite.make_store` and adds
only what is specific to that backend::

    class TestSQLiteStore(StoreSuite):
        async def make_store(self, tmp_path):
            store = SQLiteStore(tmp_path / "log.db")
            await store.open()
            return store

The helpers the tests share (``item``, ``req``, ``read_all``, ...) are in
:mod:`.store_helpers`.

One test per guarantee of DESIGN.md and the ``LogStore`` docstring: orders
contiguous from 1, all-or-nothing batches, idempotent ``item_id``,
``expected_last`` and the retry-by-ids rule, the retract/clear projections,
paging, the global commit order the outbox relies on, group commit,
durability across a reopen and exclusive ownership of the data.
"""

from __future__ import annotations

from .suite_commits import CommitGuarantees
from .suite_reads import ReadGuarantees
from .suite_writes import WriteGuarantees

__all__ = ["StoreSuite"]


class StoreSuite(WriteGuarantees, ReadGuarantees, CommitGuarantees):
    """Guarantees every log store backend must keep (the parts: :mod:`.suite_writes`,
    :mod:`.suite_reads`, :mod:`.suite_commits`; the abstract store:
    :class:`.store_helpers.SuiteBase`)."""
