"""Keys, signed items, signed heads and the keyring's rules (shared/signing.py),
and `convlog keys init|rotate` writing real files."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import msgspec
import nkeys
import pytest
import rfc8785

from services.cli.main import main
from shared.chain import GENESIS_HASH, canonical, envelope_hash, item_hash, verify
from shared.messages import AppendItem, Envelope
from shared.signing import (
    KeyEntry,
    KeyFile,
    Keyring,
    KeyringError,
    Signer,
    item_signing_input,
    sign_batch,
    sign_head,
    sign_item,
    verify_item,
    verify_signature,
)

T0 = "2026-03-14T09:30:00.000000Z"


def _ring(*pairs: tuple[Signer, str, str], retired: dict[str, str] | None = None) -> Keyring:
    retired = retired or {}
    return Keyring(
        KeyEntry(key_id=s.key_id, role=role, agent=agent, created_at=T0, retired_at=retired.get(s.key_id))
        for s, role, agent in pairs
    )


def _envelope(sid: str, item: AppendItem, order: int = 1, prev: str = GENESIS_HASH, at: str = T0) -> Envelope:
    assert item.item_id is not None
    h = item_hash(session_id=sid, item_order=order, item_id=item.item_id, agent=item.agent,
                  kind=item.kind, data=item.data, created_at=at, prev_hash=prev,
                  sig=item.sig, key_id=item.key_id)
    return Envelope(session_id=sid, item_order=order, item_id=item.item_id, agent=item.agent,
                    kind=item.kind, data=item.data, created_at=at, hash=h, sig=item.sig,
                    key_id=item.key_id)


def test_a_signature_binds_session_item_id_and_content() -> None:
    signer, seed = Signer.generate()
    assert signer.key_id.startswith("U") and len(signer.key_id) == 56
    assert Signer(seed).key_id == signer.key_id
    item = sign_item(signer, "s1", AppendItem(item_id="i1", agent="Triage", data={"text": "hi", "n": 1.5}))
    assert item.key_id == signer.key_id and item.sig is not None and len(item.sig) == 86
    ok = item_signing_input("s1", "i1", "Triage", "item", {"text": "hi", "n": 1.5})
    assert verify_signature(signer.key_id, ok, item.sig)
    # Replayed to another session, under another id, with an edited field or author: no.
    for bad in (
        item_signing_input("s2", "i1", "Triage", "item", {"text": "hi", "n": 1.5}),
        item_signing_input("s1", "i2", "Triage", "item", {"text": "hi", "n": 1.5}),
        item_signing_input("s1", "i1", "Triage", "item", {"text": "hI", "n": 1.5}),
        item_signing_input("s1", "i1", "Billing", "item", {"text": "hi", "n": 1.5}),
        item_signing_input("s1", "i1", "Triage", "retract", {"text": "hi", "n": 1.5}),
    ):
        assert not verify_signature(signer.key_id, bad, item.sig)
    other, _ = Signer.generate()
    assert not verify_signature(other.key_id, ok, item.sig)
    # A key id with a broken checksum or the wrong prefix is no key at all.
    broken = signer.key_id[:-1] + ("A" if signer.key_id[-1] != "A" else "B")
    assert not verify_signature(broken, ok, item.sig)
    assert not verify_signature("N" + signer.key_id[1:], ok, item.sig)
    assert not verify_signature(signer.key_id, ok, "!!notbase64")


@pytest.mark.parametrize("n", [2, 3, 5, 8, 33])
def test_items_signed_together_share_one_signature_and_each_verifies_alone(n: int) -> None:
    signer, _ = Signer.generate()
    items = [(f"s{i % 3}", AppendItem(item_id=f"i{i}", agent="Triage", data={"n": i})) for i in range(n)]
    signed = sign_batch(signer, items)
    bases = {it.sig.split(".")[0] for it in signed if it.sig}
    assert len(bases) == 1 and all(it.key_id == signer.key_id for it in signed)
    inputs = [item_signing_input(sid, f"i{i}", "Triage", "item", {"n": i}) for i, (sid, _) in enumerate(items)]
    for msg, it in zip(inputs, signed, strict=True):
        assert it.sig is not None and verify_item(signer.key_id, msg, it.sig)
        assert not verify_signature(signer.key_id, msg, it.sig)  # a batch signature is no plain one
    first, second = signed[0].sig or "", signed[1].sig or ""
    base, path = first.split(".")
    # An edited item, another item's path, a flipped path bit, a path cut short, another key: no.
    assert not verify_item(signer.key_id, item_signing_input("s0", "i0", "Triage", "item", {"n": -1}), first)
    assert not verify_item(signer.key_id, inputs[0], second)
    flipped = ("A" if path[0] != "A" else "B") + path[1:]
    assert not verify_item(signer.key_id, inputs[0], f"{base}.{flipped}")
    assert not verify_item(signer.key_id, inputs[0], f"{base}.{path[:-44]}")
    other, _ = Signer.generate()
    assert not verify_item(other.key_id, inputs[0], first)
    # The batch root's signature alone does not verify a made-up item with an empty path.
    assert not verify_item(signer.key_id, inputs[0], f"{base}.")
    # One item alone: a plain signature, as before.
    (alone,) = sign_batch(signer, items[:1])
    assert alone.sig is not None and "." not in alone.sig and verify_item(signer.key_id, inputs[0], alone.sig)
    # Offline, through the keyring, as replay --verify checks them.
    ring = _ring((signer, "agent", "Triage"))
    for i, (sid, _) in enumerate(items):
        assert ring.check_envelope(_envelope(sid, signed[i])) is None


def _reference_root(leaves: list[bytes]) -> bytes:
    """The module docstring's tree, written plainly: pairs hashed, an odd node moved up."""
    while len(leaves) > 1:
        nxt = [hashlib.sha256(b"\x01" + leaves[j] + leaves[j + 1]).digest() for j in range(0, len(leaves) - 1, 2)]
        leaves = nxt + leaves[len(leaves) - len(leaves) % 2:]
    return leaves[0]


