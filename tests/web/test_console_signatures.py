"""Signed items and signed heads, checked by the console in a real browser (headless Chromium).

A log service with a keyring, ``--require-signatures`` and its own key (which
signs heads) on a real nats-server; writers with the keys of ``convlog keys
init``; the console (``services.web.cli.serve``) in front.  The reviewer loads
the public keyring into the page; the tampered exports are what an attacker
with write access to an export (but no private key) can make: re-chained, so
the hash chain alone still holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.cli.audit import decode_head_line, encode_head_line
from services.cli.main import main
from services.log.service import LogService
from services.web.app import WebOptions
from services.web.cli import bind, console_url, serve
from shared.client import LogClient
from shared.config import load_settings
from shared.messages import Envelope
from shared.signing import (
    KeyEntry,
    Keyring,
    KeyringError,
    Signer,
    _verify_key,
    head_signing_input,
    item_signing_input,
    sign_head,
)
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT
from tests.support.tamper import rechain
from tests.web.conftest import CHROMIUM_ARGS, LoopThread, chromium_path, screenshot
from tests.web.test_console_browser import said, wait_badge

pytestmark = pytest.mark.timeout(120)
SID = "web-signed-1"
SID_BATCH = "web-signed-batch"


class Signed:
    def __init__(self, url: str, keys: Path, loop: LoopThread) -> None:
        self.url = url.rstrip("/")
        self.keys = keys
        self.keyring = keys / "keyring.json"
        self.loop = loop


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    tmp = tmp_path_factory.mktemp("web-signed")
    keys = tmp / "keys"
    assert main(["keys", "init", "--out", str(keys)]) == 0
    server = NatsServer(tmp / "nats").start()
    lt: LoopThread | None = None
    try:
        lt = LoopThread(server.url)  # the console's own (unsigned, read-only) client
        settings = load_settings({
            "nats_url": server.url, "db": str(tmp / "convlog.db"),
            "keyring": str(keys / "keyring.json"), "require_signatures": True,
        }, {"CONVLOG_SIGNING_KEY": str(keys / "log.nk")})
        svc = LogService(settings)
        lt.run(svc.start())
        sock = bind("127.0.0.1", 0)
        stop = lt.run(_event())
        web = asyncio.run_coroutine_threadsafe(serve(lt.client, sock, WebOptions(), stop), lt.loop)

        async def write() -> None:
            writers = {}
            for name in ("Triage", "L1Billing", "gateway"):
                c = await LogClient.connect(server.url, name=f"web-signed-{name}")
                c.signer = Signer.load(keys / f"{name}.nk")
                writers[name] = c
            try:
                await writers["gateway"].send(SID, "My card was charged twice.")
                await writers["Triage"].append(SID, [said("Triage", "Routing you to billing.")])
                await writers["L1Billing"].append(SID, [said("L1Billing", "Refund RF-1 issued.")])
                # Two items in one request: one batch signature, a Merkle path in each sig.
                await writers["L1Billing"].append(SID_BATCH, [said("L1Billing", "One."), said("L1Billing", "Two.")])
            finally:
                for c in writers.values():
                    await c.close()

        lt.run(write())
        try:
            yield Signed(console_url(sock), keys, lt)
        finally:
            lt.loop.call_soon_threadsafe(stop.set)
            web.result(15)
            lt.run(svc.shutdown())
    finally:
        if lt is not None:
            lt.close()
        server.stop()


async def _event() -> asyncio.Event:
    return asyncio.Event()


def _lines(body: bytes) -> tuple[list[Envelope], list[bytes]]:
    envs, heads = [], []
    for line in body.splitlines():
        if b'"signed_head"' in line:
            heads.append(line)
        elif line.strip():
            envs.append(msgspec.json.decode(line, type=Envelope))
    return envs, heads



def _body(envs: list[Envelope], heads: list[bytes]) -> bytes:
    return b"".join(msgspec.json.encode(e) + b"\n" for e in envs) + b"".join(h + b"\n" for h in heads)


def _serve(page: Any, body: bytes) -> None:
    page.unroute("**/export.jsonl")
    page.route("**/export.jsonl", lambda route: route.fulfill(status=200, content_type="application/jsonl", body=body))
    page.route("**/live?*", lambda route: route.abort())  # nor may the live tail fill anything in


def marks(page: Any) -> list[str]:
    return page.eval_on_selector_all(".row .smark", "els => els.map(e => e.className)")


def test_a_signed_session_verifies_against_the_reviewers_keyring(signed: Signed, page: Any, tmp_path: Path) -> None:
    url = f"{signed.url}/sessions/{SID}"
    body = page.request.get(f"{url}/export.jsonl").body()
    envs, heads = _lines(body)
    assert len(envs) == 3 and all(e.sig for e in envs) and heads  # the export carries the signed head
    page.goto(url)
    badge = wait_badge(page, "good")
    assert "chain intact through #3" in badge
    assert f"3 signed by {envs[0].key_id[:8]}…" in badge and "(keyring not loaded: authorship unchecked)" in badge
    assert "signed head #3 (keyring not loaded: signer unchecked)" in badge
    page.wait_for_function("document.querySelectorAll('.row .smark.unchecked').length === 3")
    page.click(".card[data-order='2']")
    assert f"signed by {envs[1].key_id[:12]}… (keyring not loaded" in page.text_content("#detail dl")

    # A file that is not a keyring is refused with the reason, and changes nothing.
    bad = tmp_path / "not-a-keyring.json"
    bad.write_text(json.dumps({"convlog_keyring": 1, "keys": [{"key_id": "UNOTAKEY", "role": "agent", "agent": "x"}]}))
    page.set_input_files("#keyring", str(bad))
    page.wait_for_selector("#message:has-text('Could not read the keyring not-a-keyring.json')")
    assert "is not an nkey user public key" in page.text_content("#message")
    assert "(keyring not loaded: authorship unchecked)" in wait_badge(page, "good")
    assert page.text_content("#keyring-name") == "Keyring…"

    page.set_input_files("#keyring", str(signed.keyring))
    page.wait_for_function("document.querySelectorAll('.row .smark.ok').length === 3")
    badge = wait_badge(page, "good")
    assert "3 signatures verified against your keyring" in badge and "signed head #3 verified" in badge
    assert page.text_content("#keyring-name").startswith("✓ keyring:")
    assert page.text_content("#message") == ""  # the refused file's error is gone
    assert f"signed with Triage's key {envs[1].key_id[:12]}… (agent), verified" in page.text_content("#detail dl")
    screenshot(page, "signed-keyring")


def test_a_forged_signature_a_foreign_key_and_a_cut_tail_turn_the_badge_red(
        signed: Signed, page: Any, tmp_path: Path) -> None:
    url = f"{signed.url}/sessions/{SID}"
    envs, heads = _lines(page.request.get(f"{url}/export.jsonl").body())

    # A signature altered (one character), the chain re-hashed around it: named even without a keyring.
    sig = envs[1].sig or ""
    forged = [envs[0], msgspec.structs.replace(envs[1], sig=("A" if sig[0] != "A" else "B") + sig[1:]), envs[2]]
    _serve(page, _body(rechain(forged), []))
    page.goto(url)
    badge = wait_badge(page, "bad")
    assert "bad signature at #2: signature by" in badge and "does not match the item" in badge, badge
    page.wait_for_function("document.querySelector(\".row[data-order='2'] .smark\")?.className === 'smark bad'")

    # Triage's item re-signed with L1Billing's key: a valid signature, but the wrong author --
    # only the keyring can tell.
    other = Signer.load(signed.keys / "L1Billing.nk")
    e = envs[1]
    resigned = msgspec.structs.replace(e, key_id=other.key_id, sig=other.sign(
        item_signing_input(e.session_id, e.item_id, e.agent, e.kind, e.data)))
    _serve(page, _body(rechain([envs[0], resigned, envs[2]]), []))
    page.goto(url)
    assert "chain intact through #3" in wait_badge(page, "good")
    page.set_input_files("#keyring", str(signed.keyring))
    badge = wait_badge(page, "bad")
    assert "bad signature at #2: key" in badge and "belongs to agent \"L1Billing\", not \"Triage\"" in badge, badge
    assert marks(page) == ["smark ok", "smark bad", "smark ok"]
    screenshot(page, "signed-foreign-key")

    # The newest item dropped, the signed head kept: the chain alone holds, the head does not.
    _serve(page, _body(envs[:2], heads))
    page.goto(url)
    page.set_input_files("#keyring", str(signed.keyring))
    badge = wait_badge(page, "bad")
    assert "signed head #3: the chain is cut short at #2 (the log signed 3 items)" in badge, badge
    screenshot(page, "signed-head-cut")

    # The re-signed chain with the log's signed head: without a keyring the new signature
    # holds, but the chain forks from what the log signed.
    forked = rechain([envs[0], resigned, envs[2]])
    _serve(page, _body(forked, heads))
    page.goto(url)
    assert "signed head #3: the chain is forked (hash at #3 differs from the signed one)" in wait_badge(page, "bad")
    # ... and a head edited to match the fork no longer carries the log's signature.
    head = json.loads(heads[-1])
    head["signed_head"]["hash"] = forked[2].hash
    _serve(page, _body(forked, [json.dumps(head).encode()]))
    page.goto(url)
    assert "signed head #3: its signature does not match it" in wait_badge(page, "bad")

    # A head line that is no head is no envelope either: the chain breaks there.
    _serve(page, _body(envs, [b'{"signed_head": null}']))
    page.goto(url)
    assert "chain broken at #4: not an envelope" in wait_badge(page, "bad")

    # On /verify: the reviewer's own truncated file, keyring loaded first.
    f = tmp_path / "cut.jsonl"
    f.write_bytes(_body(envs[:2], heads))
    page.goto(f"{signed.url}/verify")
    page.set_input_files("#keyring", str(signed.keyring))
    page.set_input_files("#file", str(f))
    assert "signed head #3: the chain is cut short at #2" in wait_badge(page, "bad")
    f.write_bytes(_body(envs, heads))
    page.goto(f"{signed.url}/verify")
    page.set_input_files("#keyring", str(signed.keyring))
    page.set_input_files("#file", str(f))
    page.wait_for_function("document.querySelectorAll('.row .smark.ok').length === 3")
    assert "signed head #3 verified" in wait_badge(page, "good")


def test_without_webcrypto_no_signature_or_signed_head_is_called_verified(signed: Signed, browser: Any) -> None:
    """Plain http beyond loopback is no secure context: the page has no WebCrypto, so it
    counts signatures and signed heads but checks none (README, "Web console").  The badge
    said "signed head #3 verified" once a keyring was loaded, and "(keyring not loaded:
    signer unchecked)" before -- as if the head's signature had been checked."""
    name = "convlog-console.test"  # resolved to 127.0.0.1 by this browser only: not loopback to it
    lt = signed.loop
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = lt.run(_event())
    web = asyncio.run_coroutine_threadsafe(serve(lt.client, sock, WebOptions(token="t0ken"), stop), lt.loop)
    insecure = browser.browser_type.launch(executable_path=chromium_path(),
                                           args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {name} 127.0.0.1"])
    try:
        context = insecure.new_context(http_credentials={"username": "reviewer", "password": "t0ken"},
                                       bypass_csp=True)
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.goto(f"http://{name}:{port}/sessions/{SID}")
        assert page.evaluate("window.isSecureContext") is False
        badge = wait_badge(page, "good")
        assert "chain intact through #3" in badge  # the plain-JS SHA-256 checks the chain
        assert "3 signed (not checked: WebCrypto needs https or loopback)" in badge, badge
        assert "signed head #3 (not checked: WebCrypto needs https or loopback)" in badge, badge
        page.set_input_files("#keyring", str(signed.keyring))
        page.wait_for_function("window.__convlog.keyring > 0 && "
                               "!document.querySelector('#badge').textContent.includes('keyring not loaded')")
        badge = wait_badge(page, "good")
        assert "verified" not in badge.replace("chain intact", ""), badge
        assert "signed head #3 (not checked: WebCrypto needs https or loopback)" in badge, badge
    finally:
        insecure.close()
        lt.loop.call_soon_threadsafe(stop.set)
        web.result(15)


def test_browser_signing_inputs_and_key_decoding_match_shared_signing(signed: Signed, page: Any) -> None:
    """signing.js builds the bytes shared/signing.py signs, decodes nkey ids to the same
    Ed25519 keys, and accepts exactly the signatures Python makes (not one respelled
    in the spare bits of its last base64url character, which Python refuses)."""
    signer = Signer.load(signed.keys / "Triage.nk")
    env = {"session_id": "s-1", "item_id": "t1.Triage.0.reply", "agent": "Triage", "kind": "item",
           "data": {"amount": 120.0, "text": "naïve 😀 <b>", "z": [1, None, True], "\u20ac": {}}}
    head = {"session_id": "s-1", "item_order": 7, "hash": "ab" * 32, "signed_at": "2026-03-14T09:30:00.123456Z"}
    item_bytes = item_signing_input(env["session_id"], env["item_id"], env["agent"], env["kind"], env["data"])
    sig = signer.sign(item_bytes)
    page.goto(signed.url + "/verify")
    got = page.evaluate("""async ([env, head, keyId, sig]) => {
        const m = await import('/static/signing.js');
        const text = m.itemSigningInput(env);
        const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        // The same 64 bytes, the spare low bits of the last character set.
        const respell = (s) => s.slice(0, -1) + abc[abc.indexOf(s.slice(-1)) | 0xF];
        return {item: text, head: m.headSigningInput(head), key: Array.from(m.publicKeyBytes(keyId)),
                good: await m.verify(keyId, text, sig), edited: await m.verify(keyId, text + " ", sig),
                respelled: await m.verify(keyId, text, respell(sig)),
                badId: m.publicKeyBytes(keyId.slice(0, -1) + (keyId.endsWith('A') ? 'B' : 'A'))};
    }""", [env, head, signer.key_id, sig])
    assert got["item"].encode() == item_bytes
    assert got["head"].encode() == head_signing_input(**head)
    vk = _verify_key(signer.key_id)
    assert vk is not None and bytes(got["key"]) == bytes(vk)
    assert got["good"] is True and got["edited"] is False
    assert got["respelled"] is False  # one spelling of a signature, as shared.merkle.unb64
    assert got["badId"] is None  # a mistyped key id fails its checksum


def test_items_signed_together_verify_each_on_its_own_in_the_browser(signed: Signed, page: Any) -> None:
    url = f"{signed.url}/sessions/{SID_BATCH}"
    envs, _ = _lines(page.request.get(f"{url}/export.jsonl").body())
    assert len(envs) == 2 and all("." in (e.sig or "") for e in envs)  # batch signatures
    assert envs[0].sig.split(".")[0] == envs[1].sig.split(".")[0]  # type: ignore[union-attr]
    page.goto(url)
    page.set_input_files("#keyring", str(signed.keyring))
    page.wait_for_function("document.querySelectorAll('.row .smark.ok').length === 2")
    assert "2 signatures verified against your keyring" in wait_badge(page, "good")

    # The second item's path swapped for the first's: it no longer reaches the signed root.
    moved = msgspec.structs.replace(envs[1], sig=envs[0].sig)
    _serve(page, _body(rechain([envs[0], moved]), []))
    page.goto(url)
    badge = wait_badge(page, "bad")
    assert "bad signature at #2" in badge and "does not match the item" in badge, badge
    assert marks(page) == ["smark unchecked", "smark bad"]


def test_a_signature_text_that_does_not_decode_turns_the_badge_red(signed: Signed, page: Any) -> None:
    """A sig (or a batch path, or a head's sig) whose base64url length cannot be
    (4k+1 characters) made atob throw: the rejection stopped every later check,
    so the badge stayed "verifying…" for good, the item "being checked" -- and an
    updateBadge from elsewhere (the head box) then showed it green."""
    url = f"{signed.url}/sessions/{SID}"
    envs, heads = _lines(page.request.get(f"{url}/export.jsonl").body())
    sig = envs[1].sig or ""
    cut = sig[: len(sig) - (len(sig) % 4 + 3) % 4]  # 4k+1 characters
    assert len(cut) % 4 == 1
    for bad in (cut, f"{sig}.{cut}"):
        _serve(page, _body(rechain([envs[0], msgspec.structs.replace(envs[1], sig=bad), envs[2]]), []))
        page.goto(url)
        badge = wait_badge(page, "bad")
        assert "bad signature at #2: signature by" in badge and "does not match the item" in badge, badge
    head = json.loads(heads[-1])
    head["signed_head"]["sig"] = cut
    _serve(page, _body(envs, [json.dumps(head).encode()]))
    page.goto(url)
    assert "signed head #3: its signature does not match it" in wait_badge(page, "bad")


def test_a_signed_item_that_cannot_be_canonicalized_breaks_the_chain_visibly(signed: Signed, page: Any) -> None:
    """A signed item with a number JSON.parse makes Infinity: the chain check names it,
    but the signature check threw on the same item and its rejection skipped the
    badge update -- "verifying…" for good instead of red."""
    url = f"{signed.url}/sessions/{SID}"
    envs, heads = _lines(page.request.get(f"{url}/export.jsonl").body())
    lines = _body(envs, heads).splitlines()
    lines[1] = lines[1].replace(b'"data":{', b'"data":{"amount":1e400,', 1)
    assert b"1e400" in lines[1]
    _serve(page, b"\n".join(lines) + b"\n")
    page.goto(url)
    badge = wait_badge(page, "bad")
    assert "chain broken at #" in badge and "cannot be canonicalized" in badge, badge


RETIREMENTS = [  # (an item's created_at, the key's retired_at)
    ("2026-03-14T09:59:59.500000Z", "2026-03-14T10:00:00Z"),
    ("2026-03-14T10:00:00.500000Z", "2026-03-14T10:00:00Z"),
    ("2026-03-14T10:00:00.000000Z", "2026-03-14T10:00:00Z"),
    ("2026-03-14T10:00:00.5Z", "2026-03-14T11:00:00+01:00"),
    ("2026-03-14T09:59:59Z", "2026-03-14T11:00:00+01:00"),
    ("2026-03-14T10:30:00-01:00", "2026-03-14T11:00:00Z"),
    ("2026-03-14T10:00:00.0000009Z", "2026-03-14T10:00:00Z"),  # past the microsecond: cut
    ("2026-03-14T10:00:00.000001Z", "2026-03-14T10:00:00Z"),
    ("0099-12-31T23:59:59Z", "2026-03-14T10:00:00Z"),  # (not 1999)
    ("2026-02-30T00:00:00Z", "2026-03-14T10:00:00Z"),  # no such day: not a time
    ("2026-03-14T09:30Z", "2026-03-14T10:00:00Z"),
    ("garbage", "2026-03-14T10:00:00Z"),
    ("2026-03-14T11:59:00+01:60", "2026-03-14T10:00:00Z"),  # no offset minute 60: not a time
]
BAD_RETIRED_AT = ["never", "", "2026-03-14", "2026-03-14T10:00:00", "2026-03-14 10:00:00Z",
                  "2026-03-14T24:00:00Z", "2026-03-14T10:00:00+24:00", "2026-13-01T00:00:00Z",
                  "2026-03-14T10:00:00+01:60"]


def test_retirement_times_are_compared_as_instants_in_the_browser_as_in_python(signed: Signed, page: Any) -> None:
    """signing.js compared created_at and signed_at with a key's retired_at as text, as
    shared/signing.py did: with retired_at '...10:00:00Z' (no fraction) a retired key's
    item of 10:00:00.5Z verified in the console ('.' sorts before 'Z'), and 'never'
    was taken.  Python now compares instants and refuses a retired_at that is no RFC
    3339 time; the console must give the same verdicts on the same keyring."""
    old, _ = Signer.generate()
    env = {"key_id": old.key_id, "agent": "Triage", "item_id": "a"}
    python = []
    for at, retired in RETIREMENTS:
        ring = Keyring([KeyEntry(key_id=old.key_id, role="agent", agent="Triage", created_at="2026-01-01T00:00:00Z", retired_at=retired)])
        python.append(ring.refusal(old.key_id, "Triage", via_inbound=False, at=at, item_id="a") is not None)
    bad_python = []
    for retired in BAD_RETIRED_AT:
        try:
            Keyring([KeyEntry(key_id=old.key_id, role="agent", agent="Triage", created_at="2026-01-01T00:00:00Z", retired_at=retired)])
            bad_python.append(False)
        except KeyringError:
            bad_python.append(True)
    page.goto(signed.url + "/verify")
    got = page.evaluate("""async ([env, cases, bad]) => {
        const m = await import('/static/signing.js');
        const ring = (retired) => new Map([[env.key_id, {key_id: env.key_id, role: "agent", agent: "Triage",
                                                          created_at: "x", retired_at: retired}]]);
        const refused = cases.map(([at, retired]) => m.refusal(ring(retired), {...env, created_at: at}) !== null);
        const badRefused = bad.map((retired) => {
            try {
                m.parseKeyring(JSON.stringify({convlog_keyring: 1, keys: [{key_id: env.key_id, role: "agent",
                    agent: "Triage", created_at: "x", retired_at: retired}]}));
                return false;
            } catch { return true; }
        });
        return {refused, badRefused};
    }""", [env, RETIREMENTS, BAD_RETIRED_AT])
    assert python == [False, True, False, True, False, True, False, True, False, True, True, True, True], python
    assert got["refused"] == python
    assert bad_python == [True] * len(BAD_RETIRED_AT), bad_python
    assert got["badRefused"] == bad_python


HEAD_EDITS = {  # a signed head line edited so that `convlog replay` no longer reads it as a head
    "item_order written 3.0": lambda line: line.replace(b'"item_order":3,', b'"item_order":3.0,'),
    "item_order written 3e0": lambda line: line.replace(b'"item_order":3,', b'"item_order":3e0,'),
    "a field beside the head's": lambda line: line.replace(b'{"signed_head":{', b'{"signed_head":{"note":"x",'),
    "a field beside signed_head": lambda line: line.replace(b'{"signed_head":{', b'{"note":"x","signed_head":{'),
    "a name twice in the head": lambda line: line.replace(b'{"signed_head":{', b'{"signed_head":{"hash":"00",'),
}


def _replay_verify(path: Path, keyring: Path) -> int:
    """``convlog replay --file --verify``'s exit code (a process: Playwright owns this thread's loop)."""
    return subprocess.run([sys.executable, "-m", "services.cli.main", "replay", SID, "--file", str(path),
                           "--verify", "--keyring", str(keyring)], cwd=REPO_ROOT, capture_output=True,
                          timeout=60).returncode


@pytest.mark.parametrize("edit", list(HEAD_EDITS))
def test_a_head_line_replay_does_not_read_as_a_head_breaks_the_chain_in_the_browser_too(
        signed: Signed, page: Any, tmp_path: Path, edit: str) -> None:
    """The page took any line with a `signed_head` object as a head and checked only the
    four signed fields: a head whose item_order was written 3.0, or which carried another
    field, still verified ("signed head #3 verified", green), where `convlog replay
    --verify` reads no head from that line, so no envelope either, and fails the export.
    Both must judge the same file alike: the chain breaks at the line after the items."""
    url = f"{signed.url}/sessions/{SID}"
    envs, heads = _lines(page.request.get(f"{url}/export.jsonl").body())
    good = tmp_path / "good.jsonl"
    good.write_bytes(_body(envs, heads[-1:]))
    assert _replay_verify(good, signed.keyring) == 0
    edited = HEAD_EDITS[edit](heads[-1])
    assert edited != heads[-1] and b'"signed_head"' in edited
    bad = tmp_path / "edited.jsonl"
    bad.write_bytes(_body(envs, [edited]))
    assert _replay_verify(bad, signed.keyring) != 0

    for f, verdict in ((good, "good"), (bad, "bad")):
        page.goto(f"{signed.url}/verify")
        page.set_input_files("#keyring", str(signed.keyring))
        page.set_input_files("#file", str(f))
        badge = wait_badge(page, verdict)
        if verdict == "good":
            assert "chain intact through #3" in badge and "signed head #3 verified" in badge, badge
        else:
            assert "chain broken at #4: not an envelope" in badge, badge


def test_a_signed_head_with_a_negative_item_order_fails_in_the_browser_as_in_replay(
        signed: Signed, page: Any, tmp_path: Path) -> None:
    """No log service signs a head of item_order -1; `convlog replay --verify` fails an
    export with one ("item_order -1 is negative").  The page looked the order up, found
    no item there and, since it is not above 0, no tail missing either: green, "signed
    head #-1 verified" -- under the log's key, or under any key without a keyring."""
    url = f"{signed.url}/sessions/{SID}"
    envs, heads = _lines(page.request.get(f"{url}/export.jsonl").body())
    real = decode_head_line(heads[-1])
    assert real is not None
    head = sign_head(Signer.load(signed.keys / "log.nk"), SID, -1, real.hash, real.signed_at)
    f = tmp_path / "negative.jsonl"
    f.write_bytes(_body(envs, [encode_head_line(head)]))
    assert _replay_verify(f, signed.keyring) != 0
    for keyring in (True, False):
        page.goto(f"{signed.url}/verify")
        if keyring:
            page.set_input_files("#keyring", str(signed.keyring))
        page.set_input_files("#file", str(f))
        badge = wait_badge(page, "bad")
        assert "signed head #-1: item_order -1 is negative" in badge, badge


def test_a_witness_head_that_cannot_be_read_gets_a_warning_not_a_green_verdict(
        nats_server: NatsServer, tmp_path: Path, page: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A store restored from an older copy (its #3 lost, the witness head naming #3),
    then nats-server back without JetStream: the console could not read the witness
    head, served the export with the fresh head only and said so in its log alone; the
    page showed a plain green "chain intact through #2 · signed head #2", where
    `convlog replay --verify` fails (exit 3: cannot read the signed heads).  The export
    now tells the page (X-Convlog-Witness, the body unchanged), and the badge warns."""
    from tests.integration.test_signed_replay import _restored_past_the_witness

    keys = tmp_path / "keys"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Playwright owns this thread's loop
        assert pool.submit(main, ["keys", "init", "--out", str(keys)]).result(60) == 0
    lt = LoopThread(nats_server.url)
    restored = _restored_past_the_witness(nats_server, tmp_path, keys)
    try:
        lt.run(restored.__aenter__())
        try:
            nats_server.jetstream = False
            nats_server.restart()

            async def answering() -> None:  # the log service (SQLite) answers again
                from tests.support.eventually import assert_eventually

                async def two() -> None:
                    assert await lt.client.last_order("s") == 2

                await assert_eventually(two, timeout=20)

            lt.run(answering())
            sock = bind("127.0.0.1", 0)
            stop = lt.run(_event())
            web = asyncio.run_coroutine_threadsafe(serve(lt.client, sock, WebOptions(), stop), lt.loop)
            try:
                url = f"{console_url(sock).rstrip('/')}/sessions/s"
                res = page.request.get(f"{url}/export.jsonl")
                assert res.status == 200 and res.headers.get("x-convlog-witness") == "unavailable", res.headers
                envs, heads = _lines(res.body())
                assert [e.item_order for e in envs] == [1, 2] and len(heads) == 1  # the fresh head only
                assert "no witness head for s" in caplog.text
                page.goto(url)
                page.wait_for_selector("#badge.good, #badge.warn, #badge.bad")
                badge = page.text_content("#badge")
                assert page.get_attribute("#badge", "class") == "badge warn", badge
                assert "chain intact through #2" in badge and "✓" not in badge, badge
                assert "the witness head could not be read: the truncation check covered only the log's own head" \
                    in badge, badge
                screenshot(page, "signed-witness-unread")
            finally:
                lt.loop.call_soon_threadsafe(stop.set)
                web.result(15)
        finally:
            lt.run(restored.__aexit__(None, None, None))
    finally:
        lt.close()
