"""The log service over a real nats-server: every subject, every error code, discovery,
followers, the CLI, and a graceful SIGTERM of ``convlog log`` under load.

Every test on the ``env`` fixture runs on both stores (SQLite with its outbox,
JetStream whose items stream sources the log streams): the contract is the same.

The service runs in-process (so tests can look at its store and stop it) except
where the process boundary is the point (SIGTERM). ``convlog.items.<sid>`` is
only ever read through JetStream consumers, never a core subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats, ServiceVerb, control_subject

from services.log.handlers import ack_size_bound
from services.log.service import SERVICE_NAME, LogService
from services.log.store.sqlite import SQLiteStore
from services.worker.routing import Routing
from services.worker.spec import load_spec
from shared import nats_seam
from shared.chain import verify
from shared.client import LogClient
from shared.config import Settings, load_settings
from shared.errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    ConflictError,
    ConvlogError,
    InvalidSessionIdError,
    TooLargeError,
    UnavailableError,
)
from shared.messages import MAX_APPEND_ITEMS, Envelope
from shared.nats_seam import FAST, PUBLIC, Probe, bind, probe
from tests.support.eventually import assert_eventually
from tests.support.natsd import NatsServer
from tests.support.procs import REPO_ROOT, python_module, run_cli, service_env

MAX_PAYLOAD = 64 * 1024
MAX_ITEM_BYTES = 4096
STREAM = "CONVLOG_ITEMS"

#: Run a test on both nats-py seams (shared.nats_seam): the fast one on
#: nats-py internals, and nats-py's public API only, for service and client.
SEAMS = ["auto", "public"]
SEAM_IDS = ["fast-seam", "public-seam"]
both_seams = pytest.mark.parametrize("env", SEAMS, ids=SEAM_IDS, indirect=True)


@dataclass
class Env:
    server: NatsServer
    settings: Settings
    service: LogService
    nc: Client  # a plain connection for wire-level requests
    client: LogClient
    tmp: Path

    @property
    def db(self) -> Path:
        return self.settings.db_path


def expect_seam(service: LogService, mode: str) -> None:
    """The service runs on the seam ``mode`` asks for (``auto`` is fast on a tested nats-py)."""
    want = PUBLIC if mode == "public" else FAST
    assert service._seam is want, f"seam {service._seam.name if service._seam else None}: {probe().reason()}"


@pytest.fixture(params=["sqlite", "jetstream"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store the ``env`` service runs on (every ``env`` test runs on both)."""
    return str(request.param)


@pytest.fixture
async def env(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path, request: pytest.FixtureRequest,
    store_kind: str,
) -> AsyncIterator[Env]:
    """A nats-server with a 64 KiB max payload and the log service on a fresh store
    (SQLite file or JetStream streams; on the nats-py seam given by indirect
    parametrization, default ``auto``)."""
    mode = getattr(request, "param", "auto")
    server = nats_server_factory(config=f"max_payload: {MAX_PAYLOAD}\n")
    settings = load_settings(
        {"nats_url": server.url, "db": str(tmp_path / "log.db"), "data_dir": str(tmp_path),
         "max_item_bytes": MAX_ITEM_BYTES, "nats_seam": mode, "store": store_kind},
        environ={},
    )
    service = LogService(settings)
    try:
        await service.start()
        expect_seam(service, mode)
        nc = await nats.connect(server.url)
        bind(nc, mode)
        try:
            yield Env(server, settings, service, nc, LogClient(nc, timeout=5, deadline=10), tmp_path)
        finally:
            await nc.close()
    finally:
        await service.shutdown()


async def wire(nc: Client, subject: str, body: bytes | dict[str, Any] = b"") -> tuple[dict[str, str], Any]:
    """One raw request: (headers, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subject, data, timeout=5)
    return dict(msg.headers or {}), json.loads(msg.data)


async def service_stats(nc: Client, service: LogService) -> ServiceStats:
    """``$SRV.STATS`` of this one service instance."""
    subject = control_subject(ServiceVerb.STATS, SERVICE_NAME, service._service.id)
    return ServiceStats.from_dict(json.loads((await nc.request(subject, b"", timeout=5)).data))


def user(content: str, **extra: Any) -> dict[str, Any]:
    return {"agent": "user", "data": {"role": "user", "content": content}, **extra}


async def raw_log(env: Env, sid: str) -> list[Envelope]:
    return await env.client.items(sid, raw=True)


async def stream_messages(env: Env) -> int:
    return (await env.nc.jetstream().stream_info(STREAM)).state.messages


async def settled_state(env: Env) -> tuple[list[tuple[str, int]], int]:
    """Every session's last order and the stream size, once the outbox caught up."""
    async def caught_up() -> tuple[list[tuple[str, int]], int]:
        sessions = [(s.session_id, s.last_order) async for s in env.client.iter_sessions()]
        published = await stream_messages(env)
        assert published == sum(last for _, last in sessions), (published, sessions)
        return sessions, published

    return await assert_eventually(caught_up, timeout=10)


# -- append / read -----------------------------------------------------------------


