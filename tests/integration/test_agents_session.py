"""``ConvlogSession`` against a real nats-server, the real log service and SQLite.

The cases mirror the Agents SDK's own session tests (``tests/memory/test_session.py``,
``tests/memory/test_session_limit.py``, ``tests/extensions/memory/test_redis_session.py``
and friends): direct add/get/pop/clear, limits and ``SessionSettings``, unicode
and large items, isolation, and the packaging of the optional SDK.  Concurrency,
idempotency, cancellation and closing are in ``test_agents_session_concurrency.py``;
the Runner using the session, authors, rewinds and audit in ``test_agents_runner.py``.
The ``new_session`` and ``run_config`` fixtures are :mod:`tests.support.sdk_env`'s.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from agents import (
    SessionSettings,
)

from shared import ConvlogSession
from shared.client import LogClient
from shared.errors import InvalidSessionIdError, TooLargeError
from tests.support.procs import REPO_ROOT
from tests.support.sdk_env import contents

# -- direct operations ------------------------------------------------------


async def test_direct_ops(new_session: Callable[..., ConvlogSession]) -> None:
    session = new_session("direct_test")
    # 1. add two items, 2. read them back
    await session.add_items([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}])
    assert contents(await session.get_items()) == ["Hello", "Hi there!"]
    # 3. pop the newest
    popped = await session.pop_item()
    assert popped == {"role": "assistant", "content": "Hi there!"}
    assert contents(await session.get_items()) == ["Hello"]
    # 4. clear
    await session.clear_session()
    assert await session.get_items() == []


async def test_items_come_back_exactly_as_stored(new_session: Callable[..., ConvlogSession]) -> None:
    session = new_session()
    items: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "It is sunny.", "annotations": []}],
        },
    ]
    await session.add_items(items)
    assert await session.get_items() == items
    assert await session.get_items(limit=2) == items[-2:]


async def test_get_items_with_limit(new_session: Callable[..., ConvlogSession]) -> None:
    session = new_session("count_test")
    texts = ["Message 1", "Response 1", "Message 2", "Response 2", "Message 3", "Response 3"]
    await session.add_items(
        [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    )
    assert contents(await session.get_items()) == texts
    assert contents(await session.get_items(limit=2)) == texts[-2:]
    assert contents(await session.get_items(limit=4)) == texts[-4:]
    assert contents(await session.get_items(limit=10)) == texts  # more than there are
    assert await session.get_items(limit=0) == []
    assert contents(await session.get_items(limit=-1)) == texts  # SQLite's LIMIT -1: no limit


async def test_pop_item_sequence_and_empty(new_session: Callable[..., ConvlogSession]) -> None:
    session = new_session("pop_test")
    assert await session.pop_item() is None  # empty session
    await session.add_items(
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "How are you?"},
        ]
    )
    assert (await session.pop_item()) == {"role": "user", "content": "How are you?"}
    assert contents(await session.get_items()) == ["Hello", "Hi there!"]
    assert (await session.pop_item()) == {"role": "assistant", "content": "Hi there!"}
    assert (await session.pop_item()) == {"role": "user", "content": "Hello"}
    assert await session.pop_item() is None
    assert await session.get_items() == []


async def test_pop_and_clear_only_touch_their_session(
    new_session: Callable[..., ConvlogSession],
) -> None:
    one, two = new_session("session_1"), new_session("session_2")
    await one.add_items([{"role": "user", "content": "Session 1 message"}])
    await two.add_items(
        [{"role": "user", "content": "Session 2 message 1"}, {"role": "user", "content": "Session 2 message 2"}]
    )
    assert (await two.pop_item() or {}).get("content") == "Session 2 message 2"
    assert contents(await one.get_items()) == ["Session 1 message"]
    assert contents(await two.get_items()) == ["Session 2 message 1"]
    await two.clear_session()
    assert contents(await one.get_items()) == ["Session 1 message"]
    assert await two.get_items() == []


async def test_add_empty_items_list_writes_nothing(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    session = new_session("empty_add")
    await session.add_items([])
    assert await session.get_items() == []
    assert await log_client.last_order("empty_add") == 0
    await session.clear_session()  # clearing nothing writes nothing either
    assert await log_client.last_order("empty_add") == 0


async def test_unicode_special_characters_and_problematic_strings(
    new_session: Callable[..., ConvlogSession],
) -> None:
    session = new_session("unicode_test")
    strings = [
        "こんにちは",
        "😊👍",
        "Привет",
        "O'Reilly",
        "DROP TABLE sessions;",
        '"SELECT * FROM users WHERE name = "admin";"',
        "Robert'); DROP TABLE students;--",
        '{"malicious": "json"}',
        "\\n\\t\\r Special escapes",
        "Line1\nLine2\tTabbed",
        "nul\u0000byte and \u2028 separator",
        "Normal message",
    ]
    items = [{"role": "user" if i % 2 else "assistant", "content": s} for i, s in enumerate(strings)]
    await session.add_items(items)
    assert contents(await session.get_items()) == strings


async def test_large_items_and_large_batches(new_session: Callable[..., ConvlogSession]) -> None:
    session = new_session("large_items")
    # Five 200 KB items: their tail (1 MB) is over the NATS max payload, so
    # get_items pages forward instead of asking for one tail reply.
    big = [{"role": "assistant", "content": f"{i}" + "x" * 200_000} for i in range(5)]
    for item in big:
        await session.add_items([item])
    assert await session.get_items() == big
    assert await session.get_items(limit=4) == big[-4:]
    assert await session.pop_item() == big[-1]
    # One call with 1,000 small items is still one append.
    many = [{"role": "user", "content": f"m{i}"} for i in range(1000)]
    await session.add_items(many)
    assert await session.get_items(limit=1000) == many
    assert len(await session.get_items()) == 1004


async def test_add_items_too_large_writes_nothing(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    session = new_session("too_large")
    await session.add_items([{"role": "user", "content": "before"}])
    # One item over the service's item limit, and a batch over the NATS max payload:
    # either way the whole call is refused and nothing of it is written.
    with pytest.raises(TooLargeError):
        await session.add_items([{"role": "user", "content": "ok"},
                                 {"role": "assistant", "content": "y" * 300_000}])
    with pytest.raises(TooLargeError):
        await session.add_items([{"role": "assistant", "content": "z" * 200_000}] * 6)
    assert contents(await session.get_items()) == ["before"]
    assert await log_client.last_order("too_large") == 1


async def test_invalid_session_id_is_refused_up_front(log_client: LogClient) -> None:
    for bad in ("has.dot", "a b", "*", "", "x" * 129):
        with pytest.raises(InvalidSessionIdError):
            ConvlogSession(bad, client=log_client)


# -- SessionSettings ----------------------------------------------------------


async def test_session_settings_default_constructor_dict_and_from_url(
    log_client: LogClient, log_url: str
) -> None:
    assert ConvlogSession("a", client=log_client).session_settings == SessionSettings()
    assert ConvlogSession("a", client=log_client).session_settings.limit is None
    with_limit = ConvlogSession("a", client=log_client, session_settings=SessionSettings(limit=5))
    assert with_limit.session_settings.limit == 5
    from_dict = ConvlogSession("a", client=log_client, session_settings={"limit": 0})
    assert isinstance(from_dict.session_settings, SessionSettings)
    assert from_dict.session_settings.limit == 0
    assert from_dict.session_settings.resolve({"limit": 4}).limit == 4
    with pytest.raises(TypeError, match="limitt"):
        ConvlogSession("a", client=log_client, session_settings={"limitt": 1})
    remote = ConvlogSession.from_url("a", url=log_url, session_settings=SessionSettings(limit=50))
    assert remote.session_settings.limit == 50
    await remote.close()


async def test_get_items_uses_session_settings_limit(
    new_session: Callable[..., ConvlogSession],
) -> None:
    session = new_session("uses_settings", session_settings=SessionSettings(limit=3))
    await session.add_items([{"role": "user", "content": f"Message {i}"} for i in range(5)])
    assert contents(await session.get_items()) == ["Message 2", "Message 3", "Message 4"]


async def test_explicit_limit_overrides_session_settings(
    new_session: Callable[..., ConvlogSession],
) -> None:
    session = new_session("explicit_override", session_settings=SessionSettings(limit=5))
    await session.add_items([{"role": "user", "content": f"Message {i}"} for i in range(10)])
    assert contents(await session.get_items(limit=2)) == ["Message 8", "Message 9"]


# -- packaging ------------------------------------------------------------------


def test_agents_is_an_optional_extra() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["agents"]
    assert any(req.replace(" ", "").startswith("openai-agents") for req in extra)
    assert not any("openai-agents" in dep for dep in pyproject["project"]["dependencies"])


def test_import_without_the_sdk_works_and_use_names_the_extra() -> None:
    probe = """
