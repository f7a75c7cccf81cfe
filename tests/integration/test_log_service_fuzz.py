"""Fuzzing the log service's request subjects over raw NATS (not LogClient, which
validates first), on both stores: malformed and adversarial bodies and headers on
``append``, ``read``, ``sessions`` and ``in``.

Every request gets exactly one reply, a success or an error with a documented code
(never the ``unavailable`` of an internal error), the service keeps serving, and a
refused request wrote nothing: the sessions, their last orders and head hashes are
as before, and the items stream holds exactly the committed items.

Bounded: hypothesis derandomized (a fixed seed), 250 cases per store, with tracing
off and on.  ``CONVLOG_FUZZ_CASES=<n>`` runs more; ``CONVLOG_FUZZ_RANDOM=1`` a new seed.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import tracing
from shared.errors import ERROR_CODE_HEADER, ERROR_HEADER
from shared.messages import AppendReply, ReadReply, SessionsReply
from tests.support.logenv import MAX_PAYLOAD, Env, settled_state, user

CASES = int(os.environ.get("CONVLOG_FUZZ_CASES", "250"))
DOCUMENTED = {
    "bad_request": "400", "invalid_session_id": "400", "too_large": "413",
    "conflict": "409", "not_found": "404", "forbidden": "403",
}


# -- JSON with raw tokens and duplicate keys ------------------------------------------

@dataclass(frozen=True)
class Raw:
    """A token written as is: ``NaN``, ``1e400``, ``"\\ud800"``, invalid UTF-8."""

    text: bytes


@dataclass(frozen=True)
class Obj:
    """An object as key/value pairs, so a key can repeat."""

    pairs: tuple[tuple[Any, Any], ...]


def emit(v: Any) -> bytes:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Obj):
        return b"{" + b",".join(emit(k) + b":" + emit(x) for k, x in v.pairs) + b"}"
    if isinstance(v, dict):
        return emit(Obj(tuple(v.items())))
    if isinstance(v, list):
        return b"[" + b",".join(emit(x) for x in v) + b"]"
    return json.dumps(v).encode()


RAW_TOKENS = [
    b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400", b"-1e400", b"1e-400", b"9007199254740992",
    b"-9007199254740993", b"1" * 400, b"0.1e99999999999", b"01", b"1.", b".5", b"+1", b"-0", b"1E+2",
    b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'"\xff\xfe"', b'"\xc3"',
    b'"\xed\xa0\x80"', b'"a\nb"', b'"\\x41"', b"tru", b"nul", b"[", b"{", b"]", b'"',
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(RAW_TOKENS).map(Raw),
)


def deep(levels: int, inner: Any = 1) -> Raw:
    return Raw(b"[" * levels + emit(inner) + b"]" * levels)


def deep_obj(levels: int) -> Raw:
    return Raw(b'{"a":' * levels + b"1" + b"}" * levels)


ODD = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=5), SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=5), SCALARS, max_size=2).map(lambda d: Obj(tuple(d.items()) * 2)),
    st.sampled_from([99, 100, 101, 200, 999, 1000, 1001, 5000, 100_000]).map(deep),
    st.sampled_from([99, 100, 101, 1000, 5000]).map(deep_obj),
)

AGENTS = st.one_of(st.sampled_from(["user", "a", "system", "L1Billing", "\u00e9t\u00e9", "x" * 128, "x" * 129,
                                    "", "a\x00b", "\x7f", "tab\there"]), ODD)
ITEM_IDS = st.one_of(st.none(), st.sampled_from(["i1", "i2", "noturn:x", "a b", "x" * 201, "", "é"]), ODD)
KINDS = st.one_of(st.sampled_from(["item", "retract", "clear", "edit"]), ODD)
DATA = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(st.text(max_size=30), ODD)}),
    st.fixed_dictionaries({"target": st.one_of(st.integers(min_value=-2, max_value=12), ODD)}),
    st.dictionaries(st.text(max_size=8), ODD, max_size=4),
    ODD,
)


@st.composite
def append_item(draw: st.DrawFn) -> Any:
    pairs: list[tuple[Any, Any]] = [("agent", draw(AGENTS)), ("data", draw(DATA))]
    if draw(st.booleans()):
        pairs.append(("kind", draw(KINDS)))
    if draw(st.booleans()):
        pairs.append(("item_id", draw(ITEM_IDS)))
    if draw(st.integers(0, 5)) == 0:
        pairs.append((draw(st.one_of(st.sampled_from(["sig", "key_id", "agent", "data"]), st.text(max_size=6))),
                      draw(ODD)))
    draw(st.randoms()).shuffle(pairs)
    return Obj(tuple(pairs))


@st.composite
def append_body(draw: st.DrawFn) -> Any:
    pairs: list[tuple[Any, Any]] = [("items", draw(st.one_of(st.lists(append_item(), max_size=4), ODD)))]
    if draw(st.booleans()):
        pairs.append(("expected_last", draw(st.one_of(st.integers(-2, 12), ODD))))
    if draw(st.integers(0, 5)) == 0:
        pairs.append((draw(st.sampled_from(["items", "expected_last", "expectd_last"])), draw(ODD)))
    return Obj(tuple(pairs))


def _fields(spec: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    @st.composite
    def body(draw: st.DrawFn) -> Any:
        names = draw(st.lists(st.one_of(st.sampled_from([*spec, "bogus"]), st.text(max_size=6)),
                              max_size=len(spec) + 1))
        return Obj(tuple((n, draw(spec.get(n, ODD))) for n in names))
    return body()


READ_BODY = _fields({
    "after": st.one_of(st.integers(-1, 20), ODD), "limit": st.one_of(st.integers(-1, 100_001), ODD),
    "tail": st.one_of(st.integers(-1, 100_001), ODD), "raw": st.one_of(st.booleans(), ODD),
    "head": st.one_of(st.booleans(), ODD),
})
SESSIONS_BODY = _fields({
    "after": st.one_of(st.sampled_from(["v", "w", "", "a.b", "x" * 129]), ODD),
    "limit": st.one_of(st.integers(-1, 100_001), ODD),
})
IN_BODY = _fields({
    "content": st.one_of(st.text(max_size=30), ODD), "item_id": ITEM_IDS,
    "to": AGENTS, "sig": ODD, "key_id": ODD, "to_sig": ODD,
})
BODIES = {"append": append_body(), "read": READ_BODY, "sessions": SESSIONS_BODY, "in": IN_BODY}

SIDS = st.one_of(
    st.sampled_from(["v", "w", "fuzz_new", "a@b", "\u00e9", "x" * 128, "x" * 129, "v.x", "v.x.y", "-", "_"]),
    st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True),
)


@st.composite
def body_bytes(draw: st.DrawFn, endpoint: str) -> bytes:
    how = draw(st.sampled_from(["tree", "tree", "tree", "truncated", "spliced", "bytes", "empty", "padded"]))
    if how == "bytes":
        return draw(st.binary(max_size=64))
    if how == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n\t", b"null", b"{}", b"[]", b'""', b"0", b"\xef\xbb\xbf{}"]))
    data = emit(draw(BODIES[endpoint]))
    if how == "truncated" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "spliced":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from([b"\xff", b"\x00", b",", b"}", b'"', b"\xc3", b" ,"])) + data[at:]
    if how == "padded":  # just under, at, or just over the server's max payload
        size = MAX_PAYLOAD - draw(st.sampled_from([0, 1, 100, 200, 2000, 5000]))
        return data + b" " * max(0, size - len(data))
    return data


HEADERS = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["Nats-Msg-Id", "traceparent", "tracestate", "expected_last",
                         "Nats-Expected-Last-Sequence", "Nats-Expected-Last-Subject-Sequence", "X-Odd"]),
        st.one_of(st.sampled_from(["", "abc", "-1", "1", "00-zz-zz-01", "v:1", "9" * 40]),
                  st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=20)),
        max_size=3,
    ),
)


@st.composite
def request(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str] | None]:
    endpoint = draw(st.sampled_from(["append", "append", "read", "sessions", "in"]))
    subject = "convlog.sessions" if endpoint == "sessions" else f"convlog.{endpoint}.{draw(SIDS)}"
    return subject, draw(body_bytes(endpoint)), draw(HEADERS)


# -- the property ---------------------------------------------------------------------

async def snapshot(env: Env) -> list[tuple[str, int, str]]:
    """Every session's last order and head hash, straight from the store."""
    out = []
    infos, _ = await env.service.store.sessions(after=None, limit=100_000)
    for info in infos:
        page = await env.service.store.tail(info.session_id, 1, visible=False, max_bytes=MAX_PAYLOAD)
        head = msgspec.json.decode(page.items[-1])["hash"] if page.items else ""
        out.append((info.session_id, info.last_order, head))
    return out


