"""Audit tools at their edges, each a bug once (found in a review):

* ``replay --db --verify`` checks a hidden row's flag is the order of the first
  retract of it (a larger one showed the item again to reads, and verified);
* an export line with a field beside the envelope's is not verified (the hash
  does not cover it; an RFC 8785 verifier disagreed);
* a number RFC 8785 cannot represent exactly is named in one line, not verified
  (it verified, or gave a traceback);
* ``migrate`` names a source envelope it cannot decode and goes on with the other
  sessions (a traceback ended it), and refuses a named session the source lacks
  (it reported it verified);
* the transcript draws only handoffs routing counts (as the web console does).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from services.log.store.sqlite import SQLiteStore
from shared.chain import item_hash
from shared.messages import AppendItem, AppendRequest, Envelope
from tests.docs.test_golden_replay import (
    independent_verify,  # an auditor with only hashlib and rfc8785
)

REPO = Path(__file__).resolve().parents[2]


def convlog(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVLOG_")}
    env.update(CONVLOG_DATA_DIR=str(tmp / "data"), CONVLOG_EMBEDDED="false")
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False)


def build_db(path: Path, sessions: dict[str, int], *, retract: int | None = None) -> None:
    async def go() -> None:
        async with SQLiteStore(path) as s:
            for sid, n in sessions.items():
                await s.append(sid, AppendRequest(items=[
                    AppendItem(agent="user", data={"role": "user", "content": f"{sid}{i}"}) for i in range(n)]))
                if retract is not None:
                    await s.append(sid, AppendRequest(items=[
                        AppendItem(agent="system", kind="retract", data={"target": retract})]))
    asyncio.run(go())


# -- 1. replay --db --verify: the hidden column's value is not checked -------------------


def test_db_verify_refuses_a_hidden_value_that_unhides_a_retracted_item(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    build_db(db, {"r": 3}, retract=2)  # item 2 retracted by item 4
    conn = sqlite3.connect(db)
    conn.execute("UPDATE items SET hidden = 1000000 WHERE session_id = 'r' AND item_order = 2")
    conn.commit()
    conn.close()

    async def visible() -> int:
        async with SQLiteStore(db) as s:
            return len((await s.read("r", after=0, limit=100, max_bytes=1 << 30, visible=True)).items)
    assert asyncio.run(visible()) == 3  # the retracted item is served to every reader again

    done = convlog("replay", "r", "--db", str(db), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "item_order 2" in done.stderr


# -- 2. replay --verify --file: bytes the hash does not cover -----------------------------


def _export(tmp: Path, n: int = 3) -> list[bytes]:
    db = tmp / "src.db"
    build_db(db, {"s": n})
    done = convlog("replay", "s", "--db", str(db), "--format", "jsonl", tmp=tmp)
    assert done.returncode == 0, done.stderr
    return [line.encode() for line in done.stdout.splitlines() if line.strip()]


def test_export_line_with_an_extra_field_is_not_verified(tmp_path: Path) -> None:
    lines = _export(tmp_path)
    lines[1] = lines[1][:-1] + b',"approved_by":"CFO"}'
    assert independent_verify(lines, "s") == 2  # an auditor with any RFC 8785 library: tampered
    f = tmp_path / "t.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    done = convlog("replay", "s", "--file", str(f), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 1 and "item_order 2" in done.stderr, done.stderr


def test_export_line_with_a_duplicated_name_is_not_verified(tmp_path: Path) -> None:
    # RFC 8785 canonicalizes I-JSON, whose objects hold each name once. A second
    # "agent" (or data "content") in front of the real one is text the hash does not
    # cover: a reader of the line, or a parser that keeps the first, sees "CFO".
    lines = _export(tmp_path)
    for forged in (b'{"agent":"CFO",' + lines[1][1:],
                   lines[1].replace(b'"data":{', b'"data":{"content":"refund approved",', 1)):
        f = tmp_path / "t.jsonl"
        f.write_bytes(b"\n".join([lines[0], forged, *lines[2:]]) + b"\n")
        done = convlog("replay", "s", "--file", str(f), "--verify", "--quiet", tmp=tmp_path)
        assert done.returncode == 1 and "item_order 2" in done.stderr and "more than once" in done.stderr, \
            done.stderr
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(lines) + b"\n")
    assert convlog("replay", "s", "--file", str(good), "--verify", "--quiet", tmp=tmp_path).returncode == 0


def test_export_line_with_a_null_sig_or_key_id_is_not_verified(tmp_path: Path) -> None:
    # "sig": null is a field like any other to an RFC 8785 verifier (and the web
    # console): absent and null are two hashes, and replay took null for absent.
    lines = _export(tmp_path)
    for field in ("sig", "key_id"):
        edited = [lines[0], lines[1][:-1] + b',"%s":null}' % field.encode(), *lines[2:]]
        assert independent_verify(edited, "s") == 2
        f = tmp_path / "t.jsonl"
        f.write_bytes(b"\n".join(edited) + b"\n")
        done = convlog("replay", "s", "--file", str(f), "--verify", "--quiet", tmp=tmp_path)
        assert done.returncode == 1 and "item_order 2" in done.stderr, (field, done.stderr)


def _rehash_line(line: bytes, prev: str, **data: object) -> bytes:
    obj = json.loads(line)
    obj["data"].update(data)
    fields = {k: obj[k] for k in ("session_id", "item_order", "item_id", "agent", "kind", "data", "created_at")}
    obj["hash"] = item_hash(**fields, prev_hash=prev)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def test_export_with_an_unsafe_integer_is_one_line_and_not_verified(tmp_path: Path) -> None:
    lines = _export(tmp_path, 2)
    prev = json.loads(lines[0])["hash"]
    # Without a float, convlog hashes the exact digits; RFC 8785 (IEEE doubles) cannot.
    big = [lines[0], _rehash_line(lines[1], prev, n=2**64 + 1)]
    assert independent_verify(big, "s") == 2
    f = tmp_path / "big.jsonl"
    f.write_bytes(b"\n".join(big) + b"\n")
    done = convlog("replay", "s", "--file", str(f), "--verify", "--quiet", tmp=tmp_path)
    assert done.returncode == 1 and "FAILED: s: item_order 2" in done.stderr, done.stderr

    # With a float beside it: a traceback instead of a verdict.
    tampered = lines[1].replace(b'"content":', b'"f":1.5,"n":18446744073709551617,"content":')
    f.write_bytes(lines[0] + b"\n" + tampered + b"\n")
    done = convlog("replay", "s", "--file", str(f), "--verify", "--quiet", tmp=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1 and "FAILED: s: item_order 2" in done.stderr, done.stderr


# -- 3. migrate: a source envelope that does not decode ------------------------------------


def test_migrate_names_an_undecodable_source_envelope_and_goes_on(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    build_db(src, {"a": 3, "b": 2})
    conn = sqlite3.connect(src)
    conn.execute("UPDATE items SET envelope = CAST('{\"x\": 1}' AS BLOB) WHERE session_id = 'a' AND item_order = 2")
    conn.commit()
    conn.close()
    done = convlog("migrate", "--from", f"sqlite:{src}", "--to", f"sqlite:{dst}", tmp=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    assert "a: REFUSED" in done.stderr and "b: 2 copied" in done.stderr, done.stderr


def test_data_nested_past_msgspecs_limit_is_named_by_replay_and_migrate(tmp_path: Path) -> None:
    """An envelope nested deeper than msgspec decodes (a RecursionError, not a
    DecodeError): replay ended with the bare "maximum recursion depth exceeded while
    deserializing an object" and no verdict, and migrate stopped the whole run with
    it.  Now replay names the line and migrate refuses that session and goes on."""
    depth = 5000
    env = ('{"session_id":"a","item_order":2,"item_id":"x","agent":"a","kind":"item","data":{"x":'
           + "[" * depth + "]" * depth + '},"created_at":"2026-01-01T00:00:00Z","hash":"' + "0" * 64 + '"}')
    f = tmp_path / "deep.jsonl"
    f.write_text(env + "\n")
    done = convlog("replay", "a", "--file", str(f), "--verify", tmp=tmp_path)
    assert "line 1 is not a convlog envelope: JSON nested too deeply to decode" in done.stderr, done.stderr
    assert done.returncode != 0 and "recursion" not in done.stderr

    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    build_db(src, {"a": 3, "b": 2})
    conn = sqlite3.connect(src)
    conn.execute("UPDATE items SET envelope = CAST(? AS BLOB) WHERE session_id = 'a' AND item_order = 2", (env,))
    conn.commit()
    conn.close()
    done = convlog("migrate", "--from", f"sqlite:{src}", "--to", f"sqlite:{dst}", tmp=tmp_path)
    assert done.returncode == 1 and "recursion" not in done.stderr, done.stderr
    assert "a: REFUSED, left untouched: a: item 2 nests its data too deeply to decode" in done.stderr
    assert "b: 2 copied" in done.stderr, done.stderr


# -- 4. transcript/render: a tool result that routing does not count as a handoff ---------


def _env(order: int, agent: str, data: dict[str, object]) -> Envelope:
    return Envelope(session_id="s", item_order=order, item_id=f"i{order}", agent=agent, kind="item",
                    data=data, created_at="2026-01-01T00:00:00.000000Z", hash="0" * 64)


def test_transcript_draws_no_handoff_that_routing_does_not_count() -> None:
    from services.cli.render import describe
    from services.cli.transcript import Turn, handoffs, render_turn
    from shared.routing import handoff_target_of

    for output in (' {"assistant": "L2Billing"}', {"assistant": "L2Billing"}):
        call = _env(2, "L1Billing", {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"})
        out = _env(3, "L1Billing", {"type": "function_call_output", "call_id": "c1", "output": output})
        assert handoff_target_of(out.kind, out.data) is None  # routing: no handoff, L1Billing stays active
        turn = Turn(user="hi", user_order=1, items=[call, out], outcome="answered")
        assert handoffs(turn) == []
        assert "[L1Billing -> L2Billing]" not in render_turn(turn)
        assert describe(out)[0] != "handoff"


def test_migrate_of_a_named_session_the_source_lacks_is_not_verified(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    build_db(src, {"a": 1})
    done = convlog("migrate", "--from", f"sqlite:{src}", "--to", f"sqlite:{dst}", "--sessions", "a,typo",
                   tmp=tmp_path)
    assert done.returncode != 0 and "typo: 0 copied" not in done.stderr, done.stderr


# -- 7. replay --verify --keyring: a signed head at item_order 0 went unchecked --------------


def test_a_forged_head_at_order_zero_is_not_reported_as_matching(tmp_path: Path, keys: Path) -> None:
    """A head claiming item_order 0, whose signature is no signature, said "signed
    head at item_order 0 ... matches" under the keyring: its signature was never checked."""
    from services.cli.audit import encode_head_line
    from shared.signing import Keyring, SignedHead

    log_key = Keyring.load(keys / "keyring.json").of_role("log")[0].key_id
    forged = SignedHead(session_id="golden-support-1", item_order=0, hash="0" * 64,
                        signed_at="2030-01-01T00:00:00.000000Z", key_id=log_key, sig="A" * 86)
    export = tmp_path / "export.jsonl"
    export.write_bytes((REPO / "tests" / "data" / "golden.jsonl").read_bytes().rstrip(b"\n") + b"\n"
                       + encode_head_line(forged) + b"\n")
    r = convlog("replay", "golden-support-1", "--file", str(export), "--verify", "--quiet",
                "--keyring", str(keys / "keyring.json"), tmp=tmp_path)
    assert "matches" not in r.stderr, r.stderr
    assert r.returncode == 1 and "signed head: the head's signature does not match it" in r.stderr, r.stderr