def test_every_path_of_every_batch_size_leads_to_the_documented_root() -> None:
    signer, _ = Signer.generate()
    for n in (2, 3, 4, 7, 16, 25, 40):
        items = [("s", AppendItem(item_id=f"i{i}", agent="Triage", data={"n": i})) for i in range(n)]
        inputs = [item_signing_input("s", f"i{i}", "Triage", "item", {"n": i}) for i in range(n)]
        root = _reference_root([hashlib.sha256(b"\x00" + m).digest() for m in inputs])
        signed = sign_batch(signer, items)
        for msg, it in zip(inputs, signed, strict=True):
            assert it.sig is not None
            base, path = it.sig.split(".")
            assert verify_signature(signer.key_id, b"convlog-batch-v1\n" + root, base)
            assert verify_item(signer.key_id, msg, it.sig)
            # Every step checked, even the upper ones other items' checks just hashed:
            # a flipped byte in the last sibling is refused.
            raw = bytearray(base64.urlsafe_b64decode(path + "=" * (-len(path) % 4)))
            raw[-1] ^= 1
            bad = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
            assert not verify_item(signer.key_id, msg, f"{base}.{bad}")


def test_the_signing_input_is_the_canonical_json_of_the_signed_fields() -> None:
    for data in ({"text": "hi", "b": [1, {"z": None, "a": True}]}, {"n": 1.5}, {"\U0001f600": 1, "\uffff": 2}, {}):
        fields = {"session_id": "s", "item_id": "i", "agent": "Triage", "kind": "item", "data": data}
        assert item_signing_input("s", "i", "Triage", "item", data) == b"convlog-item-v1\n" + canonical(fields)


