"""``ConvlogSession`` against a real nats-server, the real log service and SQLite.

The cases mirror the Agents SDK's own session tests (``tests/memory/test_session.py``,
``tests/memory/test_session_limit.py``, ``tests/extensions/memory/test_redis_session.py``
and friends): direct add/get/pop/clear, limits and ``SessionSettings``,
unicode and large items, isolation, concurrency, closing, and the Runner using
the session (``run``, ``run_sync``, ``run_streamed``).  Then what is convlog's
own: one atomic idempotent append per ``add_items``, pop-then-add rewinds
(SDK issue #3852), authors per agent, and audit replay that still shows what
``pop_item``/``clear_session`` hid.  Only the model is fake: the SDK's
``OpenAIResponsesModel`` talks to the loopback server in ``tests/support/fake_openai.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from agents import (
    Agent,
    ModelRetrySettings,
    ModelSettings,
    RunConfig,
    Runner,
    SessionSettings,
    handoff,
    retry_policies,
)

from shared import ConvlogSession
from shared.chain import verify
from shared.client import LogClient
from shared.errors import InvalidSessionIdError, TooLargeError, UnavailableError
from shared.messages import Envelope
from tests.support.fake_openai import FakeOpenAI, error, text, tool_call
from tests.support.natsd import NatsServer, free_port
from tests.support.procs import REPO_ROOT
from tests.support.seed_agents import FakeServerProvider

# -- fixtures ---------------------------------------------------------------


@pytest.fixture
async def new_session(log_client: LogClient) -> AsyncIterator[Callable[..., ConvlogSession]]:
    """``new_session(sid, **kw)``: a session on the shared test client, closed at the end."""
    made: list[ConvlogSession] = []

    def make(session_id: str = "test_session", **kwargs: Any) -> ConvlogSession:
        session = ConvlogSession(session_id, client=log_client, **kwargs)
        made.append(session)
        return session

    yield make
    for session in made:
        await session.close()


@pytest.fixture
def run_config(fake_openai: FakeOpenAI) -> RunConfig:
    """Every agent's model is the SDK's Responses model on the fake server; no tracing export."""
    return RunConfig(model_provider=FakeServerProvider(fake_openai.base_url), tracing_disabled=True)


def with_options(config: RunConfig, **changes: Any) -> RunConfig:
    return dataclasses.replace(config, **changes)


def _run_sync_in_thread(agent: Agent[Any], input_data: Any, **kwargs: Any) -> Any:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return Runner.run_sync(agent, input_data, **kwargs)
    finally:
        # As asyncio.run does: let this loop's connections (the session's NATS
        # client, the model's HTTP pool) wind down before the loop closes.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


async def run_agent(method: str, agent: Agent[Any], input_data: Any, **kwargs: Any) -> Any:
    """Run through ``Runner.run``, ``Runner.run_sync`` (own thread and loop) or ``run_streamed``."""
    if method == "run":
        return await Runner.run(agent, input_data, **kwargs)
    if method == "run_sync":
        return await asyncio.to_thread(_run_sync_in_thread, agent, input_data, **kwargs)
    result = Runner.run_streamed(agent, input_data, **kwargs)
    async for _ in result.stream_events():
        pass
    return result


def contents(items: list[dict[str, Any]]) -> list[Any]:
    return [item.get("content") for item in items]


def model_input(fake: FakeOpenAI, index: int = -1) -> list[dict[str, Any]]:
    """The ``input`` list of a request the SDK sent to the (fake) model."""
    return fake.requests[index]["input"]


def assistant_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    return content if isinstance(content, str) else content[0]["text"]


RUNNER_METHODS = ["run", "run_sync", "run_streamed"]

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


# -- concurrency, idempotency, cancellation, closing ------------------------


def _batches(envelopes: list[Envelope]) -> dict[str, list[int]]:
    """item_order of each add_items call's items, keyed by the call key in their item_id."""
    out: dict[str, list[int]] = {}
    for env in envelopes:
        if env.kind == "item":
            out.setdefault(env.item_id.rsplit(".", 1)[0], []).append(env.item_order)
    return out