import sys
sys.modules["agents"] = None  # as if openai-agents were not installed
import shared
assert "agents" not in sys.modules or sys.modules["agents"] is None
from shared import ConvlogSession  # the class itself imports no SDK
try:
    ConvlogSession.from_url("s1", url="nats://127.0.0.1:1")
except ImportError as e:
    print("ImportError:", e)
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'convlog[agents]'" in done.stdout


def test_import_shared_does_not_import_the_sdk() -> None:
    probe = "import sys, shared, shared.agents_session; print('agents' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


async def test_get_items_of_a_tail_over_one_reply_reads_only_the_end_of_a_long_session(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    """The last items of a long session, over one read's reply together (large items),
    are paged from a little before them: get_items read the whole session instead, on
    every call (the Runner's, before each model call), time and memory growing with it."""
    session = new_session("long_then_large")
    for start in range(0, 10_000, 1_000):
        await log_client.append("long_then_large", [
            {"agent": "user", "data": {"role": "user", "content": f"m{i}" + "." * 200}}
            for i in range(start, start + 1_000)])
    big = [{"role": "assistant", "content": f"{i}" + "x" * 200_000} for i in range(6)]
    for item in big:
        await session.add_items([item])
    received = log_client.nc.stats["in_bytes"]
    assert await session.get_items(limit=7) == [{"role": "user", "content": "m9999" + "." * 200}, *big]
    got = log_client.nc.stats["in_bytes"] - received
    assert got < 4_000_000, f"received {got} bytes for 1,200,000 of items (the session: 4,400,000)"
