"""Signed appends against a real log service on a real nats-server: who may
write what is checked before anything is committed, and a refused request
writes nothing."""

from __future__ import annotations

import asyncio
import base64
import shutil
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats.js.errors
import pytest

from services.cli.main import main
from services.log.service import LogService
from shared import signed_appends
from shared.chain import verify
from shared.client import LogClient
from shared.config import ConfigError, Settings, load_settings
from shared.errors import (
    ERROR_CODE_HEADER,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    TooLargeError,
)
from shared.messages import AppendItem, AppendRequest
from shared.nats_seam import probe, seam_for
from shared.signing import Keyring, Signer, route_signing_input, sign_batch, sign_item
from shared.wire import publish_many
from tests.support.logenv import SEAM_IDS, SEAMS, expect_seam
from tests.support.natsd import NatsServer
from tests.support.procs import offline_env, run_cli

#: the service and its clients on either nats-py seam (shared.nats_seam)
both_seams = pytest.mark.parametrize("seam", SEAMS, ids=SEAM_IDS, indirect=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys") / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    return out


async def _service(url: str, tmp: Path, **over: object) -> LogService:
    settings = load_settings({"nats_url": url, "db": str(tmp / "convlog.db"), **over}, {})
    service = LogService(settings)
    await service.start()
    return service


@pytest.fixture
def seam(request: pytest.FixtureRequest) -> str:
    """The nats-py seam of ``strict`` and of its tests' clients (``auto`` unless parametrized)."""
    return str(getattr(request, "param", "auto"))


@pytest.fixture
async def strict(nats_server: NatsServer, tmp_path: Path, keys: Path, seam: str) -> AsyncIterator[str]:
    """A log service that requires signatures."""
    service = await _service(nats_server.url, tmp_path, keyring=str(keys / "keyring.json"),
                             require_signatures=True, nats_seam=seam)
    try:
        expect_seam(service, seam)
        yield nats_server.url
    finally:
        await service.shutdown()


async def _client(url: str, key: Path | None, seam: str = "auto") -> LogClient:
    client = await LogClient.connect(url, settings=Settings(nats_seam=seam))  # type: ignore[arg-type]
    assert seam_for(client.nc).name == ("public" if seam == "public" else "fast"), probe().reason()
    client.signer = Signer.load(key) if key else None
    return client


def _item(agent: str, text: str, item_id: str) -> AppendItem:
    return AppendItem(agent=agent, data={"type": "message", "role": "assistant", "content": text},
                      item_id=item_id)


@both_seams
async def test_each_agent_writes_only_as_itself_and_nothing_refused_is_written(
    strict: str, keys: Path, seam: str
) -> None:
    triage = await _client(strict, keys / "Triage.nk", seam)
    plain = await _client(strict, None, seam)
    try:
        ack = await triage.append("s1", [_item("Triage", "hello", "t-1"), {"agent": "system", "data": {"note": 1}}])
        assert ack.last_order == 2
        envs = await plain.items("s1")
        ring = Keyring.load(keys / "keyring.json")
        assert all(e.key_id == triage.signer.key_id and e.sig for e in envs)
        assert verify(envs) is None and all(ring.check_envelope(e) is None for e in envs)

        refused = [
            ([_item("L1Billing", "I am billing", "f-1")], "belongs to agent 'Triage'"),
            ([AppendItem(agent="user", data={"role": "user", "content": "refund me"}, item_id="f-2")],
             "inbound subject"),
            # One good item does not carry a bad one through: all or nothing.
            ([_item("Triage", "fine", "f-3"), _item("L2Support", "not fine", "f-4")], "item 1"),
        ]
        for items, why in refused:
            with pytest.raises(ForbiddenError, match=why):
                await triage.append("s1", items)
        with pytest.raises(ForbiddenError, match="unsigned"):
            await plain.append("s1", [_item("Triage", "unsigned", "f-5")])
        stranger = await _client(strict, None, seam)
        stranger.signer, _ = Signer.generate()
        with pytest.raises(ForbiddenError, match="not in the keyring"):
            await stranger.append("s1", [_item("Triage", "who am I", "f-6")])
        await stranger.close()
        assert await plain.last_order("s1") == 2
    finally:
        await triage.close()
        await plain.close()


@both_seams
async def test_appends_started_together_share_one_signature_and_each_item_verifies_alone(
    strict: str, keys: Path, seam: str
) -> None:
    triage = await _client(strict, keys / "Triage.nk", seam)
    plain = await _client(strict, None, seam)
    try:
        # 20 appends to 5 sessions started in one loop turn, and one append of 300 items.
        acks = await asyncio.gather(*(triage.append(f"b{i % 5}", [_item("Triage", f"n{i}", f"b-{i}")])
                                      for i in range(20)))
        assert all(a.first_order >= 1 for a in acks)
        await triage.append("big", [_item("Triage", f"m{i}", f"big-{i}") for i in range(300)])
        ring = Keyring.load(keys / "keyring.json")
        envs = [e for i in range(5) for e in await plain.items(f"b{i}")]
        assert len(envs) == 20 and len({(e.sig or "").split(".")[0] for e in envs}) == 1  # one signature
        big = await plain.items("big")
        assert len(big) == 300 and len({(e.sig or "").split(".")[0] for e in big}) == 2  # 256 + 44
        for e in [*envs, *big]:
            assert "." in (e.sig or "") and ring.check_envelope(e) is None
        # A batch signature moved to another item of the batch is refused.
        moved = msgspec.structs.replace(_item("Triage", "n0", "b-0x"), sig=envs[1].sig, key_id=envs[1].key_id)
        msg = await plain.nc.request("convlog.append.b0", msgspec.json.encode(AppendRequest(items=[moved])), timeout=5)
        assert msgspec.json.decode(msg.data)["error"]["code"] == "forbidden"
    finally:
        await triage.close()
        await plain.close()


async def test_a_signed_append_sent_before_the_service_is_up_is_retried_and_written_once(
    nats_server: NatsServer, tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The turn's first attempts go out together from the signing callback (one
    write); what they leave unknown (no responders yet) is retried, one by one,
    with the same signed bodies."""
    triage = await _client(nats_server.url, keys / "Triage.nk")
    turns: list[list[bytes]] = []
    retried: list[bytes] = []
    all_sent = asyncio.Event()

    async def together(nc: object, messages: list[tuple[str, str, bytes, object]]) -> list[tuple[int, Exception]]:
        turns.append([m[2] for m in messages])
        return await publish_many(nc, messages)  # type: ignore[arg-type]

    publish = triage.nc.publish

    async def one(subject: str, payload: bytes = b"", **kw: object) -> None:
        retried.append(payload)
        all_sent.set()
        await publish(subject, payload, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(signed_appends, "publish_many", together)
    triage.nc.publish = one  # type: ignore[method-assign]
    pending = asyncio.gather(*(triage.append("early", [_item("Triage", f"e{i}", f"e-{i}")]) for i in range(3)))
    service = None
    try:
        await asyncio.wait_for(all_sent.wait(), 5)  # the three went out once, to nobody, and retry
        assert len(turns) == 1 and len(turns[0]) == 3
        service = await _service(nats_server.url, tmp_path, keyring=str(keys / "keyring.json"),
                                 require_signatures=True)
        acks = await asyncio.wait_for(pending, 10)
        assert sorted(a.first_order for a in acks) == [1, 2, 3]
        assert set(retried) == set(turns[0])  # a retry resends the very body that was signed
        envs = await triage.items("early")
        ring = Keyring.load(keys / "keyring.json")
        assert sorted(e.item_id for e in envs) == ["e-0", "e-1", "e-2"]
        assert all(ring.check_envelope(e) is None and "." in (e.sig or "") for e in envs)
    finally:
        pending.cancel()
        await triage.close()
        if service is not None:
            await service.shutdown()


async def test_an_append_too_large_to_send_is_refused_alone_and_the_rest_of_its_turn_is_written(
    strict: str, keys: Path
) -> None:
    triage = await _client(strict, keys / "Triage.nk")
    try:
        big = "x" * (triage.nc.max_payload + 1)
        outcomes = await asyncio.gather(
            triage.append("turn", [_item("Triage", "a", "t-a")]),
            triage.append("turn", [_item("Triage", big, "t-big")]),
            triage.append("turn", [_item("Triage", "b", "t-b")]),
            return_exceptions=True,
        )
        assert isinstance(outcomes[1], TooLargeError)
        assert not isinstance(outcomes[0], BaseException) and not isinstance(outcomes[2], BaseException)
        envs = await triage.items("turn")
        assert sorted(e.item_id for e in envs) == ["t-a", "t-b"]
        ring = Keyring.load(keys / "keyring.json")
        assert all(ring.check_envelope(e) is None for e in envs)  # signed in one batch with the refused one
    finally:
        await triage.close()


async def test_an_append_that_cannot_be_signed_is_refused_alone_and_the_rest_of_its_turn_is_written(
    strict: str, keys: Path
) -> None:
    """The appends of one loop turn are signed together; one whose item cannot
    be signed (a lone surrogate, which has no UTF-8) failed every append of its
    turn with its error: another writer's good append on the shared client was
    refused bad_request and never sent."""
    triage = await _client(strict, keys / "Triage.nk")
    try:
        outcomes = await asyncio.gather(
            triage.append("spoil", [_item("Triage", "a", "s-a")]),
            triage.append("spoil", [_item("Triage", "bad \ud800", "s-bad")]),
            triage.append("other", [_item("Triage", "b", "s-b")]),
            return_exceptions=True,
        )
        assert isinstance(outcomes[1], BadRequestError), outcomes[1]
        assert not isinstance(outcomes[0], BaseException), outcomes[0]
        assert not isinstance(outcomes[2], BaseException), outcomes[2]
        assert [e.item_id for e in await triage.items("spoil")] == ["s-a"]
        assert [e.item_id for e in await triage.items("other")] == ["s-b"]
    finally:
        await triage.close()


async def test_a_captured_request_cannot_be_replayed_elsewhere_or_edited(strict: str, keys: Path) -> None:
    signer = Signer.load(keys / "Triage.nk")
    plain = await _client(strict, None)
    try:
        signed = [sign_item(signer, "s1", _item("Triage", "pay 10", "r-1"))]
        body = msgspec.json.encode(AppendRequest(items=signed))
        assert (await plain.nc.request("convlog.append.s1", body, timeout=5)).headers is None
        # The same bytes to another session: refused, with the service-API headers.
        msg = await plain.nc.request("convlog.append.s2", body, timeout=5)
        assert msg.headers[ERROR_CODE_HEADER] == "403"
        assert msgspec.json.decode(msg.data)["error"]["code"] == "forbidden"
        # An edited item, or the signature moved to another id: refused.
        edited = [msgspec.structs.replace(signed[0], data={**signed[0].data, "content": "pay 1000"})]
        moved = [msgspec.structs.replace(signed[0], item_id="r-2")]
        # ... or the edited item sent without its item_id (the service would assign
        # one, and a signature is checked against the id it was made for), or with
        # half a signature (no key_id, or no sig): refused too, never stored unchecked.
        no_id = [msgspec.structs.replace(edited[0], item_id=None)]
        no_key = [msgspec.structs.replace(edited[0], key_id=None)]
        no_sig = [msgspec.structs.replace(edited[0], sig=None)]
        for items in (edited, moved, no_id, no_key, no_sig):
            body = msgspec.json.encode(AppendRequest(items=items))
            msg = await plain.nc.request("convlog.append.s1", body, timeout=5)
            assert msgspec.json.decode(msg.data)["error"]["code"] == "forbidden", (items, msg.data)
        assert await plain.last_order("s2") == 0
        assert [e.data["content"] for e in await plain.items("s1")] == ["pay 10"]
    finally:
        await plain.close()


async def test_user_messages_enter_signed_by_the_gateway_only(strict: str, keys: Path) -> None:
    gateway = await _client(strict, keys / "gateway.nk")
    triage = await _client(strict, keys / "Triage.nk")
    plain = await _client(strict, None)
    try:
        ack = await gateway.send("u1", "my invoice is wrong", item_id="m-1")
        env = (await plain.items("u1"))[0]
        assert ack.last_order == 1 and env.agent == "user" and env.key_id == gateway.signer.key_id
        assert Keyring.load(keys / "keyring.json").check_envelope(env) is None
        with pytest.raises(ForbiddenError, match="unsigned"):
            await plain.send("u1", "unsigned user message")
        with pytest.raises(ForbiddenError, match="belongs to agent 'Triage', not 'user'"):
            await triage.send("u1", "an agent posing as the user")
        with pytest.raises(ForbiddenError, match="inbound subject"):  # the gateway key, on append
            await gateway.append("u1", [AppendItem(agent="user", data={"role": "user", "content": "x"})])
        assert await plain.last_order("u1") == 1
    finally:
        for c in (gateway, triage, plain):
            await c.close()


async def test_the_gateway_signs_the_to_of_a_message_and_an_edited_to_is_refused(strict: str, keys: Path) -> None:
    gateway = await _client(strict, keys / "gateway.nk")
    plain = await _client(strict, None)
    kv = await plain.nc.jetstream().key_value("convlog_routing")
    try:
        # A signed message whose `to` was edited on the way, lost its to_sig, or carries the
        # to_sig of another session: refused (new sessions, so an entry hint would be taken).
        assert gateway.signer is not None
        other = _signed_message(gateway.signer, "r1", "billing please", "L2Support", "m-r4")
        for sid, edit in (("r2", {"to": "L2Support"}), ("r3", {"to_sig": None}),
                          ("r4", {"to": "L2Support", "to_sig": other["to_sig"]})):
            sent = {**_signed_message(gateway.signer, sid, "billing please", "L1Billing", "m-" + sid), **edit}
            doc = {k: v for k, v in sent.items() if v is not None}
            msg = await plain.nc.request(f"convlog.in.{sid}", msgspec.json.encode(doc), timeout=5)
            assert msg.headers[ERROR_CODE_HEADER] == "403", (sid, msg.data)
            err = msgspec.json.decode(msg.data)["error"]
            assert err["code"] == "forbidden" and "to" in err["message"], err
            assert await plain.last_order(sid) == 0  # nothing written
            with pytest.raises(nats.js.errors.KeyNotFoundError):  # no entry hint either
                await kv.get(sid)
        # The genuine one (LogClient.send signs the `to` too) goes through, with its entry hint.
        ack = await gateway.send("r5", "billing please", to="L1Billing")
        assert ack.first_order == 1
        assert b'"entry":"L1Billing"' in (await kv.get("r5")).value
    finally:
        await gateway.close()
        await plain.close()


def _signed_message(signer: Signer, sid: str, text: str, to: str, item_id: str) -> dict[str, str]:
    """A user message signed as the gateway's client signs one (item and ``to``)."""
    item = sign_item(signer, sid, AppendItem(agent="user", data={"role": "user", "content": text}, item_id=item_id))
    assert item.sig is not None and item.key_id is not None
    return {"content": text, "item_id": item_id, "to": to, "sig": item.sig, "key_id": item.key_id,
            "to_sig": signer.sign(route_signing_input(sid, item_id, to))}


async def test_without_require_unsigned_appends_pass_but_bad_signatures_never(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> None:
    service = await _service(nats_server.url, tmp_path, keyring=str(keys / "keyring.json"))
    triage = await _client(nats_server.url, keys / "Triage.nk")
    plain = await _client(nats_server.url, None)
    try:
        await plain.append("s", [_item("Triage", "unsigned is fine here", "a")])
        await triage.append("s", [_item("Triage", "signed", "b")])
        with pytest.raises(ForbiddenError):
            await triage.append("s", [_item("L1Billing", "forged", "c")])
        envs = await plain.items("s")
        assert [e.sig is None for e in envs] == [True, False]
    finally:
        await triage.close()
        await plain.close()
        await service.shutdown()


async def test_zero_config_refuses_signatures_it_cannot_check_and_bad_config_fails_at_start(
    log_url: str, keys: Path, tmp_path: Path
) -> None:
    triage = await _client(log_url, keys / "Triage.nk")
    try:
        with pytest.raises(ForbiddenError, match="no keyring"):
            await triage.append("s", [_item("Triage", "x", "a")])
    finally:
        await triage.close()
    with pytest.raises(ConfigError, match="CONVLOG_KEYRING"):
        await _service(log_url, tmp_path / "x", require_signatures=True)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="bad.json"):
        await _service(log_url, tmp_path / "y", keyring=str(tmp_path / "bad.json"))


async def test_a_predicted_item_id_cannot_pre_empt_the_real_author(strict: str, keys: Path) -> None:
    # The attack of issue 12: write first under the id the victim will use.
    # Another agent's key cannot write it as the victim (forbidden); written as
    # itself, the victim's own append is a conflict naming the id -- never a
    # "duplicate" that would make the victim believe its reply was stored.
    attacker = await _client(strict, keys / "L1Billing.nk")
    victim = await _client(strict, keys / "Triage.nk")
    try:
        with pytest.raises(ForbiddenError):
            await attacker.append("p", [_item("Triage", "forged reply", "turn-1:reply")])
        # A worker's turn-derived ids name their agent: only that agent's key writes them.
        with pytest.raises(ForbiddenError, match="belongs to a turn of 'Triage'"):
            await attacker.append("p", [_item("L1Billing", "forged reply", "u-7.Triage.1.reply")])
        await victim.append("p", [_item("Triage", "mine", "u-7.Triage.1.reply")])
        # Any other id: first come, and the real author's append is a conflict, not a duplicate.
        await attacker.append("p", [_item("L1Billing", "forged reply", "turn-1:reply")])
        with pytest.raises(ConflictError, match="turn-1:reply") as e:
            await victim.append("p", [_item("Triage", "the real reply", "turn-1:reply")])
        assert e.value.extra["item_id"] == "turn-1:reply"
        assert [(x.agent, x.data["content"]) for x in await victim.items("p")] == [
            ("Triage", "mine"), ("L1Billing", "forged reply")]
    finally:
        await attacker.close()
        await victim.close()


async def test_data_holding_tuples_sets_or_a_dict_subclass_is_signed_as_it_is_sent(
    strict: str, keys: Path
) -> None:
    # The client sends a tuple or a set as a JSON array and an OrderedDict as an
    # object; the service checks the signature over the JSON it decodes. The
    # signer signed msgspec's sorted encoding of the Python values instead: 1.0 as
    # 1.0 (JCS: 1), 1e21 as 1e21 (1e+21), a set's elements sorted (sent unsorted).
    triage = await _client(strict, keys / "Triage.nk")
    plain = await _client(strict, None)
    try:
        datas = [
            {"point": (1.0, 2.5, 1e21)},
            {"tags": {"zz", "a", "m", "b"}},
            {"nested": OrderedDict([("b", 1.0), ("a", [-0.0])])},
        ]
        for n, data in enumerate(datas):
            ack = await triage.append("shapes", [AppendItem(agent="Triage", data=data, item_id=f"sh-{n}")])
            assert ack.last_order == n + 1
        ack = await triage.append("shapes", [AppendItem(agent="Triage", data=d, item_id=f"sh-b{n}")
                                             for n, d in enumerate(datas)])  # one batch signature
        assert ack.last_order == 2 * len(datas)
        envs = await plain.items("shapes")
        ring = Keyring.load(keys / "keyring.json")
        assert verify(envs) is None and [ring.check_envelope(e) for e in envs] == [None] * len(envs)
        assert envs[0].data == {"point": [1, 2.5, 1e21]}
    finally:
        await triage.close()
        await plain.close()


def _respelled(text: str) -> str:
    """The same bytes as the base64url ``text``, spelled with the spare low bits
    of its last character set (86 characters carry 516 bits for 512)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare = {2: 0xF, 3: 0x3}[len(text) % 4]
    return text[:-1] + alphabet[alphabet.index(text[-1]) | spare]


async def test_a_signature_respelled_in_its_spare_base64_bits_is_refused(strict: str, keys: Path) -> None:
    """A signature is one text (base64url, no padding): the same 64 bytes spelled
    with the unused low bits of its last character set were accepted and stored,
    a ``sig`` (or ``to_sig``) its signer never wrote -- anyone could re-sign a
    captured item in 15 other spellings."""
    triage = Signer.load(keys / "Triage.nk")
    gateway = Signer.load(keys / "gateway.nk")
    plain = await _client(strict, None)
    try:
        alone = sign_item(triage, "m1", _item("Triage", "alone", "ma-1"))
        together = sign_batch(triage, [("m1", _item("Triage", f"t{i}", f"mt-{i}")) for i in range(3)])
        base, _, path = (together[0].sig or "").partition(".")
        respelled = [
            msgspec.structs.replace(alone, sig=_respelled(alone.sig or "")),
            msgspec.structs.replace(together[0], sig=f"{_respelled(base)}.{path}"),
        ]
        for item, signed in zip(respelled, (alone, together[0]), strict=True):
            same = [base64.urlsafe_b64decode((it.sig or "").split(".")[0] + "==") for it in (item, signed)]
            assert same[0] == same[1] and item.sig != signed.sig
            msg = await plain.nc.request("convlog.append.m1", msgspec.json.encode(AppendRequest(items=[item])),
                                         timeout=5)
            assert msgspec.json.decode(msg.data)["error"]["code"] == "forbidden", msg.data
        sent = _signed_message(gateway, "m2", "billing please", "L1Billing", "mm-2")
        for doc in ({**sent, "sig": _respelled(sent["sig"])}, {**sent, "to_sig": _respelled(sent["to_sig"])}):
            msg = await plain.nc.request("convlog.in.m2", msgspec.json.encode(doc), timeout=5)
            assert msgspec.json.decode(msg.data)["error"]["code"] == "forbidden", msg.data
        assert await plain.last_order("m1") == 0 and await plain.last_order("m2") == 0
        # The signatures as signed still go through.
        await plain.nc.request("convlog.append.m1", msgspec.json.encode(AppendRequest(items=[alone])), timeout=5)
        assert [e.sig for e in await plain.items("m1")] == [alone.sig]
    finally:
        await plain.close()


async def test_a_keyring_entry_whose_agent_does_not_fit_its_role_is_refused(
    nats_server: NatsServer, tmp_path: Path, keys: Path
) -> None:
    # A hand-edited keyring was taken as it was: an agent key named 'user' had its signed
    # user items stored from the append subject (signatures not required), which replay
    # --verify then failed ("belongs to agent 'user', not 'user'"); a gateway key named
    # 'gateway' was missed by `keys rotate gateway`, which added a successor and left that
    # (perhaps leaked) key live. Such a keyring is refused where it is read, naming the key.
    doc = msgspec.json.decode((keys / "keyring.json").read_bytes())
    stranger, _ = Signer.generate()
    as_user = tmp_path / "as-user.json"
    as_user.write_bytes(msgspec.json.encode({**doc, "keys": [*doc["keys"], {
        "key_id": stranger.key_id, "role": "agent", "agent": "user", "created_at": "2026-01-01T00:00:00Z"}]}))
    with pytest.raises(ConfigError, match=f"{stranger.key_id}: an agent key may not be named 'user'"):
        service = await _service(nats_server.url, tmp_path, keyring=str(as_user))
        try:  # what happened: the service took the key for a user's
            plain = await _client(nats_server.url, None)
            await plain.append("u", [sign_item(stranger, "u", _item("user", "hello", "u-1"))])
            await plain.close()
        finally:
            await service.shutdown()
    assert not (tmp_path / "convlog.db").exists() or await _no_items(nats_server.url, "u")

    folder = tmp_path / "gateway keys"
    shutil.copytree(keys, folder)
    ring = folder / "keyring.json"
    ring.write_bytes(ring.read_bytes().replace(b'"agent": "user"', b'"agent": "gateway"'))
    before = ring.read_bytes(), (folder / "gateway.nk").read_bytes()
    rc, _, err = await run_cli("keys", "rotate", "gateway", "--dir", str(folder), env=offline_env())
    assert rc == 2 and "a gateway key's agent is 'user', not 'gateway'" in err, err
    assert (ring.read_bytes(), (folder / "gateway.nk").read_bytes()) == before
    (tmp_path / "export.jsonl").write_bytes(b"")
    rc, _, err = await run_cli("replay", "u", "--file", str(tmp_path / "export.jsonl"), "--verify",
                               "--keyring", str(as_user), env=offline_env())
    assert rc == 2 and f"{stranger.key_id}: an agent key may not be named 'user'" in err, err


async def _no_items(url: str, sid: str) -> bool:
    plain = await _client(url, None)
    try:
        return await plain.last_order(sid) == 0
    finally:
        await plain.close()
