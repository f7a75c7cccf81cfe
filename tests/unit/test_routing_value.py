"""The routing KV value: one Struct, one encoder and one decoder for every writer and reader."""

from __future__ import annotations

import msgspec
import pytest

from shared.routing import RoutingCheckpoint, decode_checkpoint, encode_checkpoint, entry_checkpoint


def test_round_trip() -> None:
    cp = RoutingCheckpoint(active="L1Billing", order=7, entry="Triage")
    assert encode_checkpoint(cp) == b'{"active":"L1Billing","order":7,"entry":"Triage"}'
    assert decode_checkpoint(encode_checkpoint(cp)) == cp


def test_the_log_services_entry_hint() -> None:
    value = encode_checkpoint(entry_checkpoint("L1Billing"))
    assert msgspec.json.decode(value) == {"active": "L1Billing", "order": 0, "entry": "L1Billing"}
    assert decode_checkpoint(value) == RoutingCheckpoint(active="L1Billing", order=0, entry="L1Billing")


def test_an_older_value_without_entry() -> None:
    # Written before `entry` was recorded: at order 0 the active agent is the entry.
    assert decode_checkpoint(b'{"active": "L1Billing", "order": 0}').entry == "L1Billing"
    assert decode_checkpoint(b'{"active": "L2Support", "order": 9}').entry is None


def test_unknown_fields_from_a_newer_writer_are_ignored() -> None:
    cp = decode_checkpoint(b'{"active": "A", "order": 3, "entry": "A", "score": 0.9}')
    assert (cp.active, cp.order) == ("A", 3)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"", "truncated"),
        (b"not json", "malformed"),
        (b"[1]", "Expected `object`"),
        (b'{"order": 1}', "missing required field `active`"),
        (b'{"active": "A"}', "missing required field `order`"),
        (b'{"active": 5, "order": 1}', "$.active"),
        (b'{"active": "A", "order": -1}', "$.order"),
        (b'{"active": "A", "order": true}', "$.order"),
        (b'{"active": "", "order": 1}', "$.active"),
        (b'{"active": "A", "order": 1, "entry": ""}', "$.entry"),
    ],
)
def test_bad_values_are_refused_naming_the_field(value: bytes, fragment: str) -> None:
    with pytest.raises(msgspec.DecodeError) as info:
        decode_checkpoint(value)
    assert fragment in str(info.value), info.value