async def check_success(env: Env, subject: str, body: bytes, data: bytes,
                        before: list[tuple[str, int, str]]) -> None:
    """A success reply is the right one, and only an append or a user message wrote."""
    after = await snapshot(env)
    last = {s: o for s, o, _ in before}
    endpoint, _, sid = subject.removeprefix("convlog.").partition(".")
    if endpoint in ("append", "in"):
        ack = msgspec.json.decode(data, type=AppendReply)
        assert ack.session_id == sid, (subject, body, data)
        new = [i for i in ack.items if not i.duplicate]
        assert [i.item_order for i in new] == list(range(last.get(sid, 0) + 1, last.get(sid, 0) + 1 + len(new)))
        now = {s: o for s, o, _ in after}
        assert now.get(sid, 0) == last.get(sid, 0) + len(new), (subject, body, data)
        assert [x for x in after if x[0] != sid] == [x for x in before if x[0] != sid]
        return
    assert after == before, (subject, body, data)
    if endpoint == "read":
        page = msgspec.json.decode(data, type=ReadReply)
        req = json.loads(body) if body.strip() else {}
        assert page.session_id == sid and page.last_order == last.get(sid, 0), (subject, body, data)
        orders = [e.item_order for e in page.items]
        assert orders == sorted(orders) and all(o > (req.get("after") or 0) for o in orders), (body, orders)
        assert len(orders) <= (req.get("tail") if req.get("tail") is not None else req.get("limit") or 10_000)
        assert all(e.session_id == sid for e in page.items)
        if not req.get("raw"):
            assert all(e.kind == "item" for e in page.items), (body, data)
    else:
        reply = msgspec.json.decode(data, type=SessionsReply)
        req = json.loads(body) if body.strip() else {}
        ids = [i.session_id for i in reply.sessions]
        assert ids == sorted(ids) and all(i > (req.get("after") or "") for i in ids), (body, ids)
        assert [(i.session_id, i.last_order) for i in reply.sessions] == [
            (s, o) for s, o, _ in before if s > (req.get("after") or "")][: len(ids)]


