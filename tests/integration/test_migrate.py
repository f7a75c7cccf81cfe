"""``convlog migrate`` between a real SQLite file and a real JetStream stream.

Byte-identical envelopes both ways, verified chains, resuming after a
partial copy, and refusing (untouched) a session whose destination head
differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from pathlib import Path

import msgspec
import nats
import pytest

from services.log.store.importer import import_envelopes
from services.log.store.jetstream import JetStreamStore
from services.log.store.sqlite import SQLiteStore
from shared.chain import GENESIS_HASH, item_hash
from shared.errors import BadRequestError
from shared.messages import AppendItem, AppendRequest, Envelope
from shared.subjects import Subjects
from tests.support.eventually import assert_eventually
from tests.support.logsvc import service_env
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT, run_cli

BIG = 1 << 30


def user(text: str, item_id: str | None = None) -> AppendItem:
    return AppendItem(agent="user", data={"role": "user", "content": text}, item_id=item_id)


async def migrate(tmp: Path, url: str, *args: str) -> tuple[int, str]:
    rc, out, err = await run_cli("migrate", "--nats-url", url, "--no-embedded", *args,
                                 env=service_env(tmp / "cli"), timeout=60)
    return rc, out + err


async def everything(store: SQLiteStore | JetStreamStore, sid: str) -> list[bytes]:
    return (await store.read(sid, after=0, limit=100_000, max_bytes=BIG)).items


async def test_migrate_sqlite_to_jetstream_and_back(nats_server: NatsServer, tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    async with SQLiteStore(db) as src:
        await src.append("a", AppendRequest(items=[user(f"a{i}", f"a{i}") for i in range(30)]))
        await src.append("a", AppendRequest(items=[AppendItem(agent="system", kind="retract", data={"target": 3})]))
        await src.append("b", AppendRequest(items=[user("b0")]))
        await src.append("c", AppendRequest(items=[user("c0")]))
        source = {sid: await everything(src, sid) for sid in ("a", "b", "c")}

    # A session already on the destination with another history is refused, untouched.
    js = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("convlog"))
    async with js:
        await js.append("c", AppendRequest(items=[user("someone else's c")]))
        theirs = await everything(js, "c")
        # b alone first (as an interrupted run leaves some sessions copied): the full run resumes it.
        code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", "jetstream",
                                  "--sessions", "b")
        assert code == 0, out

        code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", "jetstream")
        assert code == 1, out
        assert "c: REFUSED" in out and "differs" in out
        assert "a: 31 copied, 31 items verified" in out
        assert "b: 0 copied (resumed after 1), 1 items verified" in out
        assert await everything(js, "a") == source["a"]
        assert await everything(js, "b") == source["b"]
        assert await everything(js, "c") == theirs

        # Resumable: more on the source, only the new envelopes go.
        async with SQLiteStore(db) as src:
            await src.append("a", AppendRequest(items=[user("a-late")]))
            source["a"] = await everything(src, "a")
        code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", "jetstream",
                                  "--sessions", "a,b")
        assert code == 0, out
        assert "a: 1 copied (resumed after 31), 32 items verified" in out
        assert await everything(js, "a") == source["a"]
        # The copied session goes on as a JetStream log: the chain continues.
        r = await js.append("a", AppendRequest(items=[user("after migrate")]))
        assert r.last_order == 33

    # And back into a new SQLite file: byte-identical again.
    back = tmp_path / "back.db"
    code, out = await migrate(tmp_path, nats_server.url, "--from", "jetstream", "--to", f"sqlite:{back}")
    assert code == 0, out
    async with SQLiteStore(back) as copy, JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("convlog")) as js:
        for sid in ("a", "b", "c"):
            assert await everything(copy, sid) == await everything(js, sid)
        assert (await copy.tail("a", 100)).items == (await js.tail("a", 100)).items  # retract kept hidden


async def test_a_copy_that_fails_after_some_batches_says_what_it_copied(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # The JetStream store imports in atomic batches of 1000: when a later batch fails
    # (here an envelope over this server's max payload), the batches before it stay.
    # migrate said "REFUSED, left untouched" and "0 items copied" all the same.
    db = tmp_path / "log.db"
    async with SQLiteStore(db) as src:
        await src.append("s", AppendRequest(items=[user(f"m{i}") for i in range(1000)]))
        await src.append("s", AppendRequest(items=[user("y" * (1100 * 1024))]))  # over 1 MiB
    code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", "jetstream")
    async with JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("convlog")) as js:
        assert await js.last_order("s") == 1000
    assert code == 1, out
    assert "left untouched" not in out, out
    assert "s: FAILED after copying 1000 items (run again to resume)" in out, out
    assert "1000 items copied, 1 refused" in out, out


async def test_an_envelope_over_the_servers_max_payload_is_named_not_an_unreachable_nats(
    tmp_path: Path,
) -> None:
    # nats-py refuses to send a message over the server's max_payload (MaxPayloadError):
    # migrate said "cannot reach NATS to append: MaxPayloadError" with NATS up.
    db = tmp_path / "log.db"
    async with SQLiteStore(db) as src:
        await src.append("small", AppendRequest(items=[user("hi")]))
        await src.append("big", AppendRequest(items=[user("hi"), user("x" * 100_000), user("after")]))
    server = NatsServer(tmp_path / "nats", config="max_payload: 65536\n").start()
    try:
        code, out = await migrate(tmp_path, server.url, "--from", f"sqlite:{db}", "--to", "jetstream")
        async with JetStreamStore({"servers": [server.url]}, subjects=Subjects("convlog"), create=False) as js:
            assert await js.last_order("big") == 0  # nothing of it was stored
            assert await js.last_order("small") == 1
    finally:
        server.stop()
    assert code == 1, out
    assert "migrate [1/2] big: REFUSED, left untouched: an envelope of " in out, out
    assert "over the NATS server's max_payload of 65536 bytes" in out, out
    assert "cannot reach NATS" not in out, out
    assert "small: 1 copied, 1 items verified" in out, out


async def test_migrate_refuses_bad_store_names(nats_server: NatsServer, tmp_path: Path) -> None:
    code, out = await migrate(tmp_path, nats_server.url, "--from", "postgres:x", "--to", "jetstream")
    assert code == 2 and "sqlite:PATH or jetstream" in out
    # One SQLite file under two spellings is one store (it was taken as two, and the second
    # open failed as "in use by another log service").
    db = tmp_path / "same.db"
    store = SQLiteStore(db)
    await store.open()
    await store.append("s", AppendRequest(items=[user("hello")]))
    await store.close()
    code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}",
                              "--to", f"sqlite:{tmp_path}/./same.db")
    assert code == 2 and "--from and --to name the same store" in out, out


# --to naming a file SQLite keeps beside --from (its -wal, -shm, or convlog's lock file):
# the copy went into the source's write-ahead log while the source had it open, said
# "3 of 3 sessions verified, exit 0", and the source's close truncated it: an empty file.
async def test_migrate_refuses_a_destination_that_is_a_side_file_of_the_source(
        nats_server: NatsServer, tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    async with SQLiteStore(db) as store:
        await store.append("s", AppendRequest(items=[user("hello")]))
        source = await everything(store, "s")
    for side in (f"{db}-wal", f"{db}-shm", f"{tmp_path}/./src.db.lock"):
        code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", f"sqlite:{side}")
        assert code == 2 and "a file SQLite keeps beside" in out, (side, out)
        code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{side}", "--to", f"sqlite:{db}")
        assert code == 2 and "a file SQLite keeps beside" in out, (side, out)
    async with SQLiteStore(db) as store:
        assert await everything(store, "s") == source


async def test_migrate_between_sqlite_files_whose_names_are_not_utf8(tmp_path: Path) -> None:
    # A Linux file name is bytes: one that is not UTF-8 ("café" written in Latin-1) made
    # the check of the SQLite file raise UnicodeEncodeError, a traceback and nothing copied.
    db, dest = tmp_path / os.fsdecode(b"caf\xe9 src.db"), tmp_path / os.fsdecode(b"caf\xe9 dest.db")
    async with SQLiteStore(db) as src:
        await src.append("s", AppendRequest(items=[user(f"m{i}") for i in range(3)]))
        source = await everything(src, "s")
    for _ in range(2):  # the second run finds the destination there and resumes (skips) it
        code, out = await migrate(tmp_path, "nats://127.0.0.1:9", "--from", f"sqlite:{db}",
                                  "--to", f"sqlite:{dest}")
        assert code == 0 and "Traceback" not in out, out
    assert "s: 0 copied (resumed after 3), 3 items verified" in out, out
    async with SQLiteStore(dest) as copy:
        assert await everything(copy, "s") == source


# `--sessions ""` (an empty shell variable) copied every session, as if the flag were not
# given; an empty name in the list is refused like any bad session id, before anything opens.
async def test_migrate_refuses_an_empty_session_list_and_copies_nothing(nats_server: NatsServer,
                                                                        tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    store = SQLiteStore(db)
    await store.open()
    await store.append("s", AppendRequest(items=[user("hello")]))
    await store.close()
    dest = tmp_path / "dest.db"
    for sessions in ("", "s,,t"):
        code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", f"sqlite:{dest}",
                                  "--sessions", sessions)
        assert code == 2 and "session" in out and "sessions verified" not in out, out
        assert not dest.exists(), out


async def test_migrate_from_a_source_that_does_not_exist_is_refused_and_creates_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # A mistyped path or prefix: opening the source created an empty log there
    # (a new SQLite file, or the JetStream streams), and the run said
    # "0 of 0 sessions verified", exit 0, as if the log had been moved.
    missing = tmp_path / "typo.db"
    code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{missing}", "--to", "jetstream")
    assert code == 2 and "no SQLite log" in out, out
    assert not missing.exists()

    back = tmp_path / "back.db"
    code, out = await migrate(tmp_path, nats_server.url, "--prefix", "typo", "--from", "jetstream",
                              "--to", f"sqlite:{back}")
    assert code == 2 and "no JetStream log" in out, out
    assert not back.exists()
    nc = await nats.connect(nats_server.url)
    try:
        assert not [s.config.name for s in await nc.jetstream().streams_info() if s.config.name.startswith("TYPO")]
    finally:
        await nc.close()


@pytest.mark.parametrize("how", ["empty file", "no tables"])
async def test_migrate_from_an_sqlite_file_that_holds_no_log_is_refused_and_left_alone(
    tmp_path: Path, how: str
) -> None:
    # A source of 0 bytes (a copy that was cut short) or an SQLite database with no tables:
    # opening it wrote convlog's tables into it, made the destination, and the run said
    # "migrate: 0 of 0 sessions verified, 0 items copied, 0 refused", exit 0, as if the
    # log had been moved.
    src, dest = tmp_path / "copy of log.db", tmp_path / "dest.db"
    src.touch()
    if how == "no tables":
        with contextlib.closing(sqlite3.connect(src)) as conn:
            conn.execute("PRAGMA user_version = 7")
    before = src.read_bytes()
    code, out = await migrate(tmp_path, "nats://127.0.0.1:9", "--from", f"sqlite:{src}", "--to", f"sqlite:{dest}")
    assert code == 2 and f"no SQLite log at {src}" in out and "sessions verified" not in out, out
    assert src.read_bytes() == before
    assert not dest.exists()


async def test_migrate_from_a_jetstream_log_of_another_shard_count_names_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # The log exists with 1 shard; CONVLOG_SHARDS=2 as the source said "there is no
    # JetStream log for prefix 'convlog': stream CONVLOG_LOG_1 does not exist" (exit 2),
    # while the same mistake on --to names the shard count (exit 1).
    async with JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("convlog")) as js:
        await js.append("a", AppendRequest(items=[user("hi")]))
    back = tmp_path / "back.db"
    rc, out, err = await run_cli("migrate", "--nats-url", nats_server.url, "--no-embedded", "--from", "jetstream",
                                 "--to", f"sqlite:{back}", env={**service_env(tmp_path / "cli"), "CONVLOG_SHARDS": "2"},
                                 timeout=60)
    assert rc == 1, out + err
    assert "no JetStream log" not in err and "was created with CONVLOG_SHARDS=1, not 2" in err, err
    assert not back.exists()
    nc = await nats.connect(nats_server.url)
    try:
        assert "CONVLOG_LOG_1" not in [s.config.name for s in await nc.jetstream().streams_info()]
    finally:
        await nc.close()


async def test_migrate_refuses_an_envelope_with_a_field_the_hash_does_not_cover(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # A row edited to carry a field outside the envelope: `convlog replay --db --verify`
    # calls it tampering (no verifier hashes a field it does not know), but the
    # importer decoded leniently, so migrate copied it and said "verified".
    import sqlite3

    db = tmp_path / "log.db"
    async with SQLiteStore(db) as src:
        await src.append("t", AppendRequest(items=[user("one"), user("two"), user("three")]))
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE items SET envelope = replace(envelope, '\"kind\":', '\"approved_by\":\"admin\",\"kind\":') "
                     "WHERE session_id = 't' AND item_order = 2")
    conn.close()
    rc, out, err = await run_cli("replay", "t", "--db", str(db), "--verify", "--quiet",
                                 env=service_env(tmp_path / "cli"), timeout=60)
    assert rc == 1 and "item_order 2" in out + err, out + err

    back = tmp_path / "copy.db"
    code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", f"sqlite:{back}")
    assert code == 1 and "t: REFUSED" in out and "item 2" in out, out
    async with SQLiteStore(back) as copy:
        assert await everything(copy, "t") == []


async def test_migrate_leaves_a_foreign_sqlite_file_and_a_missing_directory_alone(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # `convlog log` refuses a --db that is not convlog's, and one whose directory does not
    # exist; migrate opened any sqlite:PATH as a store: it gave an unrelated SQLite file
    # convlog's tables (as the source: "0 of 0 sessions verified", exit 0; as the
    # destination: the log copied into it), created a mistyped destination's directories,
    # and called a file that is not SQLite at all "unavailable" (exit 3).
    import sqlite3

    db = tmp_path / "log.db"
    async with SQLiteStore(db) as src:
        await src.append("a", AppendRequest(items=[user("a0")]))
    other = tmp_path / "app.db"
    conn = sqlite3.connect(other)
    with conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
    conn.close()

    def tables() -> set[str]:
        c = sqlite3.connect(other)
        try:
            return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            c.close()

    code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{other}", "--to", f"sqlite:{db}")
    assert code == 2 and "not a convlog log" in out, out
    code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", f"sqlite:{other}")
    assert code == 2 and "not a convlog log" in out, out
    assert tables() == {"accounts"}

    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", f"sqlite:{text}")
    assert code == 2 and "not an SQLite database" in out, out
    assert text.read_text() == "hello\n"

    typo = tmp_path / "no-such-dir" / "copy.db"
    code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", f"sqlite:{typo}")
    assert code == 2 and "does not exist" in out, out
    assert not typo.parent.exists()


async def test_migrate_without_a_nats_server_says_so_in_one_line(tmp_path: Path) -> None:
    # A JetStream side with no NATS server answering: migrate retried the connection
    # forever, one warning every 250 ms, and never exited (every other command says
    # "no NATS server answers", exit 3).
    from tests.support.natsd import free_port

    db = tmp_path / "log.db"
    async with SQLiteStore(db) as src:
        await src.append("a", AppendRequest(items=[user("a0")]))
    url = f"nats://127.0.0.1:{free_port()}"
    for args in (["--from", f"sqlite:{db}", "--to", "jetstream"],
                 ["--from", "jetstream", "--to", f"sqlite:{tmp_path / 'back.db'}"]):
        rc, out, err = await run_cli("migrate", "--nats-url", url, "--no-embedded", *args,
                                     env=service_env(tmp_path / "cli"), timeout=30)
        assert rc == 3, (args, err[-2000:])
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
        assert "no NATS server answers" in err and url in err, err
        assert out == ""
    assert not (tmp_path / "back.db").exists()


def _chain(sid: str, specs: list[tuple[str, dict[str, object]]], start: int = 1, prev: str = GENESIS_HASH) -> list[bytes]:
    """Envelopes continuing a chain, as a source log (or a tampered one) holds them."""
    out = []
    for k, (kind, data) in enumerate(specs, start):
        fields = dict(session_id=sid, item_order=k, item_id=f"i{k}", agent="user", kind=kind, data=data,
                      created_at="2026-01-01T00:00:00.000000Z")
        prev = item_hash(**fields, prev_hash=prev, sig=None, key_id=None)  # type: ignore[arg-type]
        out.append(msgspec.json.encode(Envelope(**fields, hash=prev)))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("target", [3, 2, "1", 1.0, True, 0])
async def test_an_imported_retract_must_target_an_earlier_item_as_an_appended_one_must(
    nats_server: NatsServer, tmp_path: Path, target: object
) -> None:
    # An append refuses a retract of a later item, of itself, of a non-item or of a
    # non-integer; the importer copied one as it was, and each store folded it its own
    # way: SQLite hid nothing for target 3 (the item came later) where JetStream hid
    # item 3 once appended, SQLite hid item 1 for 1.0 or true, and JetStream raised a
    # raw ValidationError after storing the rows.
    raw = _chain("r", [("item", {"a": 1}), ("retract", {"target": target})])
    async with SQLiteStore(tmp_path / "log.db") as sq:
        js = JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("imp"))
        async with js:
            for store in (sq, js):
                with pytest.raises(BadRequestError, match="item 2 retracts"):
                    await import_envelopes(store, "r", raw, after=0)
                assert await everything(store, "r") == []
                # A retract of a stored clear is refused too (the target is looked up).
                await import_envelopes(store, "c", _chain("c", [("clear", {})]), after=0)
                head = (await everything(store, "c"))[0]
                more = _chain("c", [("item", {"a": 1}), ("retract", {"target": 1})], start=2,
                              prev=msgspec.json.decode(head)["hash"])
                with pytest.raises(BadRequestError, match="item 3 retracts 1"):
                    await import_envelopes(store, "c", more, after=1)
                await import_envelopes(store, "c", more[:1], after=1)  # the item alone is fine
                ok = _chain("c", [("retract", {"target": 2})], start=3,
                            prev=msgspec.json.decode((await everything(store, "c"))[-1])["hash"])
                await import_envelopes(store, "c", ok, after=2)
                assert (await store.tail("c", 10)).items == []


async def test_migrate_stops_when_nats_goes_away_and_resumes_after(tmp_path: Path) -> None:
    # NATS stopped answering mid-run: each session left waited out its timeouts in turn
    # (10 s and more each, a warning every 250 ms) and was reported "REFUSED, left
    # untouched: cannot read the log stream: TimeoutError"; hours for a big log, then
    # exit 1. The run stops at the first such session, exit 3, and resumes after.
    db = tmp_path / "log.db"
    sids = [f"s{n:02d}" for n in range(30)]
    async with SQLiteStore(db) as src:
        for sid in sids:
            await src.append(sid, AppendRequest(items=[user(f"{sid}-{i}") for i in range(300)]))
    server = NatsServer(tmp_path / "nats").start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "migrate", "--nats-url", server.url, "--no-embedded",
            "--from", f"sqlite:{db}", "--to", "jetstream", cwd=REPO_ROOT, env=service_env(tmp_path / "cli"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stderr is not None
            first = [await proc.stderr.readline() for _ in range(3)]
            assert all(b"300 items verified" in line for line in first), first
            server.kill()
            err = (await asyncio.wait_for(proc.stderr.read(), 60)).decode()
            assert await proc.wait() == 3, err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        lines = [line for line in err.splitlines() if line.startswith("migrate [")]
        assert len(lines) <= 2 and "REFUSED" not in err, err  # the session in flight, no more
        assert "convlog migrate: unavailable: " in err and "run again to resume" in err, err

        server.start()
        code, out = await migrate(tmp_path, server.url, "--from", f"sqlite:{db}", "--to", "jetstream")
        assert code == 0, out
        assert "30 of 30 sessions verified" in out, out
    finally:
        server.stop()


@pytest.mark.parametrize("taken", ["convlog.>", "convlog.items.>"])
async def test_migrate_to_jetstream_beside_a_foreign_stream_on_its_subjects_names_it_exit_2(
    nats_server: NatsServer, tmp_path: Path, taken: str
) -> None:
    # Another application's stream already captures convlog's subjects: JetStream refuses
    # to create the log's streams (it never will), but migrate said "unavailable: cannot
    # open the JetStream store" (exit 3, "NATS is not reachable") without naming the
    # stream in the way, where `convlog log` says it is a setting (exit 2).
    db = tmp_path / "log.db"
    async with SQLiteStore(db) as src:
        await src.append("a", AppendRequest(items=[user("a0")]))
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name="ORDERS", subjects=[taken])
        code, out = await migrate(tmp_path, nats_server.url, "--from", f"sqlite:{db}", "--to", "jetstream")
        assert code == 2, out
        assert "unavailable" not in out and "overlap" in out and "ORDERS" in out, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        assert [s.config.name for s in await nc.jetstream().streams_info()] == ["ORDERS"]  # nothing created
    finally:
        await nc.close()


async def test_migrate_from_or_to_a_sqlite_file_a_log_service_holds_says_so_exit_1(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # A log service still running on the SQLite side (the README: stop it first) was
    # reported "unavailable: SQLite store ... is in use by another log service", exit 3,
    # the code for "NATS or the log service is not reachable or not running", while it
    # is running; `convlog up` beside one says so and exits 1.
    db = tmp_path / "log.db"
    async with JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("convlog")) as js:
        await js.append("j", AppendRequest(items=[user("j0")]))
    held = SQLiteStore(db)
    await held.open()
    try:
        await held.append("a", AppendRequest(items=[user("a0")]))
        for args in (["--from", f"sqlite:{db}", "--to", "jetstream"], ["--from", "jetstream", "--to", f"sqlite:{db}"]):
            code, out = await migrate(tmp_path, nats_server.url, *args)
            assert code == 1, (args, out)
            assert "unavailable" not in out and "a log service holds" in out and str(db) in out, out
            assert "stop it first" in out and len(out.strip().splitlines()) == 1, out
        assert await everything(held, "j") == []
    finally:
        await held.close()
    async with JetStreamStore({"servers": [nats_server.url]}, subjects=Subjects("convlog"), create=False) as js:
        assert await js.last_order("a") == 0


async def test_migrate_with_credentials_nats_refuses_says_so_at_once(tmp_path: Path) -> None:
    # The JetStream store's connection retried a refused login forever: migrate to or
    # from a server with authorization, and no or wrong credentials, never ended and
    # said nothing (`convlog log` stops at start with one line naming the setting).
    db = tmp_path / "log.db"
    async with SQLiteStore(db) as src:
        await src.append("a", AppendRequest(items=[user("a0")]))
    server = NatsServer(tmp_path / "nats", config="authorization { user: convlog, password: s3cret }\n").start()
    try:
        for creds in ({}, {"CONVLOG_USER": "convlog", "CONVLOG_PASSWORD": "wrong"}):
            rc, out, err = await run_cli("migrate", "--nats-url", server.url, "--no-embedded", "--from",
                                         f"sqlite:{db}", "--to", "jetstream",
                                         env={**service_env(tmp_path / "cli"), **creds}, timeout=30)
            assert rc == 2, (creds, err[-2000:])
            assert "NATS refused the connection" in err and "Traceback" not in err, err[-2000:]
            assert out == ""
        rc, out, err = await run_cli("migrate", "--nats-url", server.url, "--no-embedded", "--from",
                                     f"sqlite:{db}", "--to", "jetstream",
                                     env={**service_env(tmp_path / "cli"), "CONVLOG_USER": "convlog",
                                          "CONVLOG_PASSWORD": "s3cret"}, timeout=60)
        assert rc == 0 and "a: 1 copied, 1 items verified" in err, err[-2000:]
    finally:
        server.stop()


async def _long_session(db: Path, sid: str, n: int, size: int) -> None:
    """An SQLite log holding one session of ``n`` items of about ``size`` bytes."""
    async with SQLiteStore(db) as src:
        for start in range(0, n, 1000):
            await src.append(sid, AppendRequest(items=[user(f"{k:08d}" + "x" * size)
                                                       for k in range(start, min(n, start + 1000))]))


async def test_migrate_copies_and_verifies_a_long_session_in_bounded_memory(tmp_path: Path) -> None:
    # migrate read a whole session into a list, then the destination's copy into
    # another to verify it: 2 GB for a session of a million items of 1 KB (here 24 MB
    # held twice). It streams both page by page; memory does not grow with the session.
    import tracemalloc

    from services.cli.migrate import migrate as run_migrate

    db, dest = tmp_path / "log.db", tmp_path / "copy.db"
    n, size = 24_000, 1000
    await _long_session(db, "long", n, size)
    said: list[str] = []
    async with SQLiteStore(db) as src, SQLiteStore(dest) as dst:
        tracemalloc.start()
        try:
            failed = await run_migrate(src, dst, None, said.append)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert failed == 0, said
        assert f"long: {n} copied, {n} items verified" in said[-2], said
        assert len(said) <= 2 + 2 * n // 1000, said  # progress now and then, not a line per page
        assert peak < n * size / 4, f"peak {peak / 1e6:.1f} MB for a session of {n * size / 1e6:.0f} MB"
        assert await everything(dst, "long") == await everything(src, "long")


async def test_migrate_shows_progress_within_a_long_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A session's only line came when it was done: a session of a million items printed
    # nothing for many minutes, as if migrate hung. Within a long session a line now says
    # how many items are copied, then verified, of its total (one every few seconds;
    # here at every page, and each line is checked against what the destination holds).
    from services.cli import migrate as m

    db, dest = tmp_path / "log.db", tmp_path / "copy.db"
    await _long_session(db, "long", 3_500, 100)
    async with SQLiteStore(db) as src:
        head = await everything(src, "long")
    async with SQLiteStore(dest) as dst:  # an earlier run, killed mid-session, left 1,500
        await import_envelopes(dst, "long", head[:1_500], after=0)
    monkeypatch.setattr(m, "_PROGRESS_EVERY", 0.0, raising=False)  # no such knob: no lines
    said: list[tuple[str, int]] = []

    def say(line: str) -> None:
        with contextlib.closing(sqlite3.connect(dest)) as conn:
            said.append((line, conn.execute("SELECT count(*) FROM items").fetchone()[0]))

    async with SQLiteStore(db) as src, SQLiteStore(dest) as dst:
        assert await m.migrate(src, dst, None, say) == 0, said
    assert said == [
        ("migrate [1/1] long: copied 1500 of 3500 items", 1_500),
        ("migrate [1/1] long: copied 2000 of 3500 items", 2_000),
        ("migrate [1/1] long: copied 3000 of 3500 items", 3_000),
        ("migrate [1/1] long: copied 3500 of 3500 items", 3_500),
        ("migrate [1/1] long: verified 1000 of 3500 items", 3_500),
        ("migrate [1/1] long: verified 2000 of 3500 items", 3_500),
        ("migrate [1/1] long: verified 3000 of 3500 items", 3_500),
        ("migrate [1/1] long: verified 3500 of 3500 items", 3_500),
        ("migrate [1/1] long: 2000 copied (resumed after 1500), 3500 items verified", 3_500),
        ("migrate: 1 of 1 sessions verified, 2000 items copied, 0 refused", 3_500),
    ], said


async def test_migrate_killed_mid_session_resumes_after_what_it_stored(tmp_path: Path) -> None:
    # Copied page by page, a long session is stored in runs that each commit: a kill -9
    # mid-session leaves a verified prefix, and the next run continues after it.
    db, dest = tmp_path / "log.db", tmp_path / "copy.db"
    n = 20_000
    await _long_session(db, "long", n, 100)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "migrate", "--from", f"sqlite:{db}", "--to", f"sqlite:{dest}",
        cwd=REPO_ROOT, env=service_env(tmp_path / "cli"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    def held() -> int:
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(dest, timeout=5)) as conn:
            return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])
        return 0

    def some_stored() -> None:
        assert held() or proc.returncode is not None

    try:
        await assert_eventually(some_stored, timeout=30, interval=0.01)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    stored = held()
    assert 0 < stored < n and stored % 1000 == 0, stored  # killed mid-session, whole pages stored
    code, out = await migrate(tmp_path, "nats://127.0.0.1:9", "--from", f"sqlite:{db}", "--to", f"sqlite:{dest}")
    assert code == 0, out
    assert f"long: {n - stored} copied (resumed after {stored}), {n} items verified" in out, out
    async with SQLiteStore(db) as src, SQLiteStore(dest) as dst:
        assert await everything(dst, "long") == await everything(src, "long")