async def test_concurrent_add_items_from_two_connections_stay_contiguous_and_adjacent(
    log_url: str, log_client: LogClient
) -> None:
    # Two sessions on the same id, each with its own NATS connection, as two processes would be.
    a = ConvlogSession.from_url("concurrent_test", url=log_url)
    b = ConvlogSession.from_url("concurrent_test", url=log_url)
    try:

        async def writer(session: ConvlogSession, name: str) -> None:
            for n in range(20):
                await session.add_items(
                    [{"role": "user", "content": f"{name}-{n}-{k}"} for k in range(3)]
                )

        await asyncio.gather(writer(a, "a"), writer(b, "b"))
        envelopes = await log_client.items("concurrent_test")
        assert [e.item_order for e in envelopes] == list(range(1, 121))  # contiguous from 1
        assert verify(envelopes, session_id="concurrent_test") is None
        seen = [e.data["content"] for e in envelopes]
        expected = {f"{w}-{n}-{k}" for w in "ab" for n in range(20) for k in range(3)}
        assert sorted(seen) == sorted(expected)  # nothing lost, nothing doubled
        for orders in _batches(envelopes).values():  # each call's three items are adjacent
            assert orders == list(range(orders[0], orders[0] + 3))
        # and each writer's calls stay in the order it made them
        for w in "ab":
            mine = [s for s in seen if s.startswith(f"{w}-")]
            assert mine == [f"{w}-{n}-{k}" for n in range(20) for k in range(3)]
    finally:
        await a.close()
        await b.close()


async def test_concurrent_add_items_from_threads_with_their_own_loops(log_url: str) -> None:
    # The SDK's SQLiteSession test: one session object used from five threads.
    session = ConvlogSession.from_url("threads_test", url=log_url)
    items = [{"role": "user", "content": f"Message {i}"} for i in range(10)]

    def add_item(item: dict[str, Any]) -> None:
        asyncio.run(session.add_items([item]))

    def add_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
            list(pool.map(add_item, items))

    await asyncio.to_thread(add_all)  # the log service runs on this loop: keep it free
    try:
        assert sorted(contents(await session.get_items())) == sorted(i["content"] for i in items)
    finally:
        await session.close()


async def test_concurrent_pops_hide_distinct_items(log_url: str) -> None:
    a = ConvlogSession.from_url("pop_race", url=log_url)
    b = ConvlogSession.from_url("pop_race", url=log_url)
    try:
        await a.add_items([{"role": "user", "content": f"m{i}"} for i in range(10)])

        async def pops(session: ConvlogSession) -> list[Any]:
            return [(await session.pop_item() or {}).get("content") for _ in range(5)]

        got_a, got_b = await asyncio.gather(pops(a), pops(b))
        assert sorted(got_a + got_b) == sorted(f"m{i}" for i in range(10))  # each item once
        assert await a.get_items() == []
    finally:
        await a.close()
        await b.close()


