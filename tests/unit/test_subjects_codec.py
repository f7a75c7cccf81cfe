"""Session ids, subjects, strict wire decoding, numbers, errors on the wire, config."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from shared.codec import MAX_DEPTH, MAX_SAFE_INT, check_json, decode, encode, json_ok, numbers_ok
from shared.config import DEFAULT_NATS_URL, ConfigError, Settings, load_settings
from shared.errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    BadRequestError,
    ConflictError,
    ConvlogError,
    InvalidSessionIdError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
    from_wire,
    to_wire,
)
from shared.messages import (
    AppendReply,
    AppendRequest,
    Envelope,
    ErrorBody,
    KeyId,
    ReadReply,
    ReadRequest,
    SessionsReply,
    SessionsRequest,
    Sig,
    UserMessage,
)
from shared.subjects import Subjects, validate_session_id

# -- session ids and subjects ------------------------------------------------------

BAD_SESSION_IDS = [
    "a.b", "*", ">", "a*", "a>", "a b", " ", "", "x" * 129, "a\n", "a\r\n", "\na", "é",
    "a/b", "a@b", "a\tb", "a\x00", "ａ",
]


@pytest.mark.parametrize("sid", BAD_SESSION_IDS)
def test_invalid_session_ids_are_refused(sid: str) -> None:
    with pytest.raises(InvalidSessionIdError) as exc:
        validate_session_id(sid)
    assert exc.value.code == "invalid_session_id"
    assert "[A-Za-z0-9_-]{1,128}" in exc.value.message
    # ... and never reach a subject.
    subjects = Subjects()
    for build in (subjects.inbound, subjects.append, subjects.read, subjects.items):
        with pytest.raises(InvalidSessionIdError):
            build(sid)


@pytest.mark.parametrize("sid", ["a", "x" * 128, "Support_Session-42", "0", "-", "_"])
def test_valid_session_ids(sid: str) -> None:
    assert validate_session_id(sid) == sid
    assert Subjects().append(sid) == f"convlog.append.{sid}"


def test_non_string_session_ids_are_refused() -> None:
    for value in (None, 42, b"abc", ["a"]):
        with pytest.raises(InvalidSessionIdError):
            validate_session_id(value)


def test_subjects_with_the_default_prefix() -> None:
    s = Subjects()
    assert (s.inbound("s1"), s.append("s1"), s.read("s1"), s.items("s1")) == (
        "convlog.in.s1", "convlog.append.s1", "convlog.read.s1", "convlog.items.s1",
    )
    assert s.sessions == "convlog.sessions"
    assert (s.inbound_all, s.append_all, s.read_all, s.items_all) == (
        "convlog.in.>", "convlog.append.>", "convlog.read.>", "convlog.items.>",
    )
    assert s.stream_name == "CONVLOG_ITEMS"


def test_subjects_with_a_custom_prefix() -> None:
    s = Subjects("acme.prod-1")
    assert s.append("s1") == "acme.prod-1.append.s1"
    assert s.items("s1") == "acme.prod-1.items.s1"
    assert s.sessions == "acme.prod-1.sessions"
    assert s.items_all == "acme.prod-1.items.>"
    assert s.stream_name == "ACME_PROD-1_ITEMS"
    assert s.session_of("acme.prod-1.append.s1") == "s1"
    for subject in ("acme.prod-1.append.a.b", "acme.prod-1.append", "acme.prod-1.append.a@b"):
        with pytest.raises(InvalidSessionIdError):
            s.session_of(subject)


@pytest.mark.parametrize("prefix", ["", "a b", "a..b", ".a", "a.", "a.*", "a.>", "con\nvlog", "convlog\n"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(BadRequestError):
        Subjects(prefix)


# -- strict decoding -----------------------------------------------------------


def test_unknown_field_is_refused_and_named() -> None:
    with pytest.raises(BadRequestError) as exc:
        decode(b'{"items":[{"agent":"a","data":{"x":1}}],"expectd_last":3}', AppendRequest)
    assert "expectd_last" in exc.value.message
    assert exc.value.code == "bad_request"
    with pytest.raises(BadRequestError, match="limt"):
        decode(b'{"limt": 5}', ReadRequest)
    with pytest.raises(BadRequestError, match="too"):
        decode(b'{"content": "hi", "too": "L1Billing"}', UserMessage)
    with pytest.raises(BadRequestError, match="item_od"):
        decode(b'{"items":[{"agent":"a","data":{},"item_od":"x"}]}', AppendRequest)


class _PatternItem(msgspec.Struct, kw_only=True):
    agent: str
    sig: Sig | None = None
    key_id: KeyId | None = None


class _PatternRequest(msgspec.Struct, kw_only=True):
    items: list[_PatternItem]


_GOOD_SIG = "A" * 86
_GOOD_KEY = "U" + "A" * 55


@pytest.mark.parametrize(
    ("sig", "key_id"),
    [
        ("x", None), (_GOOD_SIG + ".", None), (_GOOD_SIG + "." + "A" * 43, None), ("A" * 85, _GOOD_KEY),
        (_GOOD_SIG + "\n", None), ("+" * 86, None), (_GOOD_SIG + "." + "A" * 705, None),
        (None, "x"), (None, "N" + "A" * 55), (None, _GOOD_KEY + "\n"), (_GOOD_SIG, "U" + "a" * 55),
    ],
)
def test_a_malformed_sig_or_key_id_is_refused_as_msgspec_words_it(sig: str | None, key_id: str | None) -> None:
    """sig and key_id are checked after decoding (shared.messages.signature_shape_error),
    with the patterns of Sig and KeyId: the same refusal, word for word."""
    fields = {"agent": "a", **({"sig": sig} if sig is not None else {}),
              **({"key_id": key_id} if key_id is not None else {})}
    body = msgspec.json.encode({"items": [{"agent": "a"}, fields]})
    with pytest.raises(msgspec.ValidationError) as ref:
        msgspec.json.decode(body, type=_PatternRequest)
    with pytest.raises(BadRequestError) as exc:
        decode(body, AppendRequest)
    assert exc.value.code == "bad_request"
    assert exc.value.message == f"invalid AppendRequest: {ref.value}"
    for _ in range(2):  # a key id that passed once is remembered; a bad one never is
        with pytest.raises(BadRequestError):
            decode(body, AppendRequest)


def test_well_formed_signature_fields_decode() -> None:
    for sig in (_GOOD_SIG, _GOOD_SIG + "." + "A-_z" * 11, _GOOD_SIG + "." + "A" * 704):
        req = decode(msgspec.json.encode({"items": [{"agent": "a", "sig": sig, "key_id": _GOOD_KEY}]}), AppendRequest)
        assert req.items[0].sig == sig and req.items[0].key_id == _GOOD_KEY


@pytest.mark.parametrize(
    ("body", "type_", "fragment"),
    [
        (b'{"items": [', AppendRequest, "malformed JSON"),
        (b"not json", ReadRequest, "malformed JSON"),
        (b'{"items": "x"}', AppendRequest, "$.items"),
        (b'{"items": []}', AppendRequest, "$.items"),
        (b'{"items": [{"data": {}}]}', AppendRequest, "agent"),
        (b'{"items": [{"agent": "a", "kind": "delete"}]}', AppendRequest, "$.items[0].kind"),
        (b'{"items": [{"agent": "a"}], "expected_last": -1}', AppendRequest, "expected_last"),
        (b'{"items": [{"agent": "a"}], "expected_last": "3"}', AppendRequest, "expected_last"),
        (b'{"after": -1}', ReadRequest, "after"),
        (b'{"limit": 0}', ReadRequest, "limit"),
        (b'{"raw": "yes"}', ReadRequest, "raw"),
        (b"[1, 2]", SessionsRequest, "object"),
        (b'{"after": "a.b"}', SessionsRequest, "after"),
        (b'{"content": 5}', UserMessage, "content"),
        (b"{}", UserMessage, "content"),
    ],
)
def test_wrong_shapes_are_bad_requests(body: bytes, type_: type, fragment: str) -> None:
    with pytest.raises(BadRequestError) as exc:
        decode(body, type_)
    assert fragment in exc.value.message


def test_empty_bodies() -> None:
    assert decode(b"", ReadRequest) == ReadRequest()
    assert decode(b"  ", SessionsRequest) == SessionsRequest()
    with pytest.raises(BadRequestError):
        decode(b"", AppendRequest, empty_ok=False)


# The request/reply shapes of DESIGN.md, written out as bodies.
DESIGN_REQUESTS: list[tuple[type, bytes]] = [
    (UserMessage, b'{"content": "Hi, I was charged twice"}'),
    (UserMessage, b'{"content": "Hi", "item_id": "u-1", "to": "Triage"}'),
    (AppendRequest, b"""{"items": [
        {"item_id": "t1-0", "agent": "Triage", "kind": "item",
         "data": {"type": "function_call", "call_id": "c1", "name": "transfer_to_billing", "arguments": "{}"}},
        {"agent": "Triage", "data": {"type": "function_call_output", "call_id": "c1",
                                     "output": "{\\"assistant\\": \\"L1Billing\\"}"}},
        {"agent": "system", "kind": "retract", "data": {"target": 2}},
        {"agent": "system", "kind": "clear", "data": {}}
     ], "expected_last": 7}"""),
    (AppendRequest, b'{"items": [{"agent": "user", "data": {"role": "user", "content": "hi"}}]}'),
    (ReadRequest, b'{"after": 10, "limit": 100}'),
    (ReadRequest, b'{"tail": 50}'),
    (ReadRequest, b'{"raw": true}'),
    (ReadRequest, b"{}"),
    (SessionsRequest, b'{"after": "support-41", "limit": 100}'),
    (SessionsRequest, b"{}"),
]

ENVELOPE = (
    b'{"session_id": "support-42", "item_order": 3, "item_id": "0f3c9a", "agent": "Triage",'
    b' "kind": "item", "data": {"type": "message", "role": "assistant",'
    b' "content": [{"type": "output_text", "text": "Let me check."}]},'
    b' "created_at": "2026-03-14T09:30:00.123456Z", "hash": "' + b"a" * 64 + b'"}'
)
DESIGN_REPLIES: list[tuple[type, bytes]] = [
    (AppendReply, b"""{"session_id": "support-42", "first_order": 8, "last_order": 9, "items": [
        {"item_order": 8, "item_id": "t1-0", "hash": "%s", "duplicate": false},
        {"item_order": 9, "item_id": "t1-1", "hash": "%s", "duplicate": true}]}"""
     % (b"b" * 64, b"c" * 64)),
    (ReadReply, b'{"session_id": "support-42", "items": [' + ENVELOPE + b'], "last_order": 9, "more": true}'),
    (SessionsReply, b"""{"sessions": [{"session_id": "support-42", "last_order": 9,
        "updated_at": "2026-03-14T09:30:00.123456Z"}], "more": false}"""),
    (Envelope, ENVELOPE),
    (ErrorBody, b'{"error": {"code": "conflict", "message": "expected_last 3 but session is at 9", "last_order": 9}}'),
    (ErrorBody, b'{"error": {"code": "bad_request", "message": "malformed JSON"}}'),
]


@pytest.mark.parametrize(("type_", "body"), DESIGN_REQUESTS + DESIGN_REPLIES)
def test_design_examples_decode_strictly_and_round_trip(type_: type, body: bytes) -> None:
    if type_ in (AppendReply, ReadReply, SessionsReply, Envelope, ErrorBody):
        value = msgspec.json.decode(body, type=type_, strict=True)
    else:
        value = decode(body, type_)
    # No field of the example is dropped or invented: re-encoding gives the
    # same JSON (request defaults aside).
    again = json.loads(encode(value))
    original = json.loads(body)
    if type_ in (AppendRequest, ReadRequest, SessionsRequest, UserMessage, ErrorBody):
        again = _without_defaults(again)
        original = _without_defaults(original)
    assert again == original


def _without_defaults(value: object) -> object:
    if isinstance(value, dict):
        return {
            k: _without_defaults(v)
            for k, v in value.items()
            if v is not None and not (k == "raw" and v is False)
            and not (k == "kind" and v == "item") and not (k == "data" and v == {})
        }
    if isinstance(value, list):
        return [_without_defaults(v) for v in value]
    return value


def test_error_body_example_parses_as_a_typed_error() -> None:
    body = next(b for t, b in DESIGN_REPLIES if t is ErrorBody and b"conflict" in b)
    err = from_wire(None, body)
    assert isinstance(err, ConflictError) and err.last_order == 9


# -- numbers RFC 8785 can represent ------------------------------------------------


def test_check_json_numbers() -> None:
    assert MAX_SAFE_INT == 2**53 - 1
    for ok in (2**53 - 1, -(2**53 - 1), 0, 1.5, -0.0, 1e308, True, None, "9007199254740993"):
        check_json({"a": [ok]})
    for bad in (2**53, -(2**53), 10**30, float("inf"), float("-inf"), float("nan")):
        with pytest.raises(BadRequestError):
            check_json({"a": [1, {"b": bad}]})
    with pytest.raises(BadRequestError) as exc:
        check_json({"a": [1, {"b": 2**53}]}, "$.items[0].data")
    assert "$.items[0].data.a[1].b" in exc.value.message
    assert str(2**53) in exc.value.message


def _nested(depth: int, inner: object = 1, *, as_list: bool = False) -> object:
    """``depth`` objects (or arrays) inside one another, ``inner`` in the deepest."""
    value = inner
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


def test_nesting_deeper_than_max_depth_is_refused() -> None:
    """What a new item may hold: data is level 1, at most MAX_DEPTH levels (the
    log service stopped on one append nested ~975 deep, see test_log_service_errors)."""
    assert MAX_DEPTH == 100
    for as_list in (False, True):
        ok, deep = _nested(MAX_DEPTH, as_list=as_list), _nested(MAX_DEPTH + 1, as_list=as_list)
        assert json_ok(ok) and json_ok(_nested(MAX_DEPTH, {}, as_list=as_list)) is False
        check_json(ok)
        assert not json_ok(deep)
        with pytest.raises(BadRequestError) as exc:
            check_json(deep, "$.items[0].data")
        assert exc.value.message == "$.items[0].data nests objects and arrays more than 100 levels deep"
        assert numbers_ok(deep)  # what a stored log holds is read at any depth
    # a wide value is not a deep one; a number error is still named at any depth
    assert json_ok({str(i): {"b": [1, 2]} for i in range(1000)})
    with pytest.raises(BadRequestError, match=r"integer at \$\.a\.a"):
        check_json(_nested(2, 2**60))


# -- errors on the wire ------------------------------------------------------------

ERRORS: list[ConvlogError] = [
    BadRequestError("malformed JSON: truncated"),
    InvalidSessionIdError("session id 'a.b' is invalid"),
    TooLargeError("item 0 data is 5000 bytes, over the 4096-byte limit", limit=4096),
    ConflictError("expected_last 3 but session 's' is at 7", last_order=7),
    NotFoundError("session 'x' has no items"),
    UnavailableError("the store could not commit"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.code)
def test_errors_round_trip_through_the_wire(error: ConvlogError) -> None:
    headers, body = to_wire(error)
    assert headers[ERROR_CODE_HEADER] == error.status and error.status.isdigit()
    assert headers[ERROR_HEADER].startswith(f"{error.code}: ")
    parsed_body = json.loads(body)
    assert parsed_body["error"]["code"] == error.code
    assert parsed_body["error"]["message"] == error.message
    back = from_wire(headers, body)
    assert type(back) is type(error)
    assert (back.code, back.message, back.extra) == (error.code, error.message, error.extra)
    # The body alone (a client that drops headers) is enough too.
    assert type(from_wire(None, body)) is type(error)
    if isinstance(error, ConflictError):
        assert parsed_body["error"]["last_order"] == 7
        assert back.last_order == 7  # type: ignore[attr-defined]


def test_every_wire_code_has_one_error_class() -> None:
    assert sorted(e.code for e in ERRORS) == sorted(
        ["bad_request", "invalid_session_id", "too_large", "conflict", "not_found", "unavailable"]
    )


def test_from_wire_success_and_garbage() -> None:
    assert from_wire(None, b'{"session_id":"s","first_order":1}') is None
    assert from_wire({}, b"{}") is None
    err = from_wire({ERROR_CODE_HEADER: "500", ERROR_HEADER: "boom"}, b"not json")
    assert isinstance(err, UnavailableError) and err.message == "boom"
    unknown = from_wire(None, b'{"error": {"code": "teapot", "message": "?"}}')
    assert isinstance(unknown, UnavailableError)


# -- configuration -----------------------------------------------------------------


def test_config_defaults() -> None:
    s = load_settings({}, environ={"HOME": "/home/u"})
    # The default (NATS's standard client port on loopback) is pinned against
    # the README's configuration table in tests/docs/test_readme.py.
    assert s.nats_url == DEFAULT_NATS_URL
    assert s.prefix == "convlog"
    assert s.data_dir == Path("/home/u/.local/share/convlog")
    assert s.db_path == s.data_dir / "convlog.db"
    assert s.embedded is True and s.request_timeout == Settings().request_timeout


def test_config_precedence_flags_over_env_over_defaults() -> None:
    env = {
        "CONVLOG_NATS_URL": "nats://env:1",
        "CONVLOG_PREFIX": "envprefix",
        "CONVLOG_DB": "/env/log.db",
        "CONVLOG_EMBEDDED": "false",
        "CONVLOG_MAX_ITEM_BYTES": "4096",
        "CONVLOG_DATA_DIR": "/env/data",
        "CONVLOG_REQUEST_TIMEOUT": "",  # empty means unset
    }
    s = load_settings({"nats_url": "nats://flag:2", "prefix": None, "db": "/flag/x.db"}, environ=env)
    assert s.nats_url == "nats://flag:2"  # flag wins
    assert s.prefix == "envprefix"  # unset flag: env wins
    assert s.db_path == Path("/flag/x.db")
    assert s.embedded is False and s.max_item_bytes == 4096
    assert s.data_dir == Path("/env/data")
    assert s.request_timeout == 5.0  # default
    assert s.subjects.append("s") == "envprefix.append.s"
    assert load_settings({"embedded": False}, environ={"CONVLOG_EMBEDDED": "yes"}).embedded is False


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CONVLOG_MAX_ITEM_BYTES", "lots"),
        ("CONVLOG_MAX_ITEM_BYTES", "10"),
        ("CONVLOG_REQUEST_TIMEOUT", "-1"),
        ("CONVLOG_EMBEDDED", "maybe"),
        ("CONVLOG_COMMIT_BATCH", "1.5"),
        ("CONVLOG_PREFIX", "bad prefix"),
        ("CONVLOG_PREFIX", "convlog.>"),
    ],
)
def test_bad_config_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({}, environ={var: value})
    assert var in exc.value.message