@both_seams
async def test_append_and_read_forward_tail_and_raw(env: Env) -> None:
    headers, rep = await wire(env.nc, "convlog.append.s1", {"items": [
        user("Hi, I was charged twice 💳", item_id="u-1"),
        {"agent": "Triage", "data": {"type": "function_call", "call_id": "c1",
                                     "name": "transfer_to_billing", "arguments": "{}"}},
        {"agent": "Triage", "data": {"type": "function_call_output", "call_id": "c1",
                                     "output": '{"assistant": "L1Billing"}'}},
    ]})
    assert ERROR_CODE_HEADER not in headers
    assert set(rep) == {"session_id", "first_order", "last_order", "items"}
    assert (rep["session_id"], rep["first_order"], rep["last_order"]) == ("s1", 1, 3)
    assert [set(i) for i in rep["items"]] == [{"item_order", "item_id", "hash", "duplicate"}] * 3
    assert rep["items"][0]["item_id"] == "u-1"
    assert all(len(i["item_id"]) >= 32 for i in rep["items"][1:])  # assigned by the service
    _, rep2 = await wire(env.nc, "convlog.append.s1", {"items": [
        {"agent": "system", "kind": "retract", "data": {"target": 2}},
        {"agent": "L1Billing", "data": {"type": "message", "role": "assistant",
                                        "content": [{"type": "output_text", "text": "Refunded."}]}},
    ], "expected_last": 3})
    assert (rep2["first_order"], rep2["last_order"]) == (4, 5)

    # Default read: visible history only.
    _, page = await wire(env.nc, "convlog.read.s1", {})
    assert set(page) == {"session_id", "items", "last_order", "more"}
    assert [e["item_order"] for e in page["items"]] == [1, 3, 5]
    assert (page["last_order"], page["more"]) == (5, False)
    # raw: every envelope, with every field, and a valid chain.
    _, page = await wire(env.nc, "convlog.read.s1", {"raw": True})
    assert [e["item_order"] for e in page["items"]] == [1, 2, 3, 4, 5]
    assert set(page["items"][0]) == {"session_id", "item_order", "item_id", "agent", "kind",
                                     "data", "created_at", "hash"}
    envs = [msgspec.convert(e, Envelope) for e in page["items"]]
    assert verify(envs, session_id="s1") is None
    assert [e.hash for e in envs] == [i["hash"] for i in rep["items"] + rep2["items"]]
    assert envs[0].data == {"role": "user", "content": "Hi, I was charged twice 💳"}
    # tail: last n visible, oldest first; raw tail includes the retract.
    _, page = await wire(env.nc, "convlog.read.s1", {"tail": 2})
    assert [e["item_order"] for e in page["items"]] == [3, 5]
    _, page = await wire(env.nc, "convlog.read.s1", {"tail": 2, "raw": True})
    assert [e["item_order"] for e in page["items"]] == [4, 5]
    assert [e.item_order for e in await env.client.tail("s1", 1)] == [5]
    # after + limit pages forward.
    _, page = await wire(env.nc, "convlog.read.s1", {"after": 1, "limit": 2, "raw": True})
    assert [e["item_order"] for e in page["items"]] == [2, 3] and page["more"] is True
    _, page = await wire(env.nc, "convlog.read.s1", {"after": 3, "limit": 2, "raw": True})
    assert [e["item_order"] for e in page["items"]] == [4, 5] and page["more"] is False
    # An unknown session reads as empty.
    _, page = await wire(env.nc, "convlog.read.nobody", {})
    assert page == {"session_id": "nobody", "items": [], "last_order": 0, "more": False}
    # A retried append is answered with its original orders; the same id with
    # other content is a conflict naming the id (nobody pre-empts an item).
    _, again = await wire(env.nc, "convlog.append.s1", {"items": [user("Hi, I was charged twice 💳", item_id="u-1")]})
    assert again["items"] == [{**rep["items"][0], "duplicate": True}]
    _, hijack = await wire(env.nc, "convlog.append.s1", {"items": [user("changed", item_id="u-1")]})
    assert hijack["error"]["code"] == "conflict" and hijack["error"]["item_id"] == "u-1"
    assert (await env.client.last_order("s1")) == 5


async def test_read_pages_stay_under_the_max_payload(env: Env) -> None:
    for batch in range(4):
        await env.client.append("big", [user(f"{batch}.{i} " + "x" * 3000) for i in range(10)])
    pages: list[list[int]] = []
    after = 0
    while True:
        msg = await env.nc.request("convlog.read.big", json.dumps({"after": after, "raw": True}).encode())
        assert len(msg.data) <= MAX_PAYLOAD
        page = json.loads(msg.data)
        pages.append([e["item_order"] for e in page["items"]])
        if not page["more"]:
            break
        after = pages[-1][-1]
    assert len(pages) > 1
    assert [o for p in pages for o in p] == list(range(1, 41))
    assert [e.item_order for e in await env.client.items("big")] == list(range(1, 41))
    # A tail that cannot fit in one reply is refused, not truncated.
    headers, body = await wire(env.nc, "convlog.read.big", {"tail": 40})
    assert headers[ERROR_CODE_HEADER] == "413"
    assert body["error"]["code"] == "too_large" and "after/limit" in body["error"]["message"]
    with pytest.raises(TooLargeError):
        await env.client.tail("big", 40)
    assert len(await env.client.tail("big", 5)) == 5