def test_signed_fields_enter_the_hash_only_when_present() -> None:
    signer, _ = Signer.generate()
    plain = AppendItem(item_id="i1", agent="Triage", data={"x": 1})
    signed = sign_item(signer, "s1", plain)
    e_plain, e_signed = _envelope("s1", plain), _envelope("s1", signed)
    assert e_plain.hash != e_signed.hash
    assert b"sig" not in msgspec.json.encode(e_plain)  # unsigned envelopes look as before
    assert verify([e_signed]) is None and verify([e_plain]) is None
    # Stripping the signature (or swapping the key id) breaks the chain.
    stripped = msgspec.structs.replace(e_signed, sig=None, key_id=None)
    assert envelope_hash(stripped, GENESIS_HASH) != e_signed.hash
    assert verify([stripped]) is not None
    # ... and so does swapping only the key id, or only the signature.
    other, _ = Signer.generate()
    assert envelope_hash(msgspec.structs.replace(e_signed, key_id=other.key_id), GENESIS_HASH) != e_signed.hash
    assert envelope_hash(msgspec.structs.replace(e_signed, sig="A" * 86), GENESIS_HASH) != e_signed.hash
    # A float in data takes the reference RFC 8785 path; both paths hash sig alike.
    f = sign_item(signer, "s1", AppendItem(item_id="i2", agent="Triage", data={"x": 0.1}))
    assert verify([_envelope("s1", f)]) is None
    # Both paths give what any RFC 8785 library gives for the envelope's fields
    # with sig and key_id (DESIGN: they are hashed like every other field).
    for it in (signed, f):
        env = _envelope("s1", it)
        fields = msgspec.to_builtins(env)
        del fields["hash"]
        assert set(fields) >= {"sig", "key_id"}
        fields["prev_hash"] = GENESIS_HASH
        assert env.hash == hashlib.sha256(rfc8785.dumps(fields)).hexdigest()


def test_keyring_rules_online_and_offline() -> None:
    triage, billing, gateway, logk = (Signer.generate()[0] for _ in range(4))
    ring = _ring((triage, "agent", "Triage"), (billing, "agent", "Billing"),
                 (gateway, "gateway", "user"), (logk, "log", "convlog-log"))
    assert ring.refusal(triage.key_id, "Triage", via_inbound=False) is None
    assert ring.refusal(triage.key_id, "system", via_inbound=False) is None
    assert "not 'Billing'" in ring.refusal(triage.key_id, "Billing", via_inbound=False)
    assert ring.refusal(triage.key_id, "user", via_inbound=False) is not None
    assert ring.refusal(gateway.key_id, "user", via_inbound=True) is None
    assert ring.refusal(gateway.key_id, "user", via_inbound=False) is not None
    assert ring.refusal(logk.key_id, "Triage", via_inbound=False) is not None
    assert "not in the keyring" in ring.refusal(Signer.generate()[0].key_id, "Triage", via_inbound=False)

    good = _envelope("s1", sign_item(triage, "s1", AppendItem(item_id="a", agent="Triage", data={"t": 1})))
    assert ring.check_envelope(good) is None
    forged = _envelope("s1", sign_item(billing, "s1", AppendItem(item_id="a", agent="Triage", data={"t": 1})))
    assert "belongs to agent 'Billing'" in ring.check_envelope(forged)
    edited = msgspec.structs.replace(good, data={"t": 2})
    assert "does not match" in ring.check_envelope(edited)
    assert ring.check_envelope(_envelope("s1", AppendItem(item_id="u", agent="Triage", data={"t": 1}))) is None

    head = sign_head(logk, "s1", 7, "ab" * 32, T0)
    assert ring.check_head(head) is None
    assert ring.check_head(msgspec.structs.replace(head, item_order=6)) is not None
    assert ring.check_head(sign_head(triage, "s1", 7, "ab" * 32, T0)) is not None


def test_a_retired_key_verifies_what_it_signed_before_and_nothing_after() -> None:
    old, _ = Signer.generate()
    ring = _ring((old, "agent", "Triage"), retired={old.key_id: "2026-03-14T10:00:00.000000Z"})
    item = sign_item(old, "s1", AppendItem(item_id="a", agent="Triage", data={"t": 1}))
    assert ring.check_envelope(_envelope("s1", item, at="2026-03-14T09:59:59.000000Z")) is None
    assert "retired" in ring.check_envelope(_envelope("s1", item, at="2026-03-14T10:00:01.000000Z"))
    assert "retired" in ring.refusal(old.key_id, "Triage", via_inbound=False)  # new appends: never


