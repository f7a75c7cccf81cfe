"""Input that has no JSON form, at every client edge, against a real log service:
refused with the documented ``BadRequestError`` naming what and where, and
nothing written (each a bug once: a raw ``UnicodeEncodeError`` or ``TypeError``
came out instead, or the value was silently changed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from shared import ConvlogSession
from shared.client import LogClient
from shared.errors import BadRequestError


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


@pytest.mark.parametrize(("content", "problem"), [
    ("half an emoji \ud83d", r"text at \$\.items\[1\]\.data\.content has a lone surrogate"),
    ({"\ud800": 1}, r"object key at \$\.items\[1\]\.data\.content has a lone surrogate"),
    ({1: "a"}, r"object key at \$\.items\[1\]\.data\.content is not a string: 1 \(int\)"),
    ({("a", "b"): 1}, r"object key at \$\.items\[1\]\.data\.content is not a string"),
], ids=["lone-surrogate", "surrogate-key", "int-key", "tuple-key"])
async def test_add_items_refuses_text_and_keys_json_has_no_form_for(
    new_session: Callable[..., ConvlogSession], log_client: LogClient, content: Any, problem: str
) -> None:
    """The retry fingerprint's encoder met them first and raised msgspec's
    ``UnicodeEncodeError`` / ``TypeError``, not the ``BadRequestError`` add_items documents."""
    session = new_session("unencodable_add")
    with pytest.raises(BadRequestError, match=problem):
        await session.add_items([_user("fine"), _user(content)])
    assert await log_client.items("unencodable_add") == []
    await session.add_items([_user("next")])  # the session is fine after it
    assert [i["content"] for i in await session.get_items()] == ["next"]


def _nested(levels: int) -> list[Any]:
    v: list[Any] = []
    for _ in range(levels - 1):
        v = [v]
    return v


async def test_add_items_refuses_data_nested_past_the_encoders_limit(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    """Nested 150 levels, add_items said the append's "nests objects and arrays
    more than 100 levels deep"; nested 5,000 levels, the retry fingerprint's
    encoder raised a raw ``RecursionError`` first."""
    session = new_session("deep_add")
    for levels in (150, 5000):
        with pytest.raises(BadRequestError, match=r"\$\.items\[1\]\.data nests objects and arrays more than 100"):
            await session.add_items([_user("fine"), _user(_nested(levels))])
    assert await log_client.items("deep_add") == []


class _NoJson:
    pass


NO_JSON = pytest.mark.parametrize(("content", "problem"), [
    ({"x": [1, _NoJson()]}, r"value at \$\.items\[1\]\.data\.content\.x\[1\] has no JSON form: .*_NoJson"),
    ({("a", "b"): 1}, r"object key at \$\.items\[1\]\.data\.content is not a string: \('a', 'b'\)"),
    ({None: 1}, r"object key at \$\.items\[1\]\.data\.content is not a string: None"),
], ids=["object", "tuple-key", "none-key"])


async def _refused_and_nothing_written(client: LogClient, agent: str, content: Any, problem: str) -> None:
    items = [{"agent": agent, "data": _user("fine")}, {"agent": agent, "data": _user(content)}]
    with pytest.raises(BadRequestError, match=problem):
        await client.append("unencodable_append", items)
    assert await client.items("unencodable_append") == []


@NO_JSON
async def test_append_refuses_values_json_has_no_form_for(log_client: LogClient, content: Any, problem: str) -> None:
    """msgspec's ``TypeError`` came out of ``LogClient.append``, not the
    ``BadRequestError`` it documents for a bad value."""
    await _refused_and_nothing_written(log_client, "user", content, problem)


@NO_JSON
async def test_signed_append_refuses_values_json_has_no_form_for(
    triage_signed: LogClient, content: Any, problem: str
) -> None:
    """The same ``TypeError`` came out of the signing of a signed append."""
    await _refused_and_nothing_written(triage_signed, "Triage", content, problem)


@pytest.mark.parametrize(("content", "key"), [
    ({1: "a", "1": "b"}, "1 (int)"),
    ({"ok": {2.5: "x"}}, "2.5 (float)"),
], ids=["int-and-str-key", "float-key"])
async def test_append_refuses_object_keys_that_are_not_strings(
    log_client: LogClient, content: Any, key: str
) -> None:
    """JSON sent the key 1 as "1": ``{1: "a", "1": "b"}`` went out as an object
    with the key "1" twice, and the log kept only "b" ("a" lost, no error);
    add_items refused such keys while append wrote them changed."""
    with pytest.raises(BadRequestError, match=rf"object key at \$\.items\[0\]\.data\.content.* is not a string: {re.escape(key)}"):
        await log_client.append("int_keys", [{"agent": "user", "data": _user(content)}])
    assert await log_client.items("int_keys") == []


@pytest.mark.parametrize(("content", "to", "problem"), [
    ("half an emoji \ud83d", None, r"text at \$\.content has a lone surrogate"),
    ("hi", "Tri\udc00age", r"text at \$\.to has a lone surrogate"),
], ids=["content", "to"])
async def test_signed_send_refuses_text_with_a_lone_surrogate(
    triage_signed: LogClient, content: str, to: str | None, problem: str
) -> None:
    """Unsigned, ``send`` refused it with BadRequestError; signed, the signing
    raised msgspec's raw ``UnicodeEncodeError``."""
    with pytest.raises(BadRequestError, match=problem):
        await triage_signed.send("surrogate_send", content, to=to)
    assert await triage_signed.items("surrogate_send") == []


@pytest.mark.parametrize("bad", ["agent", None, 5, ["agent", "user"]], ids=["str", "none", "int", "list"])
async def test_append_refuses_an_item_that_is_not_an_object(log_client: LogClient, bad: Any) -> None:
    """``dict(item)`` raised its own ValueError/TypeError ("dictionary update
    sequence element #0 has length 1; 2 is required"), not the BadRequestError
    append documents for an item of the wrong shape."""
    with pytest.raises(BadRequestError, match=rf"invalid item: \$\.items\[1\] is a {type(bad).__name__}, not an object"):
        await log_client.append("not_objects", [{"agent": "user", "data": _user("fine")}, bad])
    assert await log_client.items("not_objects") == []


@pytest.mark.parametrize(("kw", "problem"), [
    ({"content": b"hi"}, "content must be a str, not bytes"),
    ({"content": "hi", "to": b"Triage"}, "to must be a str, not bytes"),
], ids=["bytes-content", "bytes-to"])
async def test_send_refuses_bytes_where_text_goes(log_client: LogClient, kw: dict[str, Any], problem: str) -> None:
    """JSON sent bytes as base64 text: ``send(sid, b"hi")`` stored the user
    message "aGk=" without an error."""
    with pytest.raises(BadRequestError, match=problem):
        await log_client.send("bytes_send", **kw)
    assert await log_client.items("bytes_send") == []