async def test_iter_items_reads_ahead_and_stops_cleanly(env: Env) -> None:
    await env.client.append("ahead", [user(f"m{i}") for i in range(1, 26)])
    got = [e.item_order async for e in env.client.iter_items("ahead", page=4)]
    assert got == list(range(1, 26))
    got = [e.item_order async for e in env.client.iter_items("ahead", after=20, page=2, raw=False)]
    assert got == [21, 22, 23, 24, 25]
    # An item appended while a page is consumed is still yielded: the last
    # page was read ahead, so the end is decided by one more read.
    got = []
    async for e in env.client.iter_items("ahead", after=20, page=4):
        got.append(e.item_order)
        if e.item_order == 21:
            await env.client.append("ahead", [user("m26")])
    assert got == [21, 22, 23, 24, 25, 26]
    # Stopping after the first page drops the page read ahead without an error.
    pages = env.client.iter_items("ahead", page=3)
    assert [await anext(pages) for _ in range(3)] == [
        e for e in (await env.client.read("ahead", limit=3)).items
    ]
    await pages.aclose()
    assert (await env.client.read("ahead", after=25)).items[0].item_order == 26


async def test_sessions_lists_by_id_with_paging(env: Env) -> None:
    for sid, n in (("s-c", 1), ("s-a", 3), ("s-b", 2)):
        await env.client.append(sid, [user(str(i)) for i in range(n)])
    _, rep = await wire(env.nc, "convlog.sessions", {"limit": 2})
    assert set(rep) == {"sessions", "more"}
    assert [(s["session_id"], s["last_order"]) for s in rep["sessions"]] == [("s-a", 3), ("s-b", 2)]
    assert set(rep["sessions"][0]) == {"session_id", "last_order", "updated_at"}
    assert rep["more"] is True
    _, rep = await wire(env.nc, "convlog.sessions", {"after": "s-b"})
    assert [s["session_id"] for s in rep["sessions"]] == ["s-c"] and rep["more"] is False
    _, rep = await wire(env.nc, "convlog.sessions")  # an empty body is {}
    assert [s["session_id"] for s in rep["sessions"]] == ["s-a", "s-b", "s-c"]
    assert [s.session_id async for s in env.client.iter_sessions()] == ["s-a", "s-b", "s-c"]


# -- user messages ------------------------------------------------------------------


@both_seams
async def test_user_messages_with_and_without_a_reply_subject(env: Env) -> None:
    headers, ack = await wire(env.nc, "convlog.in.chat", {"content": "Hello", "item_id": "m-1"})
    assert ERROR_CODE_HEADER not in headers
    assert (ack["first_order"], ack["items"][0]["item_id"], ack["items"][0]["duplicate"]) == (1, "m-1", False)

    # A plain publish (no reply subject) is appended too.
    await env.nc.publish("convlog.in.chat", json.dumps({"content": "Are you there?"}).encode())
    await env.nc.publish("convlog.in.chat", b"{broken")  # refused, logged, nothing written

    async def appended() -> list[Envelope]:
        log = await raw_log(env, "chat")
        assert len(log) == 2, log
        return log

    log = await assert_eventually(appended, timeout=5)
    assert [(e.agent, e.kind, e.data) for e in log] == [
        ("user", "item", {"role": "user", "content": "Hello"}),
        ("user", "item", {"role": "user", "content": "Are you there?"}),
    ]
    # The same item_id again: not written twice.
    _, dup = await wire(env.nc, "convlog.in.chat", {"content": "Hello", "item_id": "m-1"})
    assert dup["items"][0] == {**ack["items"][0], "duplicate": True}
    ack2 = await env.client.send("chat", "third")
    assert ack2.first_order == 3

    # `to` picks the entry agent of a new session (routing metadata, outside the log).
    _, ack = await wire(env.nc, "convlog.in.fresh", {"content": "billing please", "to": "L1Billing"})
    assert ack["first_order"] == 1
    kv = await env.nc.jetstream().key_value(env.settings.subjects.routing_bucket)
    entry = json.loads((await kv.get("fresh")).value)
    assert entry == {"active": "L1Billing", "order": 0, "entry": "L1Billing"}
    # The worker's reader decodes what the log service wrote: the turn goes to L1Billing.
    routing = Routing(kv, env.client, load_spec(REPO_ROOT / "deploy" / "agents.toml"))
    cp = await routing.checkpoint("fresh")
    assert cp is not None and (cp.active, cp.order, cp.entry) == ("L1Billing", 0, "L1Billing")
    assert await routing.active_agent("fresh", 1) == "L1Billing"
    assert await routing.active_agent("chat", 1) == "Triage"  # no `to`: the spec's entry
    assert [e.data for e in await raw_log(env, "fresh")] == [{"role": "user", "content": "billing please"}]
    await settled_state(env)


# -- convlog.items.<sid> ----------------------------------------------------------


@both_seams
async def test_items_subject_carries_every_commit_in_order_with_msg_id(env: Env) -> None:
    js = env.nc.jetstream()
    sub = await js.subscribe("convlog.items.feed", ordered_consumer=True)
    other = await js.subscribe("convlog.items.other", ordered_consumer=True)
    try:
        await env.client.append("feed", [user("1"), user("2")])
        await asyncio.gather(*(env.client.append("feed", [user(f"c{i}")]) for i in range(10)),
                             *(env.client.append("other", [user(f"o{i}")]) for i in range(5)))
        await env.client.append("feed", [{"agent": "system", "kind": "retract", "data": {"target": 1}}])
        await env.client.append("feed", [{"agent": "system", "kind": "clear"}, user("after clear")])
        dup = await env.client.append("feed", [user("1", item_id="fixed")])
        await env.client.append("feed", [user("1", item_id="fixed")])  # duplicate: not republished
        assert dup.last_order == 16

        log = await raw_log(env, "feed")
        assert [e.item_order for e in log] == list(range(1, 17))
        received: list[Envelope] = []
        for expected in log:
            msg = await sub.next_msg(timeout=5)
            assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == f"feed:{expected.item_order}"
            env_ = msgspec.json.decode(msg.data, type=Envelope)
            assert env_ == expected
            received.append(env_)
        assert verify(received, session_id="feed") is None
        other_orders = [msgspec.json.decode((await other.next_msg(timeout=5)).data, type=Envelope).item_order
                        for _ in range(5)]
        assert other_orders == [1, 2, 3, 4, 5]
        _, published = await settled_state(env)
        assert published == 16 + 5
    finally:
        await sub.unsubscribe()
        await other.unsubscribe()