def test_a_retirement_time_is_compared_as_a_time_not_as_text() -> None:
    """retired_at was compared with an item's created_at (and a head's signed_at) as
    text: a keyring saying '...10:00:00Z' (RFC 3339 without a fraction, or with an
    offset) let the retired key's items of 10:00:00.5Z verify ('.' sorts before 'Z'),
    and one saying 'never' let every later item verify ('2' sorts before 'n')."""
    old, _ = Signer.generate()
    log, _ = Signer.generate()
    item = sign_item(old, "s1", AppendItem(item_id="a", agent="Triage", data={"t": 1}))
    for retired in ("2026-03-14T10:00:00Z", "2026-03-14T11:00:00+01:00"):
        ring = _ring((old, "agent", "Triage"), (log, "log", "convlog-log"),
                     retired={old.key_id: retired, log.key_id: retired})
        assert ring.check_envelope(_envelope("s1", item, at="2026-03-14T09:59:59.500000Z")) is None
        assert "retired" in ring.check_envelope(_envelope("s1", item, at="2026-03-14T10:00:00.500000Z"))
        assert ring.check_head(sign_head(log, "s1", 1, "ab" * 32, "2026-03-14T09:59:59.500000Z")) is None
        assert "retired" in ring.check_head(sign_head(log, "s1", 1, "ab" * 32, "2026-03-14T10:00:00.500000Z"))
    with pytest.raises(KeyringError, match="retired_at 'never' is not an RFC 3339 time"):
        _ring((old, "agent", "Triage"), retired={old.key_id: "never"})


def test_an_offset_of_sixty_minutes_or_more_is_no_time_as_in_the_console() -> None:
    """datetime.fromisoformat reads the offset '+01:60' as +02:00 (and '+00:75' as
    +01:15), so a keyring with such a retired_at loaded and an item's created_at so
    written was compared as that instant, where the console (signing.js), like RFC
    3339, takes no offset minute past 59: the keyring was refused there and the
    retired key's item counted as signed after its retirement."""
    old, _ = Signer.generate()
    item = sign_item(old, "s1", AppendItem(item_id="a", agent="Triage", data={"t": 1}))
    for retired in ("2026-03-14T12:00:00+01:60", "2026-03-14T11:15:00+00:75"):
        with pytest.raises(KeyringError, match="is not an RFC 3339 time"):
            _ring((old, "agent", "Triage"), retired={old.key_id: retired})
    ring = _ring((old, "agent", "Triage"), retired={old.key_id: "2026-03-14T10:00:00Z"})
    assert ring.check_envelope(_envelope("s1", item, at="2026-03-14T11:59:00+02:00")) is None
    assert "retired" in ring.check_envelope(_envelope("s1", item, at="2026-03-14T11:59:00+01:60"))