# -- 8. replay --file of another session's export that ends with a signed head ------------


def test_an_export_of_another_session_with_a_signed_head_has_no_items_of_this_one(
    tmp_path: Path, keys: Path
) -> None:
    """An export ends with the log's signed head. Replayed as another session (a
    mistyped SID, the wrong file), it printed nothing and exited 0 without --verify,
    and with --verify said the signed head failed: the same file without its head
    line says the session has no items (exit 2), as it must with it."""
    from services.cli.audit import encode_head_line
    from shared.signing import KeyFile, sign_head

    golden = (REPO / "tests" / "data" / "golden.jsonl").read_bytes().rstrip(b"\n")
    last = json.loads(golden.rsplit(b"\n", 1)[-1])
    head = sign_head(KeyFile(keys / "log.nk"), "golden-support-1", 7, last["hash"], "2030-01-01T00:00:00.000000Z")
    export = tmp_path / "export.jsonl"
    export.write_bytes(golden + b"\n" + encode_head_line(head) + b"\n")
    assert convlog("replay", "golden-support-1", "--file", str(export), "--verify", "--quiet",
                   tmp=tmp_path).returncode == 0
    for verify in ([], ["--verify"]):
        r = convlog("replay", "golden-support-2", "--file", str(export), *verify, tmp=tmp_path)
        assert (r.returncode, r.stdout) == (2, ""), (verify, r.returncode, r.stdout, r.stderr)
        assert "session 'golden-support-2' has no items" in r.stderr, r.stderr


def test_replay_db_verify_holds_no_hash_per_item(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``replay --db`` streams the rows, but the signature audit kept every item's hash
    (~120 bytes an item) for a signed head a database never holds: memory grew with the
    session. The hashes are kept only for the orders a head names."""
    import tracemalloc

    from services.cli.main import main

    peaks = []
    for n in (1_000, 1_000, 9_000):  # the first run imports what replay uses
        db = tmp_path / f"{n}.db"
        if not db.exists():
            build_db(db, {"s": n})
        tracemalloc.start()
        try:
            assert main(["replay", "s", "--db", str(db), "--verify", "--quiet"]) == 0
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert f"verified: s: {n} items" in capsys.readouterr().err
    assert peaks[2] - peaks[1] < 200_000, f"8,000 more items held {peaks[2] - peaks[1]} more bytes"
