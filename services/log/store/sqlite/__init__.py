"""The SQLite store: WAL, ``synchronous=FULL``, one writer, group commit.

Split the way the eventsourcing library splits its recorders:
:mod:`.datastore` (the file, connections, pragmas, lock, checkpoints),
:mod:`..committer` (group commit, shared with every backend) and
:mod:`.recorder` (the SQL plus the ordering rules of :mod:`..ordering`).
"""

from .datastore import SQLiteDatastore
from .recorder import SQLiteStore

__all__ = ["SQLiteDatastore", "SQLiteStore"]