@pytest.fixture(params=["untraced", "traced"])
def traced(request: pytest.FixtureRequest) -> Iterator[str]:
    """Tracing on or off when the service starts (on: spans around every request)."""
    if request.param == "untraced":
        yield request.param
        return
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    previous = tracing.use_provider(provider)
    try:
        yield request.param
    finally:
        tracing.use_provider(previous)
        provider.shutdown()


@pytest.mark.timeout(120)
async def test_fuzzed_requests_get_one_documented_reply_and_a_refusal_writes_nothing(traced: str, env: Env) -> None:
    assert (env.service.traces is not None) == (traced == "traced")
    await env.client.append("v", [user("one"), user("two")])
    replies: list[Any] = []
    inbox = env.nc.new_inbox()
    sub = await env.nc.subscribe(inbox, cb=None)

    async def one(req: tuple[str, bytes, dict[str, str] | None]) -> None:
        subject, body, headers = req
        before = await snapshot(env)
        if len(body) + sum(len(k) + len(v) + 4 for k, v in (headers or {}).items()) + 32 > MAX_PAYLOAD:
            return  # the client refuses to send it; the server would close the connection
        await env.nc.publish(subject, body, reply=inbox, headers=headers)
        msg = await sub.next_msg(timeout=5)
        got = dict(msg.headers or {})
        code_status = got.get(ERROR_CODE_HEADER)
        if code_status is None:
            assert not msg.data.startswith(b'{"error"'), (req, msg.data[:300])
            await check_success(env, subject, body, msg.data, before)
        else:
            err = json.loads(msg.data)["error"]
            assert err["code"] in DOCUMENTED, (req, err)
            assert DOCUMENTED[err["code"]] == code_status, (req, got)
            assert got[ERROR_HEADER].startswith(f"{err['code']}: "), (req, got)
            assert await snapshot(env) == before, (req, err)
        replies.append(code_status)
        # Exactly one reply: none other waits.
        with pytest.raises(TimeoutError):
            await sub.next_msg(timeout=0.001)

    loop = asyncio.get_running_loop()

    # Hypothesis runs sync tests: it runs in a thread, each case on this loop.
    @settings(max_examples=CASES, derandomize=not os.environ.get("CONVLOG_FUZZ_RANDOM"), database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(request())
    def case(req: tuple[str, bytes, dict[str, str] | None]) -> None:
        asyncio.run_coroutine_threadsafe(one(req), loop).result(timeout=30)

    await asyncio.to_thread(case)
    assert len(replies) >= CASES // 2
    # The service still serves, and the items stream holds exactly the committed items.
    last = await env.client.last_order("v")
    assert (await env.client.append("v", [user("after")])).last_order == last + 1
    await settled_state(env)
