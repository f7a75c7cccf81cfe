"""The README's "Restoring the SQLite log from a backup", step 2, done as written on
the real SQLite store: after a log service that was killed (its `-wal` and `-shm`
left next to the database), the database must then hold the backup's log, not
the lost one read back in from that WAL."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from services.log.store.sqlite import SQLiteStore
from tests.contract.store_helpers import contents, item, read_all, req

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _step_2() -> str:
    section = README.split("### Restoring the SQLite log from a backup", 1)[1].split("\n### ", 1)[0]
    return section.split("\n2. ", 1)[1].split("\n3. ", 1)[0]


def _deleted_before_the_backup_goes_in() -> set[str]:
    """The suffixes of the database's files step 2 says to delete before the backup goes in."""
    before, _, _ = _step_2().partition("put the backup in place")
    if "delete" not in before:
        return set()
    return set(re.findall(r"`[^`]*?(-wal|-shm)`", before))


async def test_the_restore_steps_give_the_backups_log_after_a_killed_log_service(tmp_path: Path) -> None:
    live, backup, crashed = tmp_path / "live", tmp_path / "backup", tmp_path / "crashed"
    for d in (live, backup, crashed):
        d.mkdir()
    store = SQLiteStore(live / "convlog.db")
    await store.open()
    await store.append("s", req(item("kept 1"), item("kept 2")))
    await store.close()
    shutil.copy2(live / "convlog.db", backup / "convlog.db")  # the backup: the service stopped

    store = SQLiteStore(live / "convlog.db")
    store.checkpoint_interval = 3600.0  # what the lost items are is all in the WAL
    await store.open()
    try:
        for i in range(20):
            await store.append("s", req(item(f"lost {i}")))
        # What a kill -9 now leaves on disk: the database, its WAL and its shared memory.
        for name in ("convlog.db", "convlog.db-wal", "convlog.db-shm"):
            shutil.copy2(live / name, crashed / name)
    finally:
        await store.close()
    assert (crashed / "convlog.db-wal").stat().st_size > 0

    # Step 2, as the README says it.
    for suffix in _deleted_before_the_backup_goes_in():
        (crashed / f"convlog.db{suffix}").unlink(missing_ok=True)
    shutil.copy2(backup / "convlog.db", crashed / "convlog.db")

    restored = SQLiteStore(crashed / "convlog.db")
    await restored.open()
    try:
        assert contents(await read_all(restored, "s")) == ["kept 1", "kept 2"], (
            "the WAL of the lost log was read into the restored copy: step 2 must delete it\n"
            + _step_2()
        )
    finally:
        await restored.close()
