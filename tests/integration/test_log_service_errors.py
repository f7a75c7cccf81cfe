"""The log service's errors over a real nats-server: every error code with a clear
message and nothing written, the size limits against the max payload, a custom
prefix, and nobody serving.

Every test on the ``env`` fixture (:mod:`tests.support.logenv`) runs on both stores.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.micro.service import ServiceStats, ServiceVerb, control_subject

from services.log.handlers import ack_size_bound
from services.log.service import SERVICE_NAME, LogService
from shared.client import LogClient
from shared.codec import MAX_DEPTH
from shared.config import load_settings
from shared.errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    BadRequestError,
    ConflictError,
    InvalidSessionIdError,
    TooLargeError,
    UnavailableError,
)
from shared.messages import MAX_APPEND_ITEMS
from tests.support.eventually import assert_eventually
from tests.support.logenv import (
    MAX_ITEM_BYTES,
    MAX_PAYLOAD,
    Env,
    both_seams,
    raw_log,
    settled_state,
    user,
    wire,
)
from tests.support.logsvc import LogServiceProc
from tests.support.natsd import NatsServer

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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
async def test_log_client_refuses_a_non_finite_number_instead_of_writing_null(env: Env, value: float) -> None:
    """README: non-finite numbers are refused at input.  The service refuses
    them on the wire, but LogClient's encoder (msgspec) writes NaN and Infinity
    as ``null``: an unsigned append of ``{"score": nan}`` was committed as
    ``{"score": null}``, silently (a signed one was refused while signing)."""
    await env.client.append("v", [user("one")])
    with pytest.raises(BadRequestError) as exc:
        await env.client.append("v", [user("two"), {"agent": "a", "data": {"score": [1, value]}}])
    assert "$.items[1].data.score[1]" in exc.value.message
    # Inside a tuple, a set or a dict subclass too (all sent as JSON arrays and
    # objects): the check walked plain dicts and lists only, and sent them as null.
    for holder in ((1, value), {value}, OrderedDict(a=value)):
        with pytest.raises(BadRequestError, match=r"\$\.items\[0\]\.data\.score"):
            await env.client.append("v", [{"agent": "a", "data": {"score": holder}}])
    assert [e.item_order for e in await raw_log(env, "v")] == [1]


async def test_a_request_over_the_max_payload_is_too_large(env: Env) -> None:
    await env.client.append("v", [user("one")])
    items = [user("y" * 3000) for _ in range(30)]  # each item is fine; together ~90 KiB
    with pytest.raises(TooLargeError) as exc:
        await env.client.append("v", items)
    assert str(MAX_PAYLOAD) in exc.value.message and exc.value.extra["limit"] == MAX_PAYLOAD
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


# -- found in a review -----------------------------------------------------------


async def test_deeply_nested_data_is_bad_request_not_unavailable(env: Env) -> None:
    """msgspec raises RecursionError (not DecodeError/ValidationError) past ~1000 levels:
    shared.codec.decode lets it out, and the service answers ``unavailable`` (503), which
    every requester retries until its deadline, for input that can never succeed."""
    await env.client.append("v", [user("one")])
    before = await settled_state(env)
    depth = 2000
    body = b'{"items":[{"agent":"a","data":{"x":' + b"[" * depth + b"]" * depth + b"}}]}"
    headers, reply = await wire(env.nc, "convlog.append.v", body)
    assert reply["error"]["code"] == "bad_request", reply
    assert headers[ERROR_CODE_HEADER] == "400"
    assert await settled_state(env) == before


@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_data_nested_past_the_limit_is_refused_and_the_service_lives(
    nats_server: NatsServer, tmp_path: Path, store: str
) -> None:
    """Nesting had no limit of its own, only msgspec's recursion limit, counted from
    wherever in its stack a process met the data.  A ``convlog log`` process (a
    shallow stack) took data nested 950-970 levels deep, which every read of the
    session then failed on in a client deeper in its stack ("invalid ReadReply:
    JSON nested too deeply"), and one append at 975 levels made its commit raise
    RecursionError: the committer stopped and the service exited (its requester
    retried into the restarted one).  Now data nests at most MAX_DEPTH (100)
    levels, checked before anything is written."""
    svc = LogServiceProc(nats_server.url, tmp_path / "log.db", log_dir=tmp_path, store=store).start()
    client = await LogClient.connect(nats_server.url, name="nesting")
    try:
        await client.append("v", [user("one")])
        for depth in (MAX_DEPTH + 1, 960, 975):
            body = (b'{"items":[{"agent":"a","data":{"x":' + b'{"a":' * (depth - 1) + b"1.5"
                    + b"}" * (depth - 1) + b"}}]}")  # data is level 1: `depth` levels in all
            headers, reply = await wire(client.nc, "convlog.append.v", body)
            assert reply["error"]["code"] == "bad_request", (depth, reply)
            assert reply["error"]["message"] in (
                f"$.items[0].data nests objects and arrays more than {MAX_DEPTH} levels deep",
                "invalid AppendRequest: JSON nested too deeply",  # msgspec's own limit
            ), reply
            assert headers[ERROR_CODE_HEADER] == "400"
        # The limit itself is taken, and read back by this (deeper) process.
        at_limit: object = 1.5
        for _ in range(MAX_DEPTH - 1):
            at_limit = {"a": at_limit}
        await client.append("v", [{"agent": "a", "data": {"x": at_limit}}])
        with pytest.raises(BadRequestError, match="more than 100 levels deep"):  # refused before sending
            await client.append("v", [{"agent": "a", "data": {"x": {"a": at_limit}}}])
        log = await client.items("v", raw=True)
        assert [e.item_order for e in log] == [1, 2] and log[1].data == {"x": at_limit}
        assert svc.proc is not None and svc.proc.running, svc.output()
    finally:
        await client.close()
        svc.stop()


@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_a_handoff_output_string_nesting_deep_json_does_not_stop_the_service(
    nats_server: NatsServer, tmp_path: Path, store: str
) -> None:
    """A string may hold JSON of any depth (MAX_DEPTH bounds the data, not what its
    strings spell).  A function_call_output whose output looked like a handoff
    (``{"assistant": ...}``) nesting 5,000 arrays: the log service committed it,
    then its commit listener parsed the output for the handoff target, json.loads
    raised RecursionError, and the committer stopped the service.  Now such an
    output is no handoff, and the service goes on."""
    svc = LogServiceProc(nats_server.url, tmp_path / "log.db", log_dir=tmp_path, store=store).start()
    client = await LogClient.connect(nats_server.url, name="handoff-nesting")
    try:
        await client.send("h", "hello")
        output = '{"assistant":' + "[" * 5000 + "]" * 5000 + "}"
        ack = await client.append("h", [{"agent": "Triage", "data": {
            "type": "function_call_output", "call_id": "c1", "output": output}}])
        ack2 = await client.append("h", [user("still there?")])
        assert (ack.last_order, ack2.last_order) == (2, 3)
        assert svc.proc is not None and svc.proc.running, svc.output()
        assert "RecursionError" not in svc.output()
    finally:
        await client.close()
        svc.stop()


async def test_item_data_over_the_limit_is_refused_whatever_the_number_spelling(env: Env) -> None:
    """Handlers._prepare measures an item's data only when the *body* is over
    max_item_bytes, assuming the re-encoded data is never larger than the body.
    msgspec re-encodes ``1e15`` (4 bytes) as ``1000000000000000.0`` (18 bytes), so a
    body under the limit stores an item ~3.8x over it."""
    n = (MAX_ITEM_BYTES - 100) // 5
    body = ('{"items":[{"agent":"a","data":{"x":[' + ",".join(["1e15"] * n) + "]}}]}").encode()
    assert len(body) <= MAX_ITEM_BYTES
    headers, reply = await wire(env.nc, "convlog.append.big", body)
    if "error" not in reply:
        stored = await raw_log(env, "big")
        size = len(json.dumps(stored[0].data, separators=(",", ":")))
        raise AssertionError(f"accepted: the stored item's data is {size} bytes, limit {MAX_ITEM_BYTES}")
    assert reply["error"]["code"] == "too_large", reply


async def test_a_tail_over_the_reply_limit_names_its_limit(env: Env) -> None:
    """README: ``too_large`` covers every size limit and names it (the body's ``limit``).
    Handlers.read's tail refusal carries no ``limit``."""
    for i in range(20):
        await env.client.append("t", [user(f"{i}" + "y" * 3900)])
    headers, reply = await wire(env.nc, "convlog.read.t", {"tail": 20})
    assert reply["error"]["code"] == "too_large", reply
    assert isinstance(reply["error"].get("limit"), int), reply


async def test_a_tail_over_the_reply_limit_is_refused_without_loading_the_whole_tail(env: Env) -> None:
    """A ``tail`` read is bounded by the reply limit, not by the session: the store
    stops reading once the items pass it.  Before, both stores loaded all ``n``
    items (up to 100,000 of up to the item limit each) and only then measured
    them, so one read could make the log service hold gigabytes to answer
    ``too_large``."""
    n = 1000  # ~4 MB of items, 64 times the 64 KiB reply limit
    for start in range(0, n, 10):
        await env.client.append("huge", [user(f"{i}" + "y" * 3900) for i in range(start, start + 10)])
    await settled_state(env)
    tracemalloc.start()
    try:
        headers, reply = await wire(env.nc, "convlog.read.huge", {"tail": n, "raw": True})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply["error"]["code"] == "too_large", reply
    assert peak < 1_000_000, f"answering the tail held {peak} bytes (the items are {n * 3950})"
    # A tail that fits is still served whole.
    assert [e.item_order for e in await env.client.tail("huge", 5)] == list(range(n - 4, n + 1))


async def test_a_forward_page_reads_little_more_than_it_sends(env: Env) -> None:
    """A forward page is cut at the reply limit, and the store reads little past it:
    SQLite fetched 512 rows before looking at their sizes, 128 MB of 256 KiB items
    for one 1 MiB page (here ~2 MB of items for one 64 KiB page)."""
    for start in range(0, 600, 10):
        await env.client.append("wide", [user(f"{i}" + "y" * 3900) for i in range(start, start + 10)])
    await settled_state(env)
    tracemalloc.start()
    try:
        headers, reply = await wire(env.nc, "convlog.read.wide", {"after": 0})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply["more"] and [e["item_order"] for e in reply["items"]][:2] == [1, 2], reply.get("error")
    assert peak < 1_000_000, f"reading one {len(json.dumps(reply))}-byte page held {peak} bytes"


@both_seams
async def test_a_reply_subject_on_the_services_own_subjects_is_not_answered(env: Env) -> None:
    # The reply subject is the requester's to choose; the service may publish to the
    # items stream's subjects, which the requester may not: it must not answer there.
    await env.client.append("r", [user("one")])
    before = await settled_state(env)
    forged: list[str] = []

    async def seen(msg: nats.aio.msg.Msg) -> None:
        forged.append(msg.subject)

    sub = await env.nc.subscribe("convlog.items.forged", cb=seen)
    try:
        for subject, body in (("convlog.read.r", b"{}"), ("convlog.sessions", b"{}"),
                              ("convlog.append.r", json.dumps({"items": [user("two", item_id="x-2")]}).encode())):
            await env.nc.publish(subject, body, reply="convlog.items.forged")
        async def appended() -> None:
            assert await env.client.last_order("r") == 2
        await assert_eventually(appended, timeout=5)
        await wire(env.nc, "convlog.read.r", {})  # served after the read and sessions before it
        await env.nc.flush()
        await asyncio.sleep(0.2)
        assert forged == []
    finally:
        await sub.unsubscribe()
    sessions, published = await settled_state(env)
    assert (sessions, published) == ([("r", 2)], before[1] + 1)


async def _raw_request(env: Env, subject: bytes, body: bytes) -> bytes:
    """Publish ``subject`` as raw protocol bytes (nats-py sends only UTF-8 subjects)
    and return the reply frame (b"" if none came within 5 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\nSUB _R.raw 1\r\n'
                     b"PUB %s _R.raw %d\r\n%s\r\n" % (subject, len(body), body))
        await writer.drain()
        async with asyncio.timeout(5):
            while line := await reader.readline():
                if line.startswith((b"MSG ", b"HMSG ")):
                    return await reader.readexactly(int(line.split()[-1]) + 2)
    except TimeoutError:
        pass
    finally:
        writer.close()
    return b""


@pytest.mark.parametrize(("subject", "body"), [
    (b"convlog.read.\xff", b"{}"),
    (b"convlog.append.v\xc3", GOOD),
    (b"convlog.in.\xed\xa0\x80", b'{"content": "x"}'),
], ids=["read", "append", "in"])
async def test_a_subject_that_is_not_utf8_is_refused_and_the_service_keeps_serving(
    env: Env, subject: bytes, body: bytes
) -> None:
    """nats-server passes any bytes but whitespace in a subject; nats-py's decoding
    of one raised in the service connection's read loop, which stopped for good:
    no reply, and the log service never answered anything again."""
    await env.client.append("v", [user("one")])
    reply = await _raw_request(env, subject, body)
    assert b"invalid_session_id" in reply, reply
    assert (await env.client.append("v", [user("two")])).last_order == 2
    assert [e.item_order for e in await raw_log(env, "v")] == [1, 2]