class _ReplyLost(LogClient):
    """Fault injection at the client seam: the first append commits, then its reply is lost."""

    lost = False

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        reply = await super().append(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise UnavailableError("no reply on convlog.append (injected: reply lost)")
        return reply


async def test_retried_add_items_after_unknown_outcome_does_not_double(
    log_url: str, log_client: LogClient
) -> None:
    nc_client = await LogClient.connect(log_url)
    flaky = _ReplyLost(nc_client.nc)
    session = ConvlogSession("retry_test", client=flaky)
    items = [{"role": "user", "content": "Refund please"}, {"role": "assistant", "content": "Done"}]
    try:
        with pytest.raises(UnavailableError):
            await session.add_items(items)  # committed, but the caller cannot know
        await session.add_items(items)  # the caller retries the same batch
        assert await session.get_items() == items
        raw = await log_client.items("retry_test")
        assert [e.data for e in raw] == items  # written once
        # A later, successful call with equal content is a new write (a user may repeat themselves).
        await session.add_items(items[:1])
        assert contents(await session.get_items()) == ["Refund please", "Done", "Refund please"]
    finally:
        await nc_client.close()


async def test_concurrent_equal_add_items_are_two_writes_not_a_retry(
    log_url: str, log_client: LogClient
) -> None:
    # Only a call that ended without a known outcome hands its key to an equal
    # batch; two calls in flight at once with equal items both land, and a
    # retry pending from a failed call is used once.
    nc_client = await LogClient.connect(log_url)
    flaky = _ReplyLost(nc_client.nc)
    session = ConvlogSession("equal_twice", client=flaky)
    same = [{"role": "user", "content": "yes"}]
    try:
        with pytest.raises(UnavailableError):
            await session.add_items([{"role": "user", "content": "first"}])
        await asyncio.gather(session.add_items(same), session.add_items(same))
        assert contents(await session.get_items()) == ["first", "yes", "yes"]
        await session.add_items([{"role": "user", "content": "first"}])  # the retry: a duplicate
        await session.add_items([{"role": "user", "content": "first"}])  # after it: a new write
        raw = await log_client.items("equal_twice")
        assert [e.data["content"] for e in raw] == ["first", "yes", "yes", "first"]
    finally:
        await nc_client.close()


async def test_cancelled_add_items_finishes_the_append_then_raises(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    session = new_session("cancel_test")
    task = asyncio.create_task(session.add_items([{"role": "user", "content": "once"}]))
    await asyncio.sleep(0)  # one step: the append task is started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The started append was not abandoned half-way: it is there, once.
    assert contents(await session.get_items()) == ["once"]
    assert len(await log_client.items("cancel_test")) == 1


async def test_a_cancelled_queued_add_items_lands_and_raises_only_after(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    # Two session objects on one client and id share one append queue: the
    # second call waits behind the first, is cancelled there, and still goes
    # out; its caller hears of the cancellation once the append is answered.
    a, b = new_session("queued_cancel"), new_session("queued_cancel")
    first = asyncio.create_task(a.add_items([{"role": "user", "content": "one"}]))
    await asyncio.sleep(0)  # the first is in flight, sent alone
    second = asyncio.create_task(b.add_items([{"role": "user", "content": "two"}]))
    await asyncio.sleep(0)  # the second is queued behind it
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert first.done()  # the queued append went out after the first was answered
    await first
    assert [e.data["content"] for e in await log_client.items("queued_cancel")] == ["one", "two"]
    assert contents(await a.get_items()) == ["one", "two"]


async def test_close_is_idempotent_and_closed_operations_raise(
    log_url: str, log_client: LogClient
) -> None:
    owned = ConvlogSession.from_url("closing", url=log_url)
    assert await owned.ping() is True
    own_client = owned.client
    assert own_client is not None
    await owned.close()
    await owned.close()
    assert own_client.nc.is_closed  # an owned connection is closed with the session
    for call in (owned.get_items(), owned.add_items([{"role": "user", "content": "x"}]),
                 owned.pop_item(), owned.clear_session(), owned.ping()):
        with pytest.raises(RuntimeError, match="closed"):
            await call
    injected = ConvlogSession("closing", client=log_client)
    await injected.close()
    assert not log_client.nc.is_closed  # someone else's client is left open
    assert await log_client.last_order("closing") == 0


async def test_from_url_without_a_server_fails_in_bounded_time() -> None:
    session = ConvlogSession.from_url("nobody", url=f"nats://127.0.0.1:{free_port()}",
                                      connect_deadline=1.0)
    async with asyncio.timeout(10):
        with pytest.raises(UnavailableError, match="no NATS server answered"):
            await session.get_items()
    await session.close()


# -- the Runner with this session ------------------------------------------


@pytest.mark.parametrize("method", RUNNER_METHODS)
async def test_runner_remembers_across_turns(
    method: str, log_url: str, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    session = ConvlogSession.from_url("runner_basic", url=log_url)
    agent = Agent(name="test")
    try:
        fake_openai.script([text("San Francisco")])
        first = await run_agent(method, agent, "What city is the Golden Gate Bridge in?",
                                session=session, run_config=run_config)
        assert first.final_output == "San Francisco"
        fake_openai.script([text("California")])
        second = await run_agent(method, agent, "What state is it in?", session=session,
                                 run_config=run_config)
        assert second.final_output == "California"
        sent = model_input(fake_openai)
        assert sent[0] == {"role": "user", "content": "What city is the Golden Gate Bridge in?"}
        assert assistant_text(sent[1]) == "San Francisco"
        assert sent[2] == {"role": "user", "content": "What state is it in?"}
        assert len(await session.get_items()) == 4
    finally:
        await session.close()


@pytest.mark.parametrize("method", RUNNER_METHODS)
async def test_runner_sessions_are_isolated(
    method: str, log_url: str, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    cats = ConvlogSession.from_url("session_cats", url=log_url)
    dogs = ConvlogSession.from_url("session_dogs", url=log_url)
    agent = Agent(name="test")
    try:
        fake_openai.script([text("Cats, noted."), text("Dogs, noted."), text("You like cats.")])
        await run_agent(method, agent, "I like cats", session=cats, run_config=run_config)
        await run_agent(method, agent, "I like dogs", session=dogs, run_config=run_config)
        await run_agent(method, agent, "What did I say I like?", session=cats, run_config=run_config)
        sent = json.dumps(model_input(fake_openai))
        assert "I like cats" in sent and "dogs" not in sent.lower()
    finally:
        await cats.close()
        await dogs.close()


async def test_runner_appends_list_input_to_history(
    new_session: Callable[..., ConvlogSession], fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    session = new_session("list_input")
    history = [{"role": "user", "content": "Earlier message"}, {"role": "assistant", "content": "Saved reply"}]
    await session.add_items(history)
    fake_openai.script([text("This should run")])
    await Runner.run(Agent(name="test"), [{"role": "user", "content": "Test message"}],
                     session=session, run_config=run_config)
    assert model_input(fake_openai) == [*history, {"role": "user", "content": "Test message"}]


async def test_runner_session_input_callback(
    new_session: Callable[..., ConvlogSession], fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    session = new_session("callback_test")
    history = [{"role": "user", "content": "Hello there."},
               {"role": "assistant", "content": "Hi, I'm here to assist you."}]
    await session.add_items(history)

    def only_user_messages(past: list[Any], new: list[Any]) -> list[Any]:
        return [item for item in past if item["role"] == "user"] + new

    new_turn = [{"role": "user", "content": "What your name?"}]
    fake_openai.script([text("I'm gpt-4o")])
    config = with_options(run_config, session_input_callback=only_user_messages)
    await Runner.run(Agent(name="test"), new_turn, session=session, run_config=config)
    assert model_input(fake_openai) == [history[0], new_turn[0]]


async def test_runner_repeating_history_callback_does_not_grow_session(
    new_session: Callable[..., ConvlogSession], fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    session = new_session("repeat_test")

    def repeat_first(past: list[Any], new: list[Any]) -> list[Any]:
        return new if not past else past + [past[0]] + new

    config = with_options(run_config, session_input_callback=repeat_first)
    for turn in range(3):
        fake_openai.script([text(f"assistant {turn}")])
        await Runner.run(Agent(name="test"), f"user {turn}", session=session, run_config=config)
    stored = await session.get_items()
    assert [i["content"] for i in stored if i.get("role") == "user"] == ["user 0", "user 1", "user 2"]
    assert len(stored) == 6


@pytest.mark.parametrize("method", RUNNER_METHODS)
async def test_runner_session_limits(
    method: str, log_url: str, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    # The SDK's test_session_limit.py: RunConfig overrides, 0, None, larger than history.
    session = ConvlogSession.from_url("limit_test", url=log_url, session_settings={"limit": 100})
    agent = Agent(name="test")

    def config(limit: int | None) -> RunConfig:
        return with_options(run_config, session_settings=SessionSettings(limit=limit))

    try:
        for i in (1, 2, 3):
            fake_openai.script([text(f"Reply {i}")])
            await run_agent(method, agent, f"Message {i}", session=session, run_config=run_config)
        assert len(await session.get_items()) == 6

        fake_openai.script([text("Reply 4")])
        await run_agent(method, agent, "Message 4", session=session, run_config=config(2))
        sent = model_input(fake_openai)
        assert len(sent) == 3
        assert sent[0]["content"] == "Message 3"
        assert assistant_text(sent[1]) == "Reply 3"
        assert sent[2]["content"] == "Message 4"

        fake_openai.script([text("Reply 5")])
        await run_agent(method, agent, "Message 5", session=session, run_config=config(0))
        assert [i["content"] for i in model_input(fake_openai)] == ["Message 5"]

        fake_openai.script([text("Reply 6")])
        await run_agent(method, agent, "Message 6", session=session, run_config=config(None))
        sent = model_input(fake_openai)  # None: the session's own limit (100) covers all 10
        assert len(sent) == 11 and sent[0]["content"] == "Message 1"
    finally:
        await session.close()


@pytest.mark.parametrize("method", RUNNER_METHODS)
async def test_runner_limit_drops_unmatched_function_call_output(
    method: str, log_url: str, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    session = ConvlogSession.from_url("limit_tool_pair", url=log_url)
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "It is sunny.", "annotations": []}]},
    ]
    try:
        await session.add_items(history)
        assert await session.get_items(limit=2) == history[-2:]
        fake_openai.script([text("Tomorrow is sunny too.")])
        config = with_options(run_config, session_settings=SessionSettings(limit=2))
        await run_agent(method, Agent(name="test"), "What about tomorrow?", session=session,
                        run_config=config)
        assert model_input(fake_openai) == [history[-1], {"role": "user", "content": "What about tomorrow?"}]
    finally:
        await session.close()


async def test_runner_session_failure_propagates_in_streamed(
    nats_server: NatsServer, run_config: RunConfig
) -> None:
    # No log service answers on this prefix: the session's error surfaces instead of a hang.
    nc_client = await LogClient.connect(nats_server.url)
    client = LogClient(nc_client.nc, prefix="nobody_serves_this", timeout=0.2, deadline=0.5)
    session = ConvlogSession("no_service", client=client)
    try:
        result = Runner.run_streamed(Agent(name="test"), "Hello", session=session, run_config=run_config)
        with pytest.raises(UnavailableError):
            async with asyncio.timeout(10):
                async for _ in result.stream_events():
                    pass
    finally:
        await nc_client.close()


async def test_runner_passes_its_wrapper_to_every_method(
    new_session: Callable[..., ConvlogSession],
) -> None:
    from agents.memory import session as sdk_session

    accepts = getattr(sdk_session, "_session_accepts_wrapper", None)
    if accepts is None:
        pytest.skip("this SDK version does not pass a wrapper to sessions")
    assert accepts(new_session()) is True


# -- authors ------------------------------------------------------------------


def _triage(run_config: RunConfig) -> Agent[Any]:
    billing = Agent(name="BillingAgent", instructions="Handle billing inquiries.")
    technical = Agent(name="TechnicalAgent", instructions="Handle technical issues.")
    return Agent(
        name="TriageAgent",
        instructions="Hand off to the right specialist.",
        handoffs=[handoff(billing, tool_name_override="transfer_to_billing"),
                  handoff(technical, tool_name_override="transfer_to_technical")],
    )


@pytest.mark.parametrize("streamed", [False, True])
async def test_hooks_record_which_agent_wrote_each_item(
    streamed: bool, new_session: Callable[..., ConvlogSession], log_client: LogClient,
    fake_openai: FakeOpenAI, run_config: RunConfig,
) -> None:
    session = new_session("authors")
    fake_openai.script([tool_call("transfer_to_billing", {}), text("Billing here: refund issued.")])
    kwargs = {"session": session, "hooks": session.hooks(), "run_config": run_config}
    if streamed:
        result: Any = Runner.run_streamed(_triage(run_config), "I was charged twice", **kwargs)
        async for _ in result.stream_events():
            pass
    else:
        result = await Runner.run(_triage(run_config), "I was charged twice", **kwargs)
    assert result.last_agent.name == "BillingAgent"
    authored = [(e.agent, e.data.get("type") or e.data.get("role")) for e in await log_client.items("authors")]
    # The handoff's call and output belong to the agent that handed off (as in the SDK's
    # HandoffOutputItem); the reply to the agent that took over.
    assert authored == [
        ("user", "user"),
        ("TriageAgent", "function_call"),
        ("TriageAgent", "function_call_output"),
        ("BillingAgent", "message"),
    ]


async def test_without_hooks_the_default_agent_is_recorded(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    plain = ConvlogSession.from_url("default_author", url=log_url)
    named = ConvlogSession.from_url("named_author", url=log_url, agent="SupportBot")
    try:
        fake_openai.script([text("one"), text("two")])
        await Runner.run(Agent(name="test"), "hi", session=plain, run_config=run_config)
        await Runner.run(Agent(name="test"), "hi", session=named, run_config=run_config)
        await named.add_items([{"role": "system", "content": "policy"}])
        assert [e.agent for e in await log_client.items("default_author")] == ["user", "assistant"]
        assert [e.agent for e in await log_client.items("named_author")] == ["user", "SupportBot", "system"]
    finally:
        await plain.close()
        await named.close()


# -- rewinds: pop_item then add_items (SDK issue #3852) -----------------------


async def test_pop_then_re_add_restores_the_visible_history(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    session = new_session("rewind")
    user = {"role": "user", "content": "I need help with my billing."}
    reply = {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Sure.", "annotations": []}]}
    await session.add_items([user, reply])
    # The SDK rewinds a turn newest-first, then re-adds what it still wants.
    assert await session.pop_item() == reply
    assert await session.pop_item() == user
    assert await session.get_items() == []
    await session.add_items([user])  # equal content: must be written again, not "deduplicated"
    assert await session.get_items() == [user]
    await session.add_items([reply])
    assert await session.get_items() == [user, reply]
    raw = await log_client.items("rewind")
    assert [e.kind for e in raw] == ["item", "item", "retract", "retract", "item", "item"]


async def test_sdk_rewind_helper_pops_exactly_the_turn(
    new_session: Callable[..., ConvlogSession],
) -> None:
    persistence = pytest.importorskip("agents.run_internal.session_persistence")
    session = new_session("sdk_rewind")
    earlier = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "kept"}]
    turn = [{"role": "user", "content": "Hi, I was charged twice."}]
    await session.add_items(earlier + turn)
    await persistence.rewind_session_items(session, turn)
    assert await session.get_items() == earlier
    await session.add_items(turn)  # the retry persists its input again
    assert await session.get_items() == earlier + turn


class _InterleavedPop(ConvlogSession):
    """A second process appends just before this session's first pop (a real write, real timing)."""

    other: LogClient
    fired = False

    async def pop_item(self, *, wrapper: Any = None) -> dict[str, Any] | None:
        if not self.fired:
            self.fired = True
            await self.other.append(self.session_id, [{"agent": "OtherProcess", "data": {
                "role": "user", "content": "written by another process"}}])
        return await super().pop_item(wrapper=wrapper)


async def test_sdk_rewind_that_meets_another_writer_restores_what_it_popped(
    log_client: LogClient,
) -> None:
    # The SDK checks the tail, pops, and on a mismatch re-adds what it popped
    # (_restore_popped_session_items): the history must come back exactly.
    persistence = pytest.importorskip("agents.run_internal.session_persistence")
    session = _InterleavedPop("rewind_race", client=log_client)
    session.other = log_client
    turn = [{"role": "user", "content": "mine"}]
    await session.add_items(turn)
    await persistence.rewind_session_items(session, turn)
    assert contents(await session.get_items()) == ["mine", "written by another process"]


@pytest.mark.parametrize("streamed", [False, True])
async def test_model_retry_keeps_the_user_turn(
    streamed: bool, new_session: Callable[..., ConvlogSession], fake_openai: FakeOpenAI,
    run_config: RunConfig,
) -> None:
    # SDK issue #3852: a model call that failed once and was retried lost the user's input.
    session = new_session("retry_turn")
    agent = Agent(
        name="test",
        model_settings=ModelSettings(retry=ModelRetrySettings(
            max_retries=2, backoff={"initial_delay": 0.0, "jitter": False},
            policy=retry_policies.http_status([500]),
        )),
    )
    fake_openai.script([error(500, "try again"), text("Here to help.")])
    if streamed:
        result: Any = Runner.run_streamed(agent, "Hi there!", session=session, run_config=run_config)
        async for _ in result.stream_events():
            pass
    else:
        result = await Runner.run(agent, "Hi there!", session=session, run_config=run_config)
    assert result.final_output == "Here to help."
    assert len(fake_openai.requests) == 2
    stored = await session.get_items()
    assert stored[0] == {"role": "user", "content": "Hi there!"}
    assert [assistant_text(i) for i in stored[1:]] == ["Here to help."]


# -- audit ----------------------------------------------------------------------


async def test_audit_replay_still_shows_popped_and_cleared_items(
    new_session: Callable[..., ConvlogSession], log_client: LogClient
) -> None:
    session = new_session("audit")
    await session.add_items([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    await session.pop_item()
    await session.add_items([{"role": "assistant", "content": "c"}])
    await session.clear_session()
    await session.add_items([{"role": "user", "content": "d"}])
    assert contents(await session.get_items()) == ["d"]
    raw = await log_client.items("audit", raw=True)
    assert [(e.item_order, e.kind, e.data.get("content", e.data.get("target"))) for e in raw] == [
        (1, "item", "a"), (2, "item", "b"), (3, "retract", 2), (4, "item", "c"),
        (5, "clear", None), (6, "item", "d"),
    ]
    assert verify(raw, session_id="audit") is None  # contiguous, hash chain intact


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