def test_keyring_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read keyring"):
        Keyring.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"convlog_keyring": 1, "keys": [{"key_id": "Unope", "role": "agent", '
                   '"agent": "A", "created_at": "x"}]}')
    with pytest.raises(KeyringError, match=r"bad\.json.*not an nkey"):
        Keyring.load(bad)
    bad.write_text('{"convlog_keyring": 1, "keys": [], "extra": 1}')
    with pytest.raises(KeyringError, match="malformed"):
        Keyring.load(bad)
    seed = tmp_path / "x.nk"
    seed.write_text("not a seed")
    with pytest.raises(KeyringError, match="x.nk"):
        Signer.load(seed)


def test_keys_init_and_rotate_write_real_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    ring = Keyring.load(out / "keyring.json")
    agents = {e.agent for e in ring.of_role("agent")}
    assert {"Triage", "L2Support"} <= agents
    assert len(ring.of_role("log")) == 1 and len(ring.of_role("gateway")) == 1
    for e in ring.entries:
        name = {"log": "log", "gateway": "gateway"}.get(e.role, e.agent)
        path = out / f"{name}.nk"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert Signer.load(path).key_id == e.key_id
    # Never overwrites keys.
    assert main(["keys", "init", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    # A folder that cannot be made is bad input (exit 2, like any path), named as given.
    assert main(["keys", "init", "--out", str(out / "keyring.json" / "keys")]) == 2
    assert f"--out {out / 'keyring.json' / 'keys'}: Not a directory" in capsys.readouterr().err

    old = Signer.load(out / "Triage.nk")
    before = sign_item(old, "s1", AppendItem(item_id="a", agent="Triage", data={"t": 1}))
    env_before = _envelope("s1", before, at="2000-01-01T00:00:00.000000Z")
    assert main(["keys", "rotate", "Triage", "--dir", str(out)]) == 0
    ring2 = Keyring.load(out / "keyring.json")
    new = Signer.load(out / "Triage.nk")
    assert new.key_id != old.key_id
    assert ring2.get(old.key_id).retired_at is not None and ring2.get(new.key_id).retired_at is None
    assert ring2.check_envelope(env_before) is None  # old items still verify
    assert ring2.refusal(old.key_id, "Triage", via_inbound=False) is not None
    assert ring2.refusal(new.key_id, "Triage", via_inbound=False) is None
    assert main(["keys", "rotate", "Nobody", "--dir", str(out)]) == 2
    assert json.loads((out / "keyring.json").read_text())["convlog_keyring"] == 1


def test_turn_ids_bind_to_their_agents_key() -> None:
    from services.worker.turn_ids import parse_turn_item_id, turn_item_id
    from shared.signing import turn_id_agent

    samples = [turn_item_id("u-1", "Triage", 1, "reply"), turn_item_id("t-" + "a" * 40, "L2Support", 12, "call3"),
               "u-1.Triage.1.nope", "plain-id", "a.b.c", ".Triage.1.msg", "0190e1f0c3b27c3a9e1d"]
    for iid in samples:  # the same reading as the worker's own module
        parsed = parse_turn_item_id(iid)
        assert turn_id_agent(iid) == (parsed.agent if parsed else None), iid
    triage, billing = Signer.generate()[0], Signer.generate()[0]
    ring = _ring((triage, "agent", "Triage"), (billing, "agent", "L1Billing"))
    assert ring.refusal(triage.key_id, "Triage", via_inbound=False, item_id="u-1.Triage.1.reply") is None
    assert ring.refusal(triage.key_id, "system", via_inbound=False, item_id="u-1.Triage.2.fail") is None
    why = ring.refusal(billing.key_id, "L1Billing", via_inbound=False, item_id="u-1.Triage.1.reply")
    assert why is not None and "turn of 'Triage'" in why
    forged = _envelope("s", sign_item(billing, "s", AppendItem(item_id="u-1.Triage.1.reply",
                                                                agent="L1Billing", data={"x": 1})))
    assert "turn of 'Triage'" in (ring.check_envelope(forged) or "")


def test_a_checked_item_makes_its_siblings_check_one_hash_and_a_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """shared.merkle.root_of_text: folding one item's path enters its sibling's
    (leaf, path text) with the root; the sibling's check then folds nothing, and
    anything else (an edited item, an edited path) is still folded and refused."""
    from shared import merkle

    signer, _ = Signer.generate()
    n = 7
    items = [("s", AppendItem(item_id=f"i{i}", agent="Triage", data={"n": i})) for i in range(n)]
    inputs = [item_signing_input("s", f"i{i}", "Triage", "item", {"n": i}) for i in range(n)]
    signed = sign_batch(signer, items)
    root = _reference_root([hashlib.sha256(b"\x00" + m).digest() for m in inputs])
    merkle._ahead.clear()
    folded: list[bytes] = []
    real_fold = merkle._fold

    def fold(h: bytes, path: bytes) -> bytes | None:
        folded.append(h)
        return real_fold(h, path)

    monkeypatch.setattr(merkle, "_fold", fold)
    sigs = [it.sig or "" for it in signed]
    for k in (0, 2, 4, 1, 3, 5, 6):  # the last (odd) item has no sibling at the bottom
        assert verify_item(signer.key_id, inputs[k], sigs[k])
    # Items 0, 2 and 4 were folded; their right-hand siblings 1, 3 and 5 were lookups.
    leaves = [hashlib.sha256(b"\x00" + m).digest() for m in inputs]
    assert folded == [leaves[0], leaves[2], leaves[4], leaves[6]]
    # What was entered ahead is exactly the sibling's own path folded.
    path1 = sigs[1].split(".")[1]
    assert merkle._ahead[(leaves[1], path1)] == root == merkle.root_of(inputs[1], merkle.unb64(path1))
    # A sibling entered ahead still refuses an edited item or another path under its text.
    edited = item_signing_input("s", "i1", "Triage", "item", {"n": -1})
    assert not verify_item(signer.key_id, edited, sigs[1])
    base, path = sigs[1].split(".")
    flipped = ("A" if path[0] != "A" else "B") + path[1:]
    assert not verify_item(signer.key_id, inputs[1], f"{base}.{flipped}")
    assert not verify_item(signer.key_id, inputs[1], sigs[3])
    # And the left-hand sibling of an item checked first (checked in reverse order).
    merkle._ahead.clear()
    folded.clear()
    assert verify_item(signer.key_id, inputs[3], sigs[3]) and verify_item(signer.key_id, inputs[2], sigs[2])
    assert folded == [leaves[3]]


def test_the_gateway_key_cannot_take_an_agents_turn_derived_id() -> None:
    # <turn>.<Agent>.<step>.<role> is bound to <Agent>'s key, for the gateway too: a user
    # message under Triage's reply id would otherwise pre-empt Triage's answer.
    from services.log.authorize import Authorizer
    from shared.errors import ForbiddenError
    from shared.signing import KeyEntry, Keyring, Signer, sign_item

    gw, _ = Signer.generate()
    ring = Keyring([KeyEntry(key_id=gw.key_id, role="gateway", agent="user", created_at=T0)])
    auth = Authorizer(ring, require=True)
    taken = sign_item(gw, "s1", AppendItem(agent="user", item_id="u1.Triage.1.reply",
                                           data={"role": "user", "content": "hi"}))
    with pytest.raises(ForbiddenError, match="belongs to a turn of 'Triage'"):
        auth.check_user("s1", taken)
    assert "belongs to a turn of 'Triage'" in (ring.refusal(gw.key_id, "user", via_inbound=True,
                                                            item_id="u1.Triage.1.reply") or "")
    fine = sign_item(gw, "s1", AppendItem(agent="user", item_id="u1", data={"role": "user", "content": "hi"}))
    auth.check_user("s1", fine)  # an ordinary id still goes through


def test_only_unpadded_base64url_signature_text_verifies() -> None:
    """``sig`` is base64url without padding, and the web console reads nothing else
    (signing.js ``unb64url``): a padded text, or one with data after the padding or
    the standard alphabet's ``+``/``/``, verified here (the log service stored it,
    replay marked it [signed]) while the console called it a bad signature."""
    s = Signer(nkeys.encode_seed(bytes(32), nkeys.PREFIX_BYTE_USER))  # (a signature with '-' or '_')
    msg = item_signing_input("s1", "a", "Triage", "item", {"x": 1})
    plain = sign_item(s, "s1", AppendItem(item_id="a", agent="Triage", data={"x": 1})).sig
    assert plain is not None and verify_item(s.key_id, msg, plain)
    raw = base64.urlsafe_b64decode(plain + "==")
    std = base64.b64encode(raw).decode().rstrip("=")
    assert std != plain
    for text in (plain + "==", plain + "==anything", std):
        assert not verify_signature(s.key_id, msg, text), text
        assert not verify_item(s.key_id, msg, text), text
    items = sign_batch(s, [("s1", AppendItem(item_id=i, agent="Triage", data={"i": i})) for i in "abc"])
    sig = items[0].sig
    assert sig is not None
    base, _, path = sig.partition(".")
    first = item_signing_input("s1", "a", "Triage", "item", {"i": "a"})
    assert verify_item(s.key_id, first, sig)
    for text in (f"{base}==.{path}", f"{base}.{path}" + "=" * (-len(path) % 4) + "=", f"{base}.{path}==xyz"):
        assert not verify_item(s.key_id, first, text), text


@pytest.mark.parametrize("agent", ["log", "gateway", "user", "system", "convlog-log"])
def test_keys_init_refuses_an_agent_named_as_a_role_and_writes_nothing(
    agent: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent named ``log`` or ``gateway`` has the key file of the log service or the
    gateway: init wrote the agent's key there, then failed on the role's ("log.nk exists;
    refusing to overwrite"), leaving keys and no keyring.  An agent named ``user``,
    ``system`` or ``convlog-log`` got a key that signs for that author."""
    spec = tmp_path / "agents.toml"
    spec.write_text(f'entry = "Triage"\n[[agents]]\nname = "Triage"\ninstructions = "Route."\n'
                    f'[[agents]]\nname = "{agent}"\ninstructions = "Help."\n')
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out), "--agents", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"agent name {agent!r}" in err, err
    assert not out.exists() or list(out.iterdir()) == []


def test_a_key_file_is_followed_and_a_bad_or_refused_one_keeps_the_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """KeyFile (CONVLOG_SIGNING_KEY): a new seed at the path signs from the next look;
    a file that is no seed, or a key ``accept`` refuses, keeps the key in use (logged
    once), and what it signs stays consistent (``sign`` and ``key_id`` of one key)."""
    path = tmp_path / "A.nk"
    first, seed = Signer.generate()
    path.write_bytes(seed)
    refused: set[str] = set()
    kf = KeyFile(path, every=0.0, accept=lambda key_id: "not live" if key_id in refused else None)
    assert kf.key_id == first.key_id
    second, seed2 = Signer.generate()
    path.write_bytes(seed2 + b"\n")
    item = sign_item(kf, "s", AppendItem(item_id="i1", agent="A", data={"n": 1}))
    assert item.key_id == second.key_id
    assert verify_item(second.key_id, item_signing_input("s", "i1", "A", "item", {"n": 1}), item.sig or "")
    path.write_bytes(b"not a seed")
    for _ in range(3):
        assert kf.current().key_id == second.key_id
    third, seed3 = Signer.generate()
    refused.add(third.key_id)
    path.write_bytes(seed3)
    for _ in range(3):
        assert kf.current().key_id == second.key_id
    refused.clear()  # the keyring now takes it: the unchanged file is read again
    assert kf.current().key_id == third.key_id
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "not an nkey user seed" in errors[0] and "may not sign: not live" in errors[1], errors


def test_keys_rotate_with_a_custom_spec_needs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without --agents, rotate read the packaged reference spec for its entry agent and
    # wrote nats-users.conf with the entry-notice rights given to that spec's entry
    # (Triage), not to the deployment's own: its entry agent's worker lost them.
    monkeypatch.delenv("CONVLOG_AGENTS", raising=False)
    agents = tmp_path / "agents.toml"
    agents.write_text('entry = "Front"\n[[agents]]\nname = "Front"\ninstructions = "Help."\n'
                      '[[agents]]\nname = "Back"\ninstructions = "Help."\n')
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out), "--agents", str(agents)]) == 0
    ring, users = (out / "keyring.json").read_bytes(), (out / "nats-users.conf").read_text()
    assert main(["keys", "rotate", "Back", "--dir", str(out)]) == 2
    assert (out / "keyring.json").read_bytes() == ring and (out / "nats-users.conf").read_text() == users
    assert main(["keys", "rotate", "Back", "--dir", str(out), "--agents", str(agents)]) == 0
    assert (out / "nats-users.conf").read_text().count("Front") == users.count("Front")


def test_a_batch_root_whose_check_raised_does_not_hold_up_its_later_checks() -> None:
    # SignedRoots: the thread that checks a root first leaves a "pending" mark the others
    # wait on; a check that raised left the mark for good, so every later check of that
    # root waited 5 s and then said False (an append's items are checked on threads).
    import threading
    import time

    from shared.merkle import SignedRoots

    calls: list[str] = []

    def verify(key_id: str, root: bytes, sig: str) -> bool:
        calls.append(sig)
        if sig == "bad":
            raise ValueError("not unpadded base64url")
        return True

    roots = SignedRoots(verify)
    with pytest.raises(ValueError):
        roots.check("Ukey", b"r" * 32, "bad")
    answers: list[bool] = []
    started = time.monotonic()
    t = threading.Thread(target=lambda: answers.append(roots.check("Ukey", b"r" * 32, "bad")))
    t.start()
    t.join(10)
    assert answers == [False] and time.monotonic() - started < 1
    assert roots.check("Ukey", b"r" * 32, "good") is True


def test_a_reader_that_checks_the_same_items_again_verifies_each_signature_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker with a keyring checks its whole history window on every read of a
    turn: every agent item's Ed25519 signature again (~45 µs each), up to 50 a read.
    With a VerifiedItems memo each signature is verified once; changed content under
    the same signature is verified afresh and refused, and the keyring's rules (a
    retired key) are still asked every time."""
    from shared import signing

    triage, billing = Signer.generate()[0], Signer.generate()[0]
    ring = _ring((triage, "agent", "Triage"), (billing, "agent", "Billing"))
    envs = [_envelope("s1", sign_item(triage, "s1", AppendItem(item_id=f"t{i}", agent="Triage", data={"n": i})),
                      order=i + 1) for i in range(5)]
    calls: list[str] = []
    real = signing.verify_item

    def counting(key_id: str, message: bytes, sig: str) -> bool:
        calls.append(sig)
        return real(key_id, message, sig)

    monkeypatch.setattr(signing, "verify_item", counting)
    memo = signing.VerifiedItems(kept=4)
    for _ in range(3):  # three reads of one window
        assert [ring.check_envelope(e, memo) for e in envs[:4]] == [None] * 4
    assert len(calls) == 4
    # The same signature over edited content: verified again, and refused.
    assert "does not match" in ring.check_envelope(msgspec.structs.replace(envs[0], data={"n": -1}), memo)
    assert len(calls) == 5
    # The memo keeps `kept` signatures, the oldest forgotten first.
    assert ring.check_envelope(envs[4], memo) is None and len(calls) == 6
    assert ring.check_envelope(envs[0], memo) is None and len(calls) == 7
    assert ring.check_envelope(envs[3], memo) is None and len(calls) == 7
    # A key the keyring retired since: refused from the keyring's rules, memo or not.
    later = _ring((triage, "agent", "Triage"), retired={triage.key_id: "2026-01-01T00:00:00Z"})
    assert "retired" in later.check_envelope(envs[3], memo)
    # Without a memo (replay --verify), every check verifies.
    calls.clear()
    assert ring.check_envelope(envs[3]) is None and ring.check_envelope(envs[3]) is None and len(calls) == 2


def test_a_workers_gate_verifies_each_window_item_once_across_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.worker.trust import EnvelopeGate
    from shared import signing

    triage = Signer.generate()[0]
    ring = _ring((triage, "agent", "Triage"))
    envs = [_envelope("s1", sign_item(triage, "s1", AppendItem(item_id=f"01J{i}.Triage.1.reply", agent="Triage",
                                                               data={"n": i})), order=i + 1) for i in range(3)]
    calls: list[str] = []
    real = signing.verify_item
    monkeypatch.setattr(signing, "verify_item", lambda k, m, s: calls.append(s) or real(k, m, s))
    gate = EnvelopeGate(None, ring, agent="L1Billing")  # type: ignore[arg-type]  # (its client is not used)
    for _ in range(3):
        assert [gate.forged(e) for e in envs] == [None] * 3
    assert len(calls) == 3
    assert "does not match" in (gate.forged(msgspec.structs.replace(envs[1], data={"n": 9})) or "")
