"""The Agents SDK's Runner with ``ConvlogSession`` (``run``, ``run_sync``,
``run_streamed``) against a real nats-server, the real log service and SQLite:
memory across turns, isolation, input callbacks, limits; then what is convlog's
own: authors per agent, pop-then-add rewinds (SDK issue #3852), and audit replay
that still shows what ``pop_item``/``clear_session`` hid.  Only the model is fake:
the SDK's ``OpenAIResponsesModel`` talks to the loopback server in
``tests/support/fake_openai.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from agents import (
    Agent,
    ModelRetrySettings,
    ModelSettings,
    RunConfig,
    Runner,
    RunState,
    SessionSettings,
    function_tool,
    handoff,
    retry_policies,
)

from shared import ConvlogSession
from shared.chain import verify
from shared.client import LogClient
from shared.errors import UnavailableError
from tests.support.fake_openai import FakeOpenAI, error, text, tool_call
from tests.support.natsd import NatsServer
from tests.support.sdk_env import contents


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


def model_input(fake: FakeOpenAI, index: int = -1) -> list[dict[str, Any]]:
    """The ``input`` list of a request the SDK sent to the (fake) model."""
    return fake.requests[index]["input"]


def assistant_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    return content if isinstance(content, str) else content[0]["text"]


RUNNER_METHODS = ["run", "run_sync", "run_streamed"]

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


async def test_a_sync_app_closing_with_asyncio_run_drains_the_run_sync_connection(
    log_url: str, log_client: LogClient, fake_openai: FakeOpenAI, run_config: RunConfig
) -> None:
    # A plain sync program: Runner.run_sync (which keeps the thread's default loop open
    # between runs), then asyncio.run(session.close()) on a loop of its own.
    session = ConvlogSession.from_url("sync_app_close", url=log_url)
    used: list[LogClient] = []

    def sync_app() -> None:
        fake_openai.script([text("one"), text("two")])
        Runner.run_sync(Agent(name="test"), "hi", session=session, run_config=run_config)
        Runner.run_sync(Agent(name="test"), "again", session=session, run_config=run_config)
        assert session.client is not None
        used.append(session.client)
        asyncio.run(session.close())

    await asyncio.to_thread(sync_app)
    stored = [e.data for e in await log_client.items("sync_app_close")]
    assert [i["content"] for i in stored if i.get("role") == "user"] == ["hi", "again"]
    # README: "the last `await session.close()` drains it" -- not left open on the idle loop.
    assert used[0].nc.is_closed
    infos = await log_client.nc.jetstream().consumers_info("CONVLOG_ITEMS")
    assert [i.name for i in infos if i.name.startswith("convlog-copy-")] == []  # the copy stopped too


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


@function_tool(needs_approval=True)
def issue_refund(amount: int) -> str:
    """Refund ``amount``."""
    return f"refunded {amount}"


@pytest.mark.parametrize("serialized", [False, True])
async def test_hooks_name_the_author_of_an_approved_tools_output_after_a_resume(
    serialized: bool, new_session: Callable[..., ConvlogSession], log_client: LogClient,
    fake_openai: FakeOpenAI, run_config: RunConfig,
) -> None:
    # Human in the loop: the run stops for approval, then resumes (in this process, or
    # from the RunState's JSON as another process would).  The resumed run executes the
    # approved tool and saves its output before any agent or LLM start of its own.
    session = new_session("approval_authors")
    billing = Agent(name="BillingAgent", instructions="Handle billing.", tools=[issue_refund])
    fake_openai.script([tool_call("issue_refund", {"amount": 5}), text("Refund issued.")])
    first = await Runner.run(billing, "Refund me", session=session, hooks=session.hooks(),
                             run_config=run_config)
    assert len(first.interruptions) == 1
    state = first.to_state()
    if serialized:
        state = await RunState.from_json(billing, state.to_json())
    state.approve(state.get_interruptions()[0])
    resumed = await Runner.run(billing, state, session=session, hooks=session.hooks(),
                               run_config=run_config)
    assert resumed.final_output == "Refund issued."
    authored = [(e.agent, e.data.get("type") or e.data.get("role"))
                for e in await log_client.items("approval_authors")]
    assert authored == [
        ("user", "user"),
        ("BillingAgent", "function_call"),
        ("BillingAgent", "function_call_output"),  # was the default "assistant"
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