# -- errors --------------------------------------------------------------------------

GOOD = json.dumps({"items": [user("fine")]}).encode()
BIG_DATA = json.dumps({"items": [user("y" * (MAX_ITEM_BYTES + 10))]}).encode()


def _append(data: dict[str, Any]) -> bytes:
    return json.dumps({"items": [{"agent": "a", "data": data}]}).encode()


# 500 tiny items fit the request easily (~15 KB), but their ack (an order, a
# minted 32-character id and a 64-character hash each) could not fit 64 KiB.
ACK_OVER_MAX_PAYLOAD = json.dumps({"items": [{"agent": "a", "data": {"n": 1}}] * 500}).encode()


BAD_REQUESTS = [
    # (id, subject, body, code, fragment of the message)
    ("append-malformed-json", "convlog.append.v", b'{"items": [', "bad_request", "malformed JSON"),
    ("append-empty-body", "convlog.append.v", b"", "bad_request", "JSON"),
    ("append-not-an-object", "convlog.append.v", b"[1, 2]", "bad_request", "AppendRequest"),
    ("append-items-not-a-list", "convlog.append.v", b'{"items": "x"}', "bad_request", "$.items"),
    ("append-no-items", "convlog.append.v", b'{"items": []}', "bad_request", "$.items"),
    ("append-missing-agent", "convlog.append.v", b'{"items": [{"data": {"a": 1}}]}', "bad_request", "agent"),
    ("append-unknown-kind", "convlog.append.v", b'{"items": [{"agent": "a", "kind": "edit", "data": {"a": 1}}]}',
     "bad_request", "kind"),
    ("append-unknown-field", "convlog.append.v", b'{"items": [{"agent": "a", "data": {"a": 1}}], "expectd_last": 2}',
     "bad_request", "expectd_last"),
    ("append-unknown-item-field", "convlog.append.v", b'{"items": [{"agent": "a", "data": {"a": 1}, "item_od": "x"}]}',
     "bad_request", "item_od"),
    ("append-int-2**53", "convlog.append.v", _append({"n": 2**53}), "bad_request", "$.items[0].data.n"),
    ("append-int-minus-2**53", "convlog.append.v", _append({"n": [-(2**53)]}), "bad_request", "$.items[0].data.n[0]"),
    ("append-int-10**30", "convlog.append.v", _append({"deep": {"n": 10**30}}), "bad_request", "$.items[0].data.deep.n"),
    ("append-float-overflow", "convlog.append.v", b'{"items": [{"agent": "a", "data": {"x": 1e400}}]}',
     "bad_request", "out of range"),
    ("append-expected-last-negative", "convlog.append.v", b'{"items": [{"agent": "a", "data": {"a": 1}}], "expected_last": -1}',
     "bad_request", "expected_last"),
    ("append-expected-last-huge", "convlog.append.v",
     b'{"items": [{"agent": "a", "data": {"a": 1}}], "expected_last": 9007199254740992}', "bad_request", "expected_last"),
    ("append-retract-unknown-target", "convlog.append.v",
     b'{"items": [{"agent": "a", "data": {"a": 1}}, {"agent": "s", "kind": "retract", "data": {"target": 99}}]}',
     "bad_request", "99"),
    ("append-same-id-twice", "convlog.append.v",
     b'{"items": [{"agent": "a", "data": {"a": 1}, "item_id": "d"}, {"agent": "a", "data": {"a": 2}, "item_id": "d"}]}',
     "bad_request", "twice"),
    ("read-malformed-json", "convlog.read.v", b"{", "bad_request", "malformed JSON"),
    ("read-unknown-field", "convlog.read.v", b'{"limt": 1}', "bad_request", "limt"),
    ("read-tail-with-after", "convlog.read.v", b'{"tail": 1, "after": 1}', "bad_request", "tail"),
    ("read-negative-after", "convlog.read.v", b'{"after": -1}', "bad_request", "after"),
    ("read-huge-after", "convlog.read.v", b'{"after": 9007199254740992}', "bad_request", "after"),
    ("sessions-bad-after", "convlog.sessions", b'{"after": "a.b"}', "bad_request", "after"),
    ("sessions-unknown-field", "convlog.sessions", b'{"afterr": "x"}', "bad_request", "afterr"),
    ("sessions-zero-limit", "convlog.sessions", b'{"limit": 0}', "bad_request", "limit"),
    ("in-malformed-json", "convlog.in.v", b"hello", "bad_request", "malformed JSON"),
    ("in-empty-body", "convlog.in.v", b"", "bad_request", "JSON"),
    ("in-content-not-a-string", "convlog.in.v", b'{"content": 5}', "bad_request", "content"),
    ("in-unknown-field", "convlog.in.v", b'{"content": "x", "too": "L1Billing"}', "bad_request", "too"),
    ("append-invalid-session-id", "convlog.append.a@b", GOOD, "invalid_session_id", "a@b"),
    ("read-invalid-session-id", "convlog.read.a@b", b"{}", "invalid_session_id", "a@b"),
    ("in-invalid-session-id", "convlog.in.a@b", b'{"content": "x"}', "invalid_session_id", "a@b"),
    ("append-extra-subject-token", "convlog.append.v.x", GOOD, "invalid_session_id", "session id"),
    ("read-session-id-too-long", "convlog.read." + "x" * 129, b"{}", "invalid_session_id", "128"),
    ("append-item-too-large", "convlog.append.v", BIG_DATA, "too_large", str(MAX_ITEM_BYTES)),
    ("in-item-too-large", "convlog.in.v", json.dumps({"content": "z" * MAX_ITEM_BYTES}).encode(),
     "too_large", str(MAX_ITEM_BYTES)),
    ("append-ack-over-max-payload", "convlog.append.v", ACK_OVER_MAX_PAYLOAD,
     "too_large", f"max payload of {MAX_PAYLOAD} bytes"),
]
STATUS = {"bad_request": "400", "invalid_session_id": "400", "too_large": "413", "conflict": "409"}


