"""`convlog replay --verify --keyring`: signatures checked offline, the first
bad item named, the transcript marked; a signed head in the export catches a
removed tail and a fork.  A real log service (with its own key) on a real
nats-server writes the export; the CLI verifies it in its own process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from services.cli.audit import decode_head_line
from services.cli.main import main
from services.cli.replay import Replayer, replay_from_service
from services.log.service import LogService
from shared.client import LogClient
from shared.config import load_settings
from shared.messages import Envelope
from shared.signing import Keyring, Signer
from tests.support.natsd import NatsServer
from tests.support.procs import run_cli
from tests.support.tamper import rechain

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden.jsonl"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys") / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    return out


@pytest.fixture
async def service(nats_server: NatsServer, tmp_path: Path, keys: Path) -> AsyncIterator[str]:
    settings = load_settings({
        "nats_url": nats_server.url, "db": str(tmp_path / "convlog.db"),
        "keyring": str(keys / "keyring.json"), "require_signatures": True,
    }, {"CONVLOG_SIGNING_KEY": str(keys / "log.nk")})
    svc = LogService(settings)
    await svc.start()
    try:
        yield nats_server.url
    finally:
        await svc.shutdown()


async def _cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    return await run_cli(*args, env=env, timeout=60)



def _write(path: Path, envs: list[Envelope], head_line: str | None) -> Path:
    lines = [msgspec.json.encode(e).decode() for e in envs] + ([head_line] if head_line else [])
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_exports_carry_a_signed_head_and_verify_signatures_offline(
    service: str, keys: Path, tmp_path: Path
) -> None:
    ring = str(keys / "keyring.json")
    gateway = await LogClient.connect(service)
    gateway.signer = Signer.load(keys / "gateway.nk")
    triage = await LogClient.connect(service)
    triage.signer = Signer.load(keys / "Triage.nk")
    try:
        await gateway.send("s1", "I was charged twice", item_id="m1")
        await triage.append("s1", [{"agent": "Triage", "data": {"role": "assistant", "content": "On it"}}])
        await triage.append("s1", [{"agent": "Triage", "data": {"role": "assistant", "content": "Done"}}])
        buf = io.StringIO()
        await replay_from_service(triage, "s1", Replayer(buf, fmt="jsonl", keyring=Keyring.load(ring)))
    finally:
        await gateway.close()
        await triage.close()
    lines = buf.getvalue().splitlines()
    head = decode_head_line(lines[-1])
    assert head is not None and head.item_order == 3 and head.session_id == "s1"
    envs = [msgspec.json.decode(x, type=Envelope) for x in lines[:-1]]
    assert head.hash == envs[-1].hash

    # The whole path through the CLI, against the running service.
    code, out, err = await _cli("replay", "s1", "--verify", "--keyring", ring, "--nats-url", service,
                                "--no-embedded")
    assert code == 0, err
    assert "3 signatures valid, 0 unsigned" in err and "signed head at item_order 3" in err
    assert out.count("[signed]") == 3

    # Offline: the intact export verifies; with its last item removed it does not.
    whole = _write(tmp_path / "whole.jsonl", envs, lines[-1])
    code, _, err = await _cli("replay", "s1", "--file", str(whole), "--verify", "--keyring", ring)
    assert code == 0 and "signed head at item_order 3" in err, err
    cut = _write(tmp_path / "cut.jsonl", envs[:-1], lines[-1])
    code, _, err = await _cli("replay", "s1", "--file", str(cut), "--verify", "--keyring", ring,
                              "--quiet")
    assert code == 1 and "item_order 3: truncated" in err, err
    # Without the head, the cut would pass the hash chain: say so plainly.
    code, _, err = await _cli("replay", "s1", "--file", str(_write(tmp_path / "c2.jsonl", envs[:-1], None)),
                              "--verify", "--keyring", ring)
    assert code == 0 and "no signed head (a removed tail would not show)" in err

    # A fork: the last item replaced by a consistent, unsigned one.
    fork = rechain([*envs[:-1], msgspec.structs.replace(
        envs[-1], data={"role": "assistant", "content": "No refund"}, sig=None, key_id=None)])
    code, out, err = await _cli("replay", "s1", "--file", str(_write(tmp_path / "fork.jsonl", fork, lines[-1])),
                                "--verify", "--keyring", ring)
    assert code == 1 and "item_order 3: forked" in err, err
    assert "[unsigned]" in out

    # A rewritten chain with an edited signed item: its signature names it.
    edited = rechain([envs[0], msgspec.structs.replace(envs[1], data={"role": "assistant", "content": "No"}),
                       envs[2]])
    code, out, err = await _cli("replay", "s1", "--file", str(_write(tmp_path / "e.jsonl", edited, None)),
                                "--verify", "--keyring", ring)
    assert code == 1 and "item_order 2: bad signature" in err, err
    assert "[BAD SIGNATURE]" in out
    # A head signed by a key that is not the log service's: refused.
    forged_head = lines[-1].replace(head.key_id, triage.signer.key_id if triage.signer else "")
    code, _, err = await _cli("replay", "s1", "--file", str(_write(tmp_path / "h.jsonl", envs, forged_head)),
                              "--verify", "--keyring", ring)
    assert code == 1 and "signed head" in err, err


def test_an_unsigned_log_says_so_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "golden-support-1", "--file", str(GOLDEN), "--verify", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "unsigned (no item carries a signature)" in err and "no signed head" in err


@contextlib.asynccontextmanager
async def _restored_past_the_witness(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> AsyncIterator[Callable[[str], Awaitable[None]]]:
    """A session of three items whose witness head (the log service signs one every
    0.1 s) names #3, then its store restored from a copy taken after #2 (the items
    stream rolled back with it, else the outbox would refuse to start) and a log service
    running on it again; yields ``say``, which appends an item as Triage (signed)."""
    from services.log.heads import read_witness_head
    from shared.subjects import Subjects
    from tests.support.eventually import assert_eventually

    db = tmp_path / "convlog.db"
    settings = load_settings({
        "nats_url": nats_server.url, "db": str(db), "keyring": str(keys / "keyring.json"),
    }, {"CONVLOG_SIGNING_KEY": str(keys / "log.nk"), "CONVLOG_HEAD_INTERVAL": "0.1"})
    triage = await LogClient.connect(nats_server.url)
    triage.signer = Signer.load(keys / "Triage.nk")

    async def say(text: str) -> None:
        await triage.append("s", [{"agent": "Triage", "data": {"role": "assistant", "content": text}}])

    async def witnessed() -> None:
        head = await read_witness_head(triage.nc, Subjects("convlog"), "s")
        assert head is not None and head.item_order == 3

    try:
        svc = LogService(settings)
        await svc.start()
        for text in ("one", "two"):
            await say(text)
        await svc.shutdown()
        backup = db.read_bytes()  # a consistent copy of a stopped store
        svc = LogService(settings)
        await svc.start()
        await say("three")
        await assert_eventually(witnessed, timeout=10)
        await svc.shutdown()
        db.write_bytes(backup)  # the store "restored from a backup": its last item is gone
        for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            extra.unlink(missing_ok=True)
        await triage.nc.jetstream().delete_stream("CONVLOG_ITEMS")
        svc = LogService(settings)
        await svc.start()
        try:
            assert await triage.last_order("s") == 2  # the chain alone looks intact
            yield say
        finally:
            await svc.shutdown()
    finally:
        await triage.close()


async def _verify_from_service(nats_server: NatsServer, keys: Path) -> tuple[int, str]:
    code, _, err = await _cli("replay", "s", "--verify", "--quiet", "--keyring", str(keys / "keyring.json"),
                              "--nats-url", nats_server.url, "--no-embedded")
    return code, err


async def test_a_store_that_lost_its_tail_contradicts_the_witness_head(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> None:
    async with _restored_past_the_witness(nats_server, tmp_path, keys):
        code, err = await _verify_from_service(nats_server, keys)
    assert code == 1 and "item_order 3: truncated: the log service signed item_order 3" in err, err


# A head line with a negative item_order indexed the chain from its end: an export of one
# item ended in an IndexError traceback, and a head holding the hash of the item before
# last passed as "verified ... signed head at item_order -1" (exit 0).
@pytest.mark.parametrize("items", [1, 7])
def test_a_signed_head_with_a_negative_item_order_fails_verify(
    items: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    lines = GOLDEN.read_text().splitlines()[:items]
    before_last = msgspec.json.decode(lines[-2])["hash"] if items > 1 else "0" * 64
    head = {"signed_head": {"session_id": "golden-support-1", "item_order": -1, "hash": before_last,
                            "signed_at": "2026-11-25T15:40:00Z", "key_id": "k", "sig": "x"}}
    export = tmp_path / "negative.jsonl"
    export.write_text("\n".join([*lines, msgspec.json.encode(head).decode()]) + "\n")
    assert main(["replay", "golden-support-1", "--file", str(export), "--verify", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "item_order -1 is negative" in err, err
    assert "verified" not in err, err


# A store restored from an older copy, then written to past the head the witness had
# signed: the witness moved its head on to the new chain (forward only, by item_order)
# and the restore, caught until then, verified clean ("verified ... signed head at #4").
async def test_a_restored_store_written_past_the_witness_head_is_still_caught(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> None:
    async with _restored_past_the_witness(nats_server, tmp_path, keys) as say:
        for text in ("three: refund refused", "four"):  # the session goes on past #3
            await say(text)
        await asyncio.sleep(1.0)  # several witness rounds
        code, err = await _verify_from_service(nats_server, keys)
    assert code == 1 and "item_order 3: forked" in err, err


# With JetStream not answering (here: nats-server back without it; likewise a cluster
# without quorum for the heads bucket), reading the witness head failed with an
# APIError (ServiceUnavailableError), which read_witness_head took for "no head": the
# store that lost its tail verified clean against the fresh head alone (exit 0).
async def test_a_witness_head_that_cannot_be_read_fails_the_replay_instead_of_passing_it(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> None:
    async with _restored_past_the_witness(nats_server, tmp_path, keys):
        nats_server.jetstream = False
        await asyncio.to_thread(nats_server.restart)
        client = await LogClient.connect(nats_server.url)
        try:  # the log service (SQLite) answers again, JetStream does not
            assert await client.last_order("s") == 2
        finally:
            await client.close()
        code, err = await _verify_from_service(nats_server, keys)
    assert code == 3 and "cannot read the signed heads" in err, err
    assert "verified" not in err, err


# The log service stops its store before the head witness, whose last flush signs
# the heads still pending; moving a head on that the witness had not stored in this
# run (it was there before the start) reads the store first, which was closed by
# then: the flush failed silently, and the head of what was committed in the last
# interval before a graceful stop was never stored (here: still #1 after #2).
async def test_a_stop_right_after_a_commit_stores_its_witness_head_past_one_from_a_former_run(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> None:
    from services.log.heads import read_witness_head
    from shared.subjects import Subjects

    settings = load_settings({
        "nats_url": nats_server.url, "db": str(tmp_path / "convlog.db"), "keyring": str(keys / "keyring.json"),
    }, {"CONVLOG_SIGNING_KEY": str(keys / "log.nk"), "CONVLOG_HEAD_INTERVAL": "3600"})
    triage = await LogClient.connect(nats_server.url)
    triage.signer = Signer.load(keys / "Triage.nk")
    try:
        for order, text in enumerate(("one", "two"), 1):  # one run each: the stop's flush signs the head
            svc = LogService(settings)
            await svc.start()
            try:
                await triage.append("s", [{"agent": "Triage", "data": {"role": "assistant", "content": text}}])
            finally:
                await svc.shutdown()
            head = await read_witness_head(triage.nc, Subjects("convlog"), "s")
            assert head is not None and head.item_order == order, head
    finally:
        await triage.close()


async def test_two_sessions_exports_in_one_file_each_verify_with_its_own_head(
    service: str, keys: Path, tmp_path: Path
) -> None:
    # `replay SID --file` reads the envelopes of SID and skips the others', so two
    # signed exports concatenated into one file can be replayed session by session.
    # But every signed head line was taken, whatever its session: each session
    # FAILED "item_order 1: the signed head is of session '...'" (exit 1, as if
    # tampered), and its jsonl re-export carried the other session's head.
    ring = str(keys / "keyring.json")
    triage = await LogClient.connect(service)
    triage.signer = Signer.load(keys / "Triage.nk")
    exports = []
    try:
        for sid, n in (("s1", 2), ("s2", 3)):
            for i in range(n):
                await triage.append(sid, [{"agent": "Triage", "data": {"role": "assistant", "content": f"{sid} {i}"}}])
            buf = io.StringIO()
            await replay_from_service(triage, sid, Replayer(buf, fmt="jsonl", keyring=Keyring.load(ring)))
            exports.append(buf.getvalue())
    finally:
        await triage.close()
    both = tmp_path / "both.jsonl"
    both.write_text("".join(exports))
    for sid, n in (("s1", 2), ("s2", 3)):
        code, _, err = await _cli("replay", sid, "--file", str(both), "--verify", "--quiet", "--keyring", ring)
        assert code == 0, err
        assert f"verified: {sid}: {n} items" in err and f"signed head at item_order {n}" in err, err
        code, out, err = await _cli("replay", sid, "--file", str(both), "--format", "jsonl")
        assert code == 0, err
        assert out == exports[0 if sid == "s1" else 1], out
    # A tampered tail is still caught against its own session's head.
    cut = tmp_path / "cut.jsonl"
    lines = exports[1].splitlines(keepends=True)
    cut.write_text(exports[0] + "".join(lines[:-2] + lines[-1:]))
    code, _, err = await _cli("replay", "s2", "--file", str(cut), "--verify", "--quiet", "--keyring", ring)
    assert code == 1 and "item_order 3: truncated" in err, err


async def test_a_row_with_a_tampered_column_still_gets_its_signature_mark(
    service: str, keys: Path, tmp_path: Path
) -> None:
    # `replay --db --verify --keyring` marks each line of the transcript; the row whose
    # item_id column was edited came out with no mark at all (its signature unchecked).
    ring = str(keys / "keyring.json")
    triage = await LogClient.connect(service)
    triage.signer = Signer.load(keys / "Triage.nk")
    try:
        for i in range(3):
            await triage.append("s1", [{"agent": "Triage", "data": {"role": "assistant", "content": f"r{i}"}}])
    finally:
        await triage.close()
    db = tmp_path / "convlog.db"
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE items SET item_id = 'edited' WHERE session_id = 's1' AND item_order = 2")
    conn.close()
    code, out, err = await _cli("replay", "s1", "--db", str(db), "--verify", "--keyring", ring)
    assert code == 1 and "item_order 2: " in err and "item_id column 'edited'" in err, err
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.endswith("  [signed]") for line in lines), out


# The log service's key retired in its keyring (by hand, a leaked key, or a keyring
# copied to the log's host before the new log.nk) while the service runs: its key file
# kept the retired key, and the witness went on signing heads with it, stored over the
# good ones. Once the new key arrived, a session written in the gap and idle since kept
# that head (forward only), which no verifier takes: replay --verify FAILED for ever
# ("head signed at ... by a key retired at ...") on a log that lost nothing.
async def test_heads_are_not_signed_with_a_retired_log_key_while_its_successor_is_awaited(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from services.log.heads import read_witness_head
    from shared.signing import LOG
    from shared.subjects import Subjects
    from tests.support.eventually import assert_eventually

    keys = tmp_path / "keys"
    assert await asyncio.to_thread(main, ["keys", "init", "--out", str(keys)]) == 0
    ring_path = keys / "keyring.json"
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "convlog.db"),
                              "keyring": str(ring_path)},
                             {"CONVLOG_SIGNING_KEY": str(keys / "log.nk"), "CONVLOG_HEAD_INTERVAL": "0.1"})
    triage = await LogClient.connect(nats_server.url)
    triage.signer = Signer.load(keys / "Triage.nk")
    svc = LogService(settings)
    await svc.start()
    try:
        async def witnessed(order: int) -> None:
            head = await read_witness_head(triage.nc, Subjects("convlog"), "s")
            assert head is not None and head.item_order == order, head

        await triage.append("s", [{"agent": "Triage", "data": {"role": "assistant", "content": "one"}}])
        await assert_eventually(lambda: witnessed(1), timeout=10)
        ring = Keyring.load(ring_path)
        old = ring.of_role(LOG)[0].key_id
        retired = Keyring([msgspec.structs.replace(e, retired_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
                           if e.role == LOG else e for e in ring.entries])
        fresh = ring_path.with_name("keyring.json.tmp")
        fresh.write_bytes(retired.dumps())
        os.replace(fresh, ring_path)  # the log key retired; no new one yet
        await asyncio.sleep(1.5)  # the service reads its keyring again within a second
        await triage.append("s", [{"agent": "Triage", "data": {"role": "assistant", "content": "two"}}])
        await asyncio.sleep(1.0)  # witness rounds in the gap
        ring_arg = ("--keyring", str(ring_path), "--nats-url", nats_server.url, "--no-embedded")
        # In the gap: the witness head of #1 (signed before the retirement) holds, and no
        # head is signed on request (it too was signed with the retired key: FAILED).
        code, _, err = await _cli("replay", "s", "--verify", "--quiet", *ring_arg)
        assert code == 0 and "signed head at item_order 1" in err, err
        assert await asyncio.to_thread(main, ["keys", "rotate", "log", "--dir", str(keys)]) == 0  # its successor
        new = next(e.key_id for e in Keyring.load(ring_path).of_role(LOG) if e.retired_at is None)
        assert new != old

        async def signed_by_the_new_key() -> None:
            head = await read_witness_head(triage.nc, Subjects("convlog"), "s")
            assert head is not None and head.item_order == 2 and head.key_id == new, head

        await assert_eventually(signed_by_the_new_key, timeout=10)
        code, _, err = await _cli("replay", "s", "--verify", "--quiet", *ring_arg)
        assert code == 0 and "verified: s: 2 items" in err and "signed head at item_order 2" in err, err
    finally:
        await svc.shutdown()
        await triage.close()
