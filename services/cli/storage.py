"""Before a process writes to disk: say what is wrong with which path.

The log service's SQLite file must be convlog's (an unrelated SQLite file is
never given convlog's tables), its directory must exist when it was named
explicitly (a typo in ``--db`` must not create a new, empty log somewhere
else), and the data directory, the database, its WAL files and its lock file
must be writable.  Each problem is one :class:`ConfigError` naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import urllib.parse
from pathlib import Path

from shared.config import ConfigError

__all__ = ["DatabaseInUseError", "check_data_dir", "check_service_db", "db_lock_path", "db_in_use"]

SQLITE_MAGIC = b"SQLite format 3\x00"
#: Tables and columns that make an SQLite file a convlog log.
CONVLOG_TABLES = {"items": {"session_id", "item_order", "envelope"}, "sessions": {"session_id"}}


def db_lock_path(db: Path) -> Path:
    """The lock file :class:`services.log.store.sqlite.SQLiteStore` holds while it writes ``db``."""
    from services.log.store.sqlite.datastore import db_lock_path as store_lock_path

    return store_lock_path(db)


def check_data_dir(data_dir: Path, *, name: str = "CONVLOG_DATA_DIR") -> None:
    """Create the data directory if needed; it must be a writable directory."""
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"{name}: {data_dir} is not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{name}: cannot create {data_dir}: {e.strerror}") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: {data_dir} is not writable (read-only?)")


def read_only_uri(db: Path) -> str:
    """The SQLite URI that opens ``db`` read-only (``uri=True``), its name percent-quoted:
    a ``#``, ``?`` or ``%`` in a path is part of the name, not of the URI.  Quoted as the
    bytes of the name on disk, which need not be UTF-8."""
    return f"file:{urllib.parse.quote(os.fsencode(db))}?mode=ro"


def _convlog_schema_problem(db: Path) -> str | None:
    """Why ``db`` is not a convlog log, or ``None`` when it is one (or empty)."""
    try:
        with open(db, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        return f"cannot read it: {e.strerror}"
    if not head:
        return None  # an empty file: SQLite makes a new database of it
    if head != SQLITE_MAGIC:
        return "it is not an SQLite database"
    try:
        conn = sqlite3.connect(read_only_uri(db), uri=True)
    except sqlite3.Error as e:
        return f"cannot open it: {e}"
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return None
        for table, columns in CONVLOG_TABLES.items():
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if not columns <= have:
                return (f"it is an SQLite database but not a convlog log (tables: "
                        f"{', '.join(sorted(tables))})")
    except sqlite3.Error as e:
        return f"cannot read it: {e}"
    finally:
        conn.close()
    return None


def holds_no_tables(db: Path) -> bool:
    """True when ``db`` (an existing file) holds no table at all: an empty file or an
    SQLite database with none, which opening as a log would make its tables in."""
    try:
        if db.stat().st_size == 0:
            return True
        conn = sqlite3.connect(read_only_uri(db), uri=True)
    except (OSError, sqlite3.Error):
        return False  # check_service_db names what is wrong with it
    try:
        return conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] == 0
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def check_service_db(db: Path, *, name: str | None, data_dir_name: str = "CONVLOG_DATA_DIR") -> None:
    """Everything the log service needs from its SQLite path, before it opens it.

    Args:
        db: the database file.
        name: the flag or variable that named ``db`` (``--db``, ``CONVLOG_DB``),
            or ``None`` for the default under the data directory (whose
            directory is then created).
        data_dir_name: what named the data directory (``--data-dir``,
            ``CONVLOG_DATA_DIR``), for a default ``db``.

    Raises:
        ConfigError: one line naming the path and what is wrong with it.
    """
    label = f"{name}: {db}" if name else f"database {db}"
    parent = db.parent
    if name is None:
        check_data_dir(parent, name=data_dir_name)
    elif not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ConfigError(f"{name}: the directory {parent} {what} (create it first)")
    if db.exists() and not db.is_file():
        raise ConfigError(f"{label}: not a regular file")
    # The directory and SQLite's side files first: the schema check cannot open a log in
    # WAL mode, even read-only, where SQLite may not make its -shm file, and that failure
    # ("cannot read it: attempt to write a readonly database; refusing to use it as
    # convlog's log") hid the real problem, a read-only directory or mount.
    for path in (parent, db_lock_path(db), Path(f"{db}-wal"), Path(f"{db}-shm")):
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError(f"{label}: {path} is not writable (read-only?)")
    if db.exists():
        problem = _convlog_schema_problem(db)
        if problem is not None:
            raise ConfigError(f"{label}: {problem}; refusing to use it as convlog's log")
        if not os.access(db, os.R_OK | os.W_OK):
            raise ConfigError(f"{label}: not writable (read-only?)")


class DatabaseInUseError(RuntimeError):
    """A log service holds the database: one line, exit 1 (a stack already running)."""


def db_in_use(db: Path) -> bool:
    """True when a log service holds ``db``'s lock (without taking it): its lock file,
    or the database file itself (locked too: a service on a hard link of ``db`` holds
    another lock file)."""
    return _flock_held(db_lock_path(db)) or _flock_held(db)


def _flock_held(path: Path) -> bool:
    """True when another open file holds an exclusive ``flock`` on ``path``."""
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # not lockable here (ENOLCK): the store's own lock says why
            return False
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