@both_seams
@pytest.mark.parametrize(
    ("subject", "body", "code", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
async def test_bad_input_gets_a_clear_error_and_nothing_is_written(
    env: Env, subject: str, body: bytes, code: str, fragment: str
) -> None:
    await env.client.append("v", [user("one"), user("two")])
    before = await settled_state(env)

    headers, reply = await wire(env.nc, subject, body)
    assert headers[ERROR_CODE_HEADER] == STATUS[code]
    assert headers[ERROR_HEADER].startswith(f"{code}: ")
    assert set(reply) == {"error"}
    assert reply["error"]["code"] == code
    assert fragment in reply["error"]["message"], reply
    assert "Traceback" not in reply["error"]["message"]

    # Nothing half-written, and the service still serves.
    assert await settled_state(env) == before
    ack = await env.client.append("v", [user("three")])
    assert ack.first_order == 3
    assert [e.item_order for e in await raw_log(env, "v")] == [1, 2, 3]


@both_seams
async def test_conflict_carries_last_order(env: Env) -> None:
    await env.client.append("c", [user("1"), user("2")])
    headers, reply = await wire(env.nc, "convlog.append.c", {"items": [user("x")], "expected_last": 1})
    assert headers[ERROR_CODE_HEADER] == "409" and headers[ERROR_HEADER].startswith("conflict: ")
    assert reply["error"]["code"] == "conflict" and reply["error"]["last_order"] == 2
    with pytest.raises(ConflictError) as exc:
        await env.client.append("c", [user("x")], expected_last=0)
    assert exc.value.last_order == 2
    assert (await env.client.append("c", [user("3")], expected_last=2)).last_order == 3
    # The retry-by-ids rule over the wire: a stale retry of committed ids is a duplicate.
    items = [user("a", item_id="r-a"), user("b", item_id="r-b")]
    first = await env.client.append("c", items, expected_last=3)
    await env.client.append("c", [user("moved on")])
    retry = await env.client.append("c", items, expected_last=3)
    assert [(i.item_order, i.duplicate) for i in retry.items] == [(4, True), (5, True)]
    assert [i.hash for i in retry.items] == [i.hash for i in first.items]
    assert [e.item_order for e in await raw_log(env, "c")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("sid", ["a.b", "*", ">", "a b", "", "a\n", "x" * 129])
async def test_log_client_refuses_bad_session_ids_before_sending(env: Env, sid: str) -> None:
    c = env.client
    calls = [
        lambda: c.append(sid, [user("x")]),
        lambda: c.read(sid),
        lambda: c.tail(sid, 3),
        lambda: c.send(sid, "hi"),
        lambda: c.last_order(sid),
        lambda: anext(c.follow(sid)),
        lambda: anext(c.iter_items(sid)),
    ]
    for call in calls:
        with pytest.raises(InvalidSessionIdError):
            await call()
    # Nothing reached the service.
    stats = ServiceStats.from_dict(json.loads(
        (await env.nc.request(control_subject(ServiceVerb.STATS, SERVICE_NAME), b"", timeout=5)).data
    ))
    assert [e.num_requests for e in stats.endpoints] == [0, 0, 0, 0]


async def test_a_request_over_the_max_payload_is_too_large(env: Env) -> None:
    await env.client.append("v", [user("one")])
    items = [user("y" * 3000) for _ in range(30)]  # each item is fine; together ~90 KiB
    with pytest.raises(TooLargeError) as exc:
        await env.client.append("v", items)
    assert str(MAX_PAYLOAD) in exc.value.message
    with pytest.raises(TooLargeError):
        await env.client.send("v", "z" * MAX_PAYLOAD)
    assert [e.item_order for e in await raw_log(env, "v")] == [1]
    assert (await env.client.append("v", items[:10])).last_order == 11


async def test_a_batch_over_the_item_count_limit_is_too_large(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    # A server whose max payload carries 10,001 tiny items (~300 KB) in one request.
    server = nats_server_factory(config="max_payload: 524288\n")
    settings = load_settings(
        {"nats_url": server.url, "db": str(tmp_path / "log.db"), "data_dir": str(tmp_path)}, environ={}
    )
    async with LogService(settings):
        nc = await nats.connect(server.url)
        try:
            client = LogClient(nc, timeout=5, deadline=10)
            await client.append("v", [user("one")])
            body = json.dumps({"items": [{"agent": "a", "data": {"n": 1}}] * (MAX_APPEND_ITEMS + 1)}).encode()
            headers, reply = await wire(nc, "convlog.append.v", body)
            assert headers[ERROR_CODE_HEADER] == "413"
            assert headers[ERROR_HEADER].startswith("too_large: ")
            assert reply["error"]["code"] == "too_large"
            assert reply["error"]["limit"] == MAX_APPEND_ITEMS
            assert f"{MAX_APPEND_ITEMS + 1} items" in reply["error"]["message"]
            assert f"limit of {MAX_APPEND_ITEMS} items" in reply["error"]["message"]
            # The typed error reaches LogClient callers too.
            with pytest.raises(TooLargeError, match=str(MAX_APPEND_ITEMS)):
                await client.append("w", [{"agent": "a", "data": {"n": 1}}] * (MAX_APPEND_ITEMS + 1))
            # Nothing was written, and the service still serves.
            assert [e.item_order for e in await client.items("v", raw=True)] == [1]
            assert await client.last_order("w") == 0
            assert (await client.append("v", [user("two")])).last_order == 2
        finally:
            await nc.close()


async def test_an_ack_that_cannot_fit_the_max_payload_is_too_large(env: Env) -> None:
    await env.client.append("v", [user("one")])
    with pytest.raises(TooLargeError) as exc:
        await env.client.append("v", [{"agent": "a", "data": {"n": 1}}] * 500)
    assert exc.value.code == "too_large" and exc.value.extra["limit"] == MAX_PAYLOAD
    assert f"max payload of {MAX_PAYLOAD} bytes" in exc.value.message
    # A batch whose ack fits is fine, and only it was written.
    ack = await env.client.append("v", [{"agent": "a", "data": {"n": 1}}] * 100)
    assert (ack.first_order, ack.last_order) == (2, 101)
    assert len(await raw_log(env, "v")) == 101
    # The bound the service checks is never below a real ack's size.
    body = json.dumps({"items": [{"agent": "a", "data": {"n": 1}}] * 100}).encode()
    msg = await env.nc.request("convlog.append.v", body, timeout=5)
    assert len(msg.data) <= ack_size_bound([i["item_id"] for i in json.loads(msg.data)["items"]])


async def test_sessions_pages_stay_under_the_max_payload(env: Env) -> None:
    # 400 sessions with 120-character ids: ~75 KB of listing, over the 64 KiB max payload.
    sids = [f"{i:04d}" + "s" * 116 for i in range(400)]
    await asyncio.gather(*(env.client.append(sid, [user("hi")]) for sid in sids))
    _, page = await wire(env.nc, "convlog.sessions", {"limit": 1000})
    assert page["more"] is True and 0 < len(page["sessions"]) < 400
    assert [s["session_id"] for s in page["sessions"]] == sids[: len(page["sessions"])]
    # Paging on from the last one lists every session exactly once.
    assert [s.session_id async for s in env.client.iter_sessions()] == sids


async def test_a_custom_prefix_moves_every_subject(env: Env) -> None:
    settings = load_settings(
        {"nats_url": env.server.url, "db": str(env.tmp / "acme.db"), "prefix": "acme.log",
         "store": env.settings.store}, environ={}
    )
    async with LogService(settings):
        acme = LogClient(env.nc, prefix="acme.log")
        sub = await env.nc.jetstream().subscribe("acme.log.items.s", ordered_consumer=True)
        try:
            ack = await acme.append("s", [user("for acme")])
            assert ack.first_order == 1
            msg = await sub.next_msg(timeout=5)
            assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == "s:1"
            assert (await env.nc.jetstream().stream_info("ACME_LOG_ITEMS")).state.messages == 1
        finally:
            await sub.unsubscribe()
        _, rep = await wire(env.nc, "acme.log.sessions")
        assert [x["session_id"] for x in rep["sessions"]] == ["s"]
    # The default-prefix service never saw it.
    assert await env.client.last_order("s") == 0


async def test_unavailable_when_nobody_serves(env: Env) -> None:
    lonely = LogClient(env.nc, prefix="elsewhere", timeout=0.2, deadline=0.6)
    with pytest.raises(UnavailableError) as exc:
        await lonely.append("s", [user("x")])
    assert exc.value.code == "unavailable"


# -- discovery ---------------------------------------------------------------------


@both_seams
async def test_micro_ping_info_and_stats(env: Env) -> None:
    await env.client.append("d", [user("1")])
    await env.client.read("d")
    await env.client.send("d", "2")
    await wire(env.nc, "convlog.append.d", b"{oops")
    await env.client.sessions()

    async def srv(verb: ServiceVerb, *, with_id: bool = False) -> dict[str, Any]:
        name = SERVICE_NAME
        subject = control_subject(verb, name, env.service._service.id if with_id else None)
        return json.loads((await env.nc.request(subject, b"", timeout=5)).data)

    ping = ServicePing.from_dict(await srv(ServiceVerb.PING))
    assert ping.name == SERVICE_NAME and ping.metadata["prefix"] == "convlog"
    any_ping = json.loads((await env.nc.request("$SRV.PING", b"", timeout=5)).data)
    assert any_ping["name"] == SERVICE_NAME
    assert ServicePing.from_dict(await srv(ServiceVerb.PING, with_id=True)).id == ping.id

    info = ServiceInfo.from_dict(await srv(ServiceVerb.INFO))
    endpoints = {e.name: e for e in info.endpoints}
    assert {n: e.subject for n, e in endpoints.items()} == {
        "append": "convlog.append.>",
        "read": "convlog.read.>",
        "sessions": "convlog.sessions",
        "in": "convlog.in.>",
    }
    assert {e.queue_group for e in info.endpoints} == {"convlog-log"}

    async def counted() -> None:
        stats = ServiceStats.from_dict(await srv(ServiceVerb.STATS))
        by_name = {e.name: e for e in stats.endpoints}
        assert {n: e.num_requests for n, e in by_name.items()} == {
            "append": 2, "read": 1, "sessions": 1, "in": 1,
        }
        assert by_name["append"].num_errors == 1
        assert by_name["read"].num_errors == 0
        assert "bad_request" in (by_name["append"].last_error or "")

    await assert_eventually(counted, timeout=5)


@pytest.mark.parametrize("mode", SEAMS, ids=SEAM_IDS)
async def test_appends_are_served_and_counted_on_either_seam(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    # On the fast seam appends skip micro's queue and task (nats-py
    # internals); on the public one micro's own path serves them, alike.
    settings = load_settings(
        {"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "nats_seam": mode}, environ={}
    )
    async with LogService(settings) as service:
        expect_seam(service, mode)
        sub = FAST.endpoint_subscription(service._service, "append")
        assert FAST.delivers_inline(sub) is (mode == "auto")
        nc = await nats.connect(nats_server.url)
        bind(nc, mode)
        try:
            client = LogClient(nc)
            replies = await asyncio.gather(*(client.append("in", [user(f"m{i}")]) for i in range(20)))
            assert sorted(r.last_order for r in replies) == list(range(1, 21))
            headers, _ = await wire(nc, "convlog.append.in", b"{not json")
            assert headers[ERROR_HEADER].startswith("bad_request")
            stats = await service_stats(nc, service)
        finally:
            await nc.close()
    append = next(e for e in stats.endpoints if e.name == "append")
    assert (append.num_requests, append.num_errors) == (21, 1)
    assert append.average_processing_time > 0


async def test_an_untested_nats_py_serves_on_the_public_seam(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What a nats-py that renamed an internal looks like to the service: the
    # probe names it, and every fast path is off at once (not just that one).
    broken = Probe(version="2.16.0", tested=True, missing=("Endpoint._processing_time_renamed",))
    monkeypatch.setattr(nats_seam, "probe", lambda: broken)
    settings = load_settings({"nats_url": nats_server.url, "db": str(tmp_path / "log.db")}, environ={})
    with caplog.at_level("WARNING", logger="convlog.nats_seam"):
        async with LogService(settings) as service:
            assert service._seam is PUBLIC
            nc = await nats.connect(nats_server.url)
            try:
                client = LogClient(nc)
                replies = await asyncio.gather(*(client.append("old", [user(f"m{i}")]) for i in range(5)))
                assert sorted(r.last_order for r in replies) == [1, 2, 3, 4, 5]
                stats = await service_stats(nc, service)
            finally:
                await nc.close()
    assert "missing nats-py internals: Endpoint._processing_time_renamed" in caplog.text
    assert next(e for e in stats.endpoints if e.name == "append").num_requests == 5


@pytest.mark.parametrize("mode", SEAMS, ids=SEAM_IDS)
async def test_stats_count_the_commit_in_an_appends_processing_time(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    # micro times only its handler (decode and submit); the commit comes after.
    class SlowCommits(SQLiteStore):
        def _finish_commit(self, restart_wal: bool) -> None:
            time.sleep(0.05)
            super()._finish_commit(restart_wal)

    settings = load_settings(
        {"nats_url": nats_server.url, "db": str(tmp_path / "log.db"), "nats_seam": mode}, environ={}
    )
    async with LogService(settings, store=SlowCommits(settings.db_path)) as service:
        expect_seam(service, mode)
        nc = await nats.connect(nats_server.url)
        try:
            client = LogClient(nc)
            for i in range(3):
                await client.append("slow", [user(f"m{i}")])
            await client.read("slow")
            stats = await service_stats(nc, service)
        finally:
            await nc.close()
    by_name = {e.name: e for e in stats.endpoints}
    assert by_name["append"].num_requests == 3
    assert by_name["append"].average_processing_time >= 50_000_000  # ns: each waited for its COMMIT
    assert 0 < by_name["read"].average_processing_time < 50_000_000


# -- followers ---------------------------------------------------------------------


@both_seams
async def test_follow_yields_from_a_given_order_without_gaps_or_repeats(env: Env) -> None:
    for i in range(10):
        await env.client.append("f", [user(f"pre {i}")])
    follower = LogClient(env.nc, timeout=2, deadline=10)

    async def follow_until(after: int, last: int, got: list[Envelope]) -> list[Envelope]:
        async with contextlib.aclosing(follower.follow("f", after=after, idle_check=0.5)) as items:
            async for e in items:
                got.append(e)
                if e.item_order >= last:
                    return got
        raise AssertionError("follow ended")

    task = asyncio.create_task(follow_until(5, 70, []))
    # Appends keep arriving while the follower catches up and goes live.
    for i in range(30):
        await env.client.append("f", [user(f"live {i}")])
    await asyncio.gather(*(env.client.append("f", [user(f"burst {i}a"), user(f"burst {i}b")])
                           for i in range(15)))
    got = await asyncio.wait_for(task, 20)
    assert [e.item_order for e in got] == list(range(6, 71))
    log = await raw_log(env, "f")
    assert got == log[5:70]

    # A late follower from 0 gets the history, then what is appended next.
    late_got: list[Envelope] = []
    late = asyncio.create_task(follow_until(0, 72, late_got))

    async def history_delivered() -> None:
        assert len(late_got) == 70
    await assert_eventually(history_delivered, timeout=10)
    await env.client.append("f", [user("live again"), user("the end")])
    got = await asyncio.wait_for(late, 20)
    assert [e.item_order for e in got] == list(range(1, 73))
    assert got == await raw_log(env, "f")


# -- the CLI -------------------------------------------------------------------------


def cli_env(tmp: Path) -> dict[str, str]:
    return service_env(tmp / "cli-data")


async def convlog(tmp: Path, *args: str) -> tuple[int, str, str]:
    """Run ``python -m services.cli.main ARGS`` without blocking the event loop."""
    return await run_cli(*args, env=cli_env(tmp))


async def test_cli_replay_verify_sessions_and_not_found(env: Env) -> None:
    await env.client.append("audit-1", [user("Hello 👋"), user("second")])
    await env.client.append("audit-1", [{"agent": "system", "kind": "retract", "data": {"target": 1}}])
    await env.client.append("audit-1", [{"agent": "Triage", "data": {
        "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]}}])
    await env.client.append("audit-2", [user("other")])
    url = env.server.url
    log = await raw_log(env, "audit-1")

    rc, out, err = await convlog(env.tmp, "replay", "audit-1", "--verify", "--nats-url", url)
    assert rc == 0, err
    assert "verified" in err and "4 items" in err
    lines = out.splitlines()
    assert len(lines) == 4 and "Hello 👋" in lines[0] and "Triage" in lines[3] and "Hi!" in lines[3]

    rc, out, err = await convlog(env.tmp, "replay", "audit-1", "--format", "jsonl", "--nats-url", url)
    assert rc == 0, err
    assert [msgspec.json.decode(line, type=Envelope) for line in out.splitlines()] == log
    export = env.tmp / "audit-1.jsonl"
    export.write_text(out)
    rc, _, err = await convlog(env.tmp, "replay", "audit-1", "--file", str(export), "--verify", "--quiet")
    assert rc == 0 and "verified" in err, err

    rc, out, err = await convlog(env.tmp, "sessions", "--nats-url", url)
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("audit-1", "4"), ("audit-2", "1")]

    # not_found: a session with no items, and a database that does not exist.
    rc, _, err = await convlog(env.tmp, "replay", "never-seen", "--nats-url", url)
    assert rc == 2 and "not_found" in err, err
    rc, _, err = await convlog(env.tmp, "replay", "audit-1", "--db", str(env.tmp / "missing.db"))
    assert rc == 2 and "not_found" in err, err
    rc, _, err = await convlog(env.tmp, "replay", "a.b", "--nats-url", url)
    assert rc == 2 and "invalid_session_id" in err, err

    if env.settings.store != "sqlite":
        return
    # --db reads the file with no service running.
    await env.service.shutdown()
    rc, out, err = await convlog(env.tmp, "replay", "audit-1", "--db", str(env.db), "--verify",
                                 "--format", "jsonl")
    assert rc == 0 and "verified" in err, err
    assert [msgspec.json.decode(line, type=Envelope) for line in out.splitlines()] == log


# -- SIGTERM under load --------------------------------------------------------------


@pytest.mark.parametrize("mode", SEAMS, ids=SEAM_IDS)
async def test_sigterm_drains_and_exits_zero_with_no_acked_item_lost(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    db = tmp_path / "log.db"
    proc = python_module(
        "services.cli.main", "log", "--nats-url", nats_server.url, "--db", str(db),
        log_dir=tmp_path, env={**cli_env(tmp_path), "CONVLOG_NATS_SEAM": mode},
    )
    acked: dict[str, tuple[str, int]] = {}
    stop = asyncio.Event()
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1)
    client = LogClient(nc, timeout=1.0, deadline=2.0)

    async def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            iid = f"w{w}-{n}"
            try:
                rep = await client.append(f"load-{w % 4}", [user(iid, item_id=iid)])
            except ConvlogError:
                return  # the service is gone: the outcome of this last one is unknown
            acked[iid] = (rep.session_id, rep.items[0].item_order)
            n += 1

    with proc:
        await asyncio.to_thread(proc.wait_for_line, r"log service ready", 15)
        writers = [asyncio.create_task(writer(w)) for w in range(16)]
        try:
            async def loaded() -> None:
                assert len(acked) >= 300, len(acked)
            await assert_eventually(loaded, timeout=30)
            os.kill(proc.pid, signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0, proc.output()
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*writers), 15)
            await nc.close()
    assert "log service stopped" in proc.output()
    assert f"nats-py seam: {'public' if mode == 'public' else 'fast'}" in proc.output()

    # Every acknowledged append is in the file at its acknowledged order.
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT session_id, item_order, envelope FROM items ORDER BY position").fetchall()
    finally:
        conn.close()
    stored = {msgspec.json.decode(e, type=Envelope).item_id: (s, o) for s, o, e in rows}
    assert len(acked) >= 300
    missing = {iid: at for iid, at in acked.items() if stored.get(iid) != at}
    assert not missing
    for s in range(4):
        sid = f"load-{s}"
        envs = [msgspec.json.decode(e, type=Envelope) for ss, _, e in rows if ss == sid]
        assert verify(envs, session_id=sid) is None

    # Draining also published every committed item.
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.state.messages == len(rows)
    finally:
        await nc.close()
