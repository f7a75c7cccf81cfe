"""The RFC 8785 hash chain: canonical bytes, known answers, tamper detection."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.chain import GENESIS_HASH, Problem, canonical, envelope_hash, item_hash, verify
from shared.messages import Envelope

MAX_SAFE = 2**53 - 1

# Text that often holds astral characters (keys sort differently by UTF-16
# code unit than by code point only there) and control characters (escaped).
# (JSON text is UTF-8, so lone surrogates cannot occur: codec="utf-8".)
_chars = st.one_of(
    st.characters(codec="utf-8"),
    st.characters(codec="utf-8", min_codepoint=0x10000),
    st.characters(codec="utf-8", max_codepoint=0x1F),
    st.characters(codec="utf-8", min_codepoint=0xE000, max_codepoint=0xFFFF),
    st.sampled_from('"\\/\x7f\u2028\u2029'),
)
_text = st.text(_chars, max_size=12)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE, max_value=MAX_SAFE)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_text, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_canonical_is_rfc8785(value: Any) -> None:
    assert canonical(value) == rfc8785.dumps(value)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(_text, st.integers(-MAX_SAFE, MAX_SAFE) | _text, max_size=8))
def test_canonical_is_rfc8785_for_flat_objects_without_floats(value: dict[str, Any]) -> None:
    # The fast path (no floats anywhere) must agree with the reference too.
    assert canonical(value) == rfc8785.dumps(value)


def test_keys_sort_by_utf16_code_units() -> None:
    # U+1F600 is D83D DE00 in UTF-16, so it sorts *before* U+FB01 there,
    # though after it by code point.
    value = {"\ufb01": 1, "\U0001f600": 2, "a": {"\U0001f600": ["x", "\x01"], "\ufb01": None}}
    assert canonical(value) == rfc8785.dumps(value)
    assert canonical(value).index("\U0001f600".encode()) < canonical(value).index("\ufb01".encode())


# -- known answer --------------------------------------------------------------

FIELDS: dict[str, Any] = {
    "session_id": "support-42",
    "item_order": 1,
    "item_id": "4c1f9b2e8d7a4e0f9a1b2c3d4e5f6071",
    "agent": "user",
    "kind": "item",
    "data": {"role": "user", "content": "I was charged twice — €9.99 ✓ 💳\nplease help"},
    "created_at": "2026-03-14T09:30:00.123456Z",
}
# sha256(JCS(FIELDS + prev_hash=64 zeros)); pinned so a change of field names,
# canonical form or genesis hash cannot pass unnoticed.
KNOWN_HASH_1 = "edf14f964175d94cf37a44d301e2794c100435b8e1d38e867dd9175e004af255"


def independent_hash(fields: dict[str, Any], prev_hash: str) -> str:
    return hashlib.sha256(rfc8785.dumps({**fields, "prev_hash": prev_hash})).hexdigest()


def test_known_answer_for_a_fixed_envelope() -> None:
    expected = independent_hash(FIELDS, "0" * 64)
    assert GENESIS_HASH == "0" * 64
    assert item_hash(**FIELDS, prev_hash=GENESIS_HASH) == expected
    assert expected == KNOWN_HASH_1
    env = Envelope(**FIELDS, hash=expected)
    assert envelope_hash(env, GENESIS_HASH) == expected
    # hash_2 chains on hash_1.
    second = {**FIELDS, "item_order": 2, "item_id": "b" * 32, "agent": "Triage",
              "data": {"type": "function_call", "name": "transfer_to_billing", "arguments": "{}",
                       "call_id": "call_1", "score": 0.1}}
    assert item_hash(**second, prev_hash=expected) == independent_hash(second, expected)
    assert item_hash(**second, prev_hash=expected) != item_hash(**second, prev_hash=GENESIS_HASH)


def test_every_field_is_covered_by_the_hash() -> None:
    base = item_hash(**FIELDS, prev_hash=GENESIS_HASH)
    changes: dict[str, Any] = {
        "session_id": "support-43", "item_order": 2, "item_id": "x", "agent": "Triage",
        "kind": "retract", "data": {"role": "user", "content": "I was charged twice"},
        "created_at": "2026-03-14T09:30:00.123457Z",
    }
    for name, value in changes.items():
        assert item_hash(**{**FIELDS, name: value}, prev_hash=GENESIS_HASH) != base, name
    assert item_hash(**FIELDS, prev_hash="1" * 64) != base


@settings(max_examples=100, deadline=None)
@given(
    data=st.dictionaries(_text, json_values, max_size=5),
    strings=st.tuples(_text, _text, _text, _text, _text),
    order=st.integers(1, MAX_SAFE),
)
def test_item_hash_matches_an_independent_rfc8785_hash(
    data: dict[str, Any], strings: tuple[str, ...], order: int
) -> None:
    # item_hash builds the hashed object its own way (a sorted Struct, or the
    # reference for floats and astral keys); it must equal JCS of the dict.
    sid, iid, agent, created_at, prev = strings
    fields = {"session_id": sid, "item_order": order, "item_id": iid, "agent": agent,
              "kind": "item", "data": data, "created_at": created_at}
    assert item_hash(**fields, prev_hash=prev) == independent_hash(fields, prev)


# -- verify -------------------------------------------------------------------


def chain(n: int, sid: str = "s") -> list[Envelope]:
    out: list[Envelope] = []
    prev = GENESIS_HASH
    for order in range(1, n + 1):
        fields = {**FIELDS, "session_id": sid, "item_order": order, "item_id": f"id{order}",
                  "data": {"role": "user", "content": f"message {order}"}}
        h = item_hash(**fields, prev_hash=prev)
        out.append(Envelope(**fields, hash=h))
        prev = h
    return out


def test_verify_accepts_an_intact_chain() -> None:
    assert verify(chain(6), session_id="s") is None
    assert verify([]) is None


def test_verify_names_an_edited_envelope() -> None:
    envs = chain(6)
    envs[2] = msgspec.structs.replace(envs[2], data={"role": "user", "content": "edited"})
    problem = verify(envs)
    assert isinstance(problem, Problem) and problem.item_order == 3
    assert "item_order 3" in str(problem)


def test_verify_names_an_edit_of_the_first_and_of_the_last_envelope() -> None:
    envs = chain(4)
    assert verify([msgspec.structs.replace(envs[0], agent="Triage"), *envs[1:]]).item_order == 1
    assert verify([*envs[:3], msgspec.structs.replace(envs[3], created_at="x")]).item_order == 4
    # Re-hashing the edited envelope does not help: its successor no longer chains.
    edited = msgspec.structs.replace(envs[1], data={"role": "user", "content": "forged"})
    edited = msgspec.structs.replace(edited, hash=envelope_hash(edited, envs[0].hash))
    assert verify([envs[0], edited, *envs[2:]]).item_order == 3


def test_verify_names_a_removed_envelope() -> None:
    envs = chain(6)
    problem = verify(envs[:2] + envs[3:])
    assert problem is not None and problem.item_order == 3


def test_verify_names_a_swap() -> None:
    envs = chain(6)
    envs[2], envs[3] = envs[3], envs[2]
    assert verify(envs).item_order == 3
    # Swapping contents but keeping the orders breaks the hashes instead.
    a, b = chain(6)[2], chain(6)[3]
    swapped = [*chain(6)[:2], msgspec.structs.replace(a, data=b.data),
               msgspec.structs.replace(b, data=a.data), *chain(6)[4:]]
    assert verify(swapped).item_order == 3


def test_verify_refuses_a_foreign_session() -> None:
    envs = chain(3)
    other = chain(3, sid="t")
    assert verify([envs[0], other[1], envs[2]], session_id="s").item_order == 2
    # A whole, intact chain of another session is no log of this one (its
    # hashes are all right: only the session check can refuse it).
    assert verify(other) is None
    problem = verify(other, session_id="s")
    assert problem is not None and problem.item_order == 1 and "'t'" in problem.reason
