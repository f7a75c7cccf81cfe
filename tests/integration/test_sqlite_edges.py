"""The SQLite store and what the log service sends around it, at their edges; each
a bug once (found in a review):

* a group commit that fails (the database busy) answers ``unavailable`` to every
  request of a session it wrote to: their outcomes were decided on rows never
  written (a retry told "duplicate" of an item then lost, a conflict naming a
  head the session never reached);
* a request with ``expected_last`` queued behind another request of its session in
  one group commit is answered by its ids (a known id a duplicate, a partial retry
  refused), as when it commits alone: it was a ``conflict`` (its ids were never
  looked up, the head having matched before the batch);
* a second retract of an item does not make it visible again to a read as of an
  order between the two retracts;
* a second store opened through a symlink takes the same one-writer lock;
* a log service on a hard link of a held database is refused too (it ran, on a WAL
  of its own);
* an item whose envelope could not be published on ``convlog.items`` (over the
  server's max payload) is refused ``too_large`` before it is committed (it was
  committed, then stopped the outbox and the service, again at every start);
* a full read page with a signed head still fits the max payload;
* a read sees every item acknowledged before it was asked while other reads are
  under way (it read as of the snapshot of another read's open statement).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from services.cli.storage import db_in_use
from services.log.handlers import Handlers
from services.log.service import LogService
from services.log.store.sqlite import SQLiteStore
from shared.client import LogClient
from shared.config import load_settings
from shared.errors import BadRequestError, ConflictError, ConvlogError, UnavailableError
from shared.messages import AppendReply
from shared.signing import Signer
from shared.subjects import Subjects
from tests.contract.store_helpers import BIG, item, req, retract
from tests.support.natsd import NatsServer
from tests.support.procs import run_cli, service_env

#: a nats-server max payload small enough to reach with one item
MAX_PAYLOAD = 64 * 1024


# -- sqlite group commit failure: A transient failure of a group commit must not leave answers decided on
async def _batch_under_lock(tmp_db: Path, requests):  # type: ignore[no-untyped-def]
    store = SQLiteStore(tmp_db)
    await store.open()
    try:
        assert (await store.append("s", req(item("a", item_id="a")))).last_order == 1
        assert store._w is not None
        store._w.execute("PRAGMA busy_timeout=50")
        other = sqlite3.connect(tmp_db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the database: BEGIN is busy
        outs: list[AppendReply | ConvlogError] = []
        for r in requests:  # one group commit
            store.submit("s", r, outs.append)
        for _ in range(200):
            if len(outs) == len(requests):
                break
            await asyncio.sleep(0.01)
        other.execute("ROLLBACK")
        other.close()
        page = await store.read("s", after=0, limit=100, max_bytes=BIG)
        later = await store.append("s", req(item("y", item_id="y")))
        return outs, page, later
    finally:
        await store.close()


async def test_a_retry_in_the_same_failed_batch_is_not_acknowledged_as_a_duplicate(tmp_db: Path) -> None:
    outs, page, later = await _batch_under_lock(tmp_db, [req(item("x", item_id="x")), req(item("x", item_id="x"))])
    assert isinstance(outs[0], UnavailableError)
    assert len(page.items) == 1  # nothing of the batch was written
    # The retry was told "x is durable at order 2", yet order 2 is "y":
    assert later.last_order == 2
    assert isinstance(outs[1], UnavailableError), f"acknowledged an item never written: {outs[1]!r}"


async def test_a_conflict_in_a_failed_batch_names_the_true_last_order(tmp_db: Path) -> None:
    outs, page, _ = await _batch_under_lock(tmp_db, [req(item("x")), req(item("z"), expected_last=1)])
    assert isinstance(outs[0], UnavailableError)
    assert len(page.items) == 1
    # expected_last=1 was right (the session is at 1); it lost only to a write that never happened
    assert not isinstance(outs[1], ConflictError), f"conflict against an unwritten head: {outs[1]!r}"


# -- sqlite expected_last behind within a batch: A request that finds its session moved on by an earlier
# request of the same group commit must be answered by its ids, as when it commits alone.
@pytest.mark.parametrize("batched", [False, True], ids=["alone", "after-another-in-one-batch"])
async def test_a_known_id_behind_another_request_of_the_same_batch_is_answered_by_ids(
    tmp_db: Path, batched: bool
) -> None:
    store = SQLiteStore(tmp_db)
    await store.open()
    try:
        first = await store.append("s", req(item("a", item_id="a")))  # a at 1: the session is at 1
        outs: list[AppendReply | ConvlogError] = []
        if not batched:
            outs.append(await store.append("s", req(item("b", item_id="b"), expected_last=1)))
        commits = store.commits
        requests = [req(item("a", item_id="a"), expected_last=1), req(item("a", item_id="a"), item("z"), expected_last=1)]
        if batched:
            requests.insert(0, req(item("b", item_id="b"), expected_last=1))
        for r in requests:  # queued together: one group commit
            store.submit("s", r, outs.append)
        for _ in range(200):
            if len(outs) == 3:
                break
            await asyncio.sleep(0.01)
        assert store.commits == commits + batched  # only b is written, and in one transaction
        moved, known, partial = outs
        assert isinstance(moved, AppendReply) and moved.last_order == 2
        # All ids present: a duplicate with the original order and hash (not a conflict).
        assert isinstance(known, AppendReply), f"known id answered {known!r}"
        assert [(i.item_order, i.hash, i.duplicate) for i in known.items] == [(1, first.items[0].hash, True)]
        # Some present: a partial retry, refused as such (not a conflict).
        assert type(partial) is BadRequestError, f"partial retry answered {partial!r}"
        assert (await store.last_order("s")) == 2
    finally:
        await store.close()


# -- sqlite double retract: A second retract of an already retracted item must not un-hide it from a read as of
@pytest.mark.parametrize("cached", [True, False], ids=["head-cached", "head-from-the-table"])
@pytest.mark.parametrize("how", ["tail", "read"])
async def test_a_second_retract_committed_meanwhile_does_not_unhide(tmp_path: Path, how: str, cached: bool) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    try:
        await store.append("s", req(item("a"), item("b"), item("c")))
        await store.append("s", req(retract(3)))  # 4: c is hidden from here on
        if not cached:
            store._states.clear()
        real = store._reader

        class SecondRetractFirst:
            def __init__(self) -> None:
                self.conn = real()

            @contextlib.asynccontextmanager
            async def execute(self, sql: str, args: Any = ()) -> Any:
                if "FROM items" in sql:
                    await store.append("s", req(retract(3)))  # 5: allowed, targets an item
                async with self.conn.execute(sql, args) as cur:
                    yield cur

        store._reader = SecondRetractFirst  # type: ignore[method-assign]
        if how == "tail":
            page = await store.tail("s", 10)
        else:
            page = await store.read("s", after=0, limit=10, max_bytes=1 << 20, visible=True)
        store._reader = real  # type: ignore[method-assign]
        assert page.last_order == 4
        shown = [msgspec.json.decode(e)["data"]["content"] for e in page.items]
        assert shown == ["a", "b"], f"as of order 4 item 3 was retracted, yet the read shows {shown}"
    finally:
        await store.close()


# -- sqlite lock paths: The one-writer lock must hold however the database file is named.
async def test_a_second_store_through_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "data" / "log.db"
    first = SQLiteStore(real)
    await first.open()
    os.symlink(real, tmp_path / "alias.db")  # e.g. CONVLOG_DB pointing at a link to the same file
    second = SQLiteStore(tmp_path / "alias.db")
    try:
        await first.append("s", req(item("one")))
        with pytest.raises(UnavailableError):
            await second.open()  # opened: the lock file was named after the link, not the file
        # `convlog up`'s check that a log service holds the database sees it through the link too
        assert db_in_use(tmp_path / "alias.db") and db_in_use(real)
    finally:
        await second.close()
        await first.close()


async def test_a_log_service_on_a_hard_link_of_a_held_database_is_refused(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # The lock file is named after the name the store was given: a hard link (another
    # name of the same file, as `cp -al` snapshots make) took another lock file, and a
    # second log service on it started, acknowledged appends into a WAL of its own
    # (`<link>-wal`) the first never reads, and checkpointed them into the shared file.
    real = tmp_path / "log.db"
    first = SQLiteStore(real)
    await first.open()
    try:
        await first.append("s", req(item("one")))
        link = tmp_path / "link.db"
        os.link(real, link)
        data = tmp_path / "data"
        data.mkdir()
        try:
            code, _, err = await run_cli("log", "--nats-url", nats_server.url, "--no-embedded", "--db", str(link),
                                         env=service_env(data), timeout=15)
        except TimeoutError:
            pytest.fail("a second log service ran on a hard link of the database")
        # A log service on the database, as on its own name: exit 1 at once (README, exit
        # codes), not "unavailable" (exit 3) once the service had begun to start.
        assert code == 1, err
        assert "log service ready" not in err and f"a log service already holds {link}" in err, err
        assert db_in_use(link)  # `convlog up` and `convlog migrate` see it too
        wal = tmp_path / "link.db-wal"  # a read-only look at the file may leave it, empty
        assert not wal.exists() or wal.stat().st_size == 0, "it wrote to a WAL of its own"
        page = await first.read("s", after=0, limit=10, max_bytes=BIG)
        assert [msgspec.json.decode(e)["data"]["content"] for e in page.items] == ["one"]
    finally:
        await first.close()


# -- outbox envelope size: An append the service accepts must be publishable on convlog.items.<sid>.
async def test_an_accepted_item_whose_envelope_exceeds_max_payload(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = nats_server_factory(config=f"max_payload: {MAX_PAYLOAD}\n")
    settings = load_settings(  # max_item_bytes left at its default (256 KiB)
        {"nats_url": server.url, "db": str(tmp_path / "log.db"), "data_dir": str(tmp_path)}, environ={}
    )
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(server.url)
    try:
        sid = "s" * 128
        body = {"items": [{"item_id": "big", "agent": "user", "data": {"role": "user", "content": ""}}]}
        pad = MAX_PAYLOAD - 64 - len(json.dumps(body))
        body["items"][0]["data"]["content"] = "x" * pad
        raw = json.dumps(body).encode()
        assert len(raw) <= MAX_PAYLOAD
        msg = await nc.request(f"convlog.append.{sid}", raw, timeout=5)
        headers = dict(msg.headers or {})
        if "Nats-Service-Error-Code" in headers:
            return  # refused too_large up front: fine
        # Accepted and committed: it must reach the items stream, and the outbox must live on.
        js = nc.jetstream()
        for _ in range(50):
            if (await js.stream_info("CONVLOG_ITEMS")).state.messages >= 1:
                break
            await asyncio.sleep(0.1)
        outbox = service.outbox
        assert outbox is not None and outbox.task is not None
        assert not outbox.task.done(), f"outbox died: {outbox.task.exception()!r}"
        assert (await js.stream_info("CONVLOG_ITEMS")).state.messages == 1, "committed item never published"
    finally:
        await nc.close()
        await service.shutdown()


# -- read page with head: A read page with the signed head must stay under the server's max payload.
async def test_a_full_page_with_a_signed_head_fits_the_max_payload(tmp_path: Path) -> None:
    sid = "s" * 128  # a valid session id of the longest length
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    try:
        handlers = Handlers(store, Subjects(), max_payload=MAX_PAYLOAD, head_signer=Signer.generate()[0])
        budget = MAX_PAYLOAD - 512
        await store.append(sid, req(item("first")))
        await store.append(sid, req(item("")))
        base = len((await store.read(sid, after=1, limit=10, max_bytes=BIG)).items[0])
        # Item 2 brings the page to 4 bytes under the store's budget; item 3 does not fit.
        pad = budget - 4 - 2 * (base + 1)
        await store.append(sid, req(item("b" * pad)))
        await store.append(sid, req(item("c")))
        page = await store.read(sid, after=1, limit=10, max_bytes=budget)
        assert len(page.items) == 2 and page.more  # items 2 (empty) and 3 (padded) fill the budget
        body = json.dumps({"after": 1, "raw": True, "head": True}).encode()
        reply = await handlers.read(f"convlog.read.{sid}", body)
        assert json.loads(reply)["more"] is True
        assert len(reply) <= MAX_PAYLOAD, f"reply of {len(reply)} bytes over the {MAX_PAYLOAD}-byte max payload"
    finally:
        await store.close()


# -- bounded group commits: a batch is decided and written on the event loop, so a few
# bulk appends of thousands of items each made one batch that held every read, reply and
# notice of the service until all of them were written (about 15 us an item).
async def test_bulk_appends_are_committed_in_bounded_batches_with_the_loop_turning_between(tmp_db: Path) -> None:
    store = SQLiteStore(tmp_db)
    await store.open()
    try:
        store._committer.max_items = 250  # the service's bound is 10,000 items: smaller here, for speed
        n, size = 8, 100  # all queued at once; a batch takes at most 250 items
        answered: list[AppendReply | ConvlogError] = []
        seen_by_the_loop: list[int] = []  # answers out when another task first ran after the first

        async def probe() -> None:
            seen_by_the_loop.append(len(answered))

        def done(out: AppendReply | ConvlogError) -> None:
            if not answered:
                asyncio.get_running_loop().create_task(probe())
            answered.append(out)

        for s in range(n):  # all queued before the committer runs: one batch without the bound
            store.submit(f"bulk-{s}", req(*(item(f"{s}.{i}") for i in range(size))), done)
        for _ in range(3000):
            if len(answered) == n:
                break
            await asyncio.sleep(0.01)
        assert [type(a) for a in answered] == [AppendReply] * n
        assert store._committer.commits >= n * size // 250
        # The loop turned after the first batch, long before the last one was written.
        assert seen_by_the_loop and seen_by_the_loop[0] < n, seen_by_the_loop
        page = await store.read("bulk-7", after=0, limit=1, max_bytes=BIG)
        assert page.last_order == size
    finally:
        await store.close()


# -- a lock that cannot be taken for another reason than a holder (flock on a network
# filesystem without it: ENOLCK) was reported as "in use by another log service".
@pytest.mark.parametrize("which", ["lock file", "database file"])
async def test_a_lock_refused_by_the_filesystem_is_not_called_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    import errno
    import fcntl

    real = fcntl.flock
    db = tmp_path / "log.db"

    def flock(fd: int, op: int) -> None:  # the filesystem's answer, injected: no NFS here
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith(".lock") == (which == "lock file"):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    store = SQLiteStore(db)
    with pytest.raises(UnavailableError) as e:
        await store.open()
    assert "in use" not in str(e.value), str(e.value)
    assert "No locks available" in str(e.value) and "flock" in str(e.value)
    assert not db_in_use(db)  # `convlog log`'s own look first: no holder (it raised OSError)
    monkeypatch.setattr(fcntl, "flock", real)
    await store.open()  # nothing was left held
    await store.close()


# -- read-your-writes under concurrent reads: every read shares the store's one reader
# connection, and SQLite keeps one read snapshot on a connection while any statement
# on it is still stepping.  A read began while a long read's statement was open between
# two of its chunks read as of that statement's snapshot, under a head taken after it:
# an item acknowledged before the read was asked was missing, the page said
# ``more: false`` and ``last_order`` of the item it left out.
async def test_a_read_sees_an_acked_append_while_another_long_read_is_under_way(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = nats_server_factory()
    settings = load_settings(
        {"nats_url": server.url, "db": str(tmp_path / "log.db"), "data_dir": str(tmp_path)}, environ={}
    )
    service = LogService(settings)
    await service.start()
    nc = await nats.connect(server.url)
    try:
        client = LogClient(nc, timeout=5, deadline=10)
        for n in range(0, 3000, 1000):  # a long session: a page of it takes several chunks
            await client.append("long", [{"agent": "user", "data": {"role": "user", "content": f"m{i}"}}
                                         for i in range(n, n + 1000)])
        stop = asyncio.Event()

        async def long_reads() -> None:
            while not stop.is_set():
                await client.read("long", after=0, limit=3000, raw=True)  # 3,000 items: 7 chunks

        readers = [asyncio.create_task(long_reads()) for _ in range(3)]
        missed: list[str] = []
        try:
            for i in range(1, 21):
                acked = await client.append("b", [{"agent": "user", "data": {"role": "user", "content": f"b{i}"}}])
                page = await client.read("b", after=i - 1, limit=10, raw=True)
                if [e.item_order for e in page.items] != [acked.last_order]:
                    missed.append(f"item {acked.last_order} acked, then read: "
                                  f"{[e.item_order for e in page.items]} last_order={page.last_order} more={page.more}")
        finally:
            stop.set()
            await asyncio.gather(*readers)
        assert not missed, f"{len(missed)} of 20 reads missed the item acked before them: {missed[:3]}"
    finally:
        await nc.close()
        await service.shutdown()
