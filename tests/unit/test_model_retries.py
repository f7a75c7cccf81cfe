"""OpenAIChatModel against a real loopback OpenAI-compatible server: replies, retries, errors."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import openai
import pytest

from services.worker.model import (
    ModelClient,
    ModelRejected,
    ModelReply,
    ModelUnavailable,
    OpenAIChatModel,
    ToolCall,
    make_model_client,
    parse_retry_after,
)
from services.worker.rules_model import RULES_MODEL_NAME
from tests.support.fake_openai import (
    FakeOpenAI,
    disconnect,
    error,
    slow,
    text,
    tool_call,
    tool_calls,
)

MESSAGES = [{"role": "system", "content": "You are Triage."}, {"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "route_to_billing", "parameters": {}}}]


class Sleeps:
    """Records the backoff waits instead of sleeping them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def client_for(fake: FakeOpenAI) -> openai.AsyncOpenAI:
    # max_retries=5 on purpose: OpenAIChatModel must switch the client's own retries off.
    return openai.AsyncOpenAI(base_url=fake.base_url, api_key="test-key", max_retries=5)


def model_for(fake: FakeOpenAI, sleeps: Sleeps, **kwargs: float) -> OpenAIChatModel:
    options = {"max_retries": 4, "base_delay": 0.5, "max_delay": 20.0} | kwargs
    return OpenAIChatModel(client_for(fake), sleep=sleeps, rng=lambda: 0.5, **options)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_text_reply(fake_openai: FakeOpenAI) -> None:
    fake_openai.script([text("Hello there")])
    model = model_for(fake_openai, Sleeps())
    assert isinstance(model, ModelClient)

    reply = await model.complete(model="gpt-4o-mini", messages=MESSAGES, tools=[])

    assert reply == ModelReply(text="Hello there", tool_calls=[], model="gpt-4o-mini")
    (request,) = fake_openai.requests
    assert request["model"] == "gpt-4o-mini"
    assert request["messages"] == MESSAGES
    assert "tools" not in request  # an empty tools array is refused by the real API


async def test_tool_call_reply(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        [
            tool_calls(
                tool_call("route_to_billing", {}, call_id="call_1"),
                tool_call("issue_refund", {"amount": 5}, call_id="call_2"),
            )
        ]
    )
    reply = await model_for(fake_openai, Sleeps()).complete(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS
    )
    assert reply.text is None
    assert reply.tool_calls == [
        ToolCall(id="call_1", name="route_to_billing", arguments="{}"),
        ToolCall(id="call_2", name="issue_refund", arguments='{"amount": 5}'),
    ]
    assert fake_openai.requests[0]["tools"] == TOOLS


async def test_429_honours_retry_after(fake_openai: FakeOpenAI) -> None:
    fake_openai.script([error(429, retry_after=1.5), error(429, retry_after=0), text("ok")])
    sleeps = Sleeps()

    reply = await model_for(fake_openai, sleeps).complete(model="m", messages=MESSAGES, tools=[])

    assert reply.text == "ok"
    assert sleeps.delays == [1.5, 0.0]  # the server's waits, exactly, no backoff added
    assert len(fake_openai.requests) == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
async def test_retryable_statuses_back_off_exponentially(
    fake_openai: FakeOpenAI, status: int
) -> None:
    fake_openai.script([error(status), error(status), error(status), text("recovered")])
    sleeps = Sleeps()

    reply = await model_for(fake_openai, sleeps).complete(model="m", messages=MESSAGES, tools=[])

    assert reply.text == "recovered"
    # base 0.5 doubling, equal jitter with rng=0.5: 3/4 of each ceiling.
    assert sleeps.delays == [0.375, 0.75, 1.5]


async def test_backoff_is_capped_and_jittered(fake_openai: FakeOpenAI) -> None:
    fake_openai.script([error(500)] * 4 + [text("ok")])
    low, high = Sleeps(), Sleeps()
    client = client_for(fake_openai)
    await OpenAIChatModel(client, 4, 1.0, 3.0, sleep=low, rng=lambda: 0.0).complete(
        model="m", messages=MESSAGES, tools=[]
    )
    fake_openai.script([error(500)] * 4 + [text("ok")])
    await OpenAIChatModel(client, 4, 1.0, 3.0, sleep=high, rng=lambda: 0.999999).complete(
        model="m", messages=MESSAGES, tools=[]
    )
    assert low.delays == [0.5, 1.0, 1.5, 1.5]  # half of min(3, 1, 2, 4, 8)
    assert high.delays == pytest.approx([1.0, 2.0, 3.0, 3.0])


async def test_exhausted_retries_raise_model_unavailable(fake_openai: FakeOpenAI) -> None:
    fake_openai.script([error(503)] * 10)
    sleeps = Sleeps()
    model = model_for(fake_openai, sleeps, max_retries=2)

    with pytest.raises(ModelUnavailable) as info:
        await model.complete(model="m", messages=MESSAGES, tools=[])

    err = info.value
    assert (err.attempts, err.last_status, err.retry_after) == (3, 503, None)
    assert str(err) == "model endpoint unavailable after 3 attempt(s); last: HTTP 503"
    # Exactly 1 + max_retries requests: the client's own retries (5) are disabled.
    assert len(fake_openai.requests) == 3
    assert len(sleeps.delays) == 2


async def test_retry_after_longer_than_the_cap_gives_up_at_once(fake_openai: FakeOpenAI) -> None:
    fake_openai.script([error(429, retry_after=120), text("never")])
    sleeps = Sleeps()

    with pytest.raises(ModelUnavailable) as info:
        await model_for(fake_openai, sleeps, max_delay=20).complete(
            model="m", messages=MESSAGES, tools=[]
        )

    assert info.value.retry_after == 120
    assert info.value.last_status == 429
    assert "Retry-After 120s" in str(info.value)
    assert sleeps.delays == [] and len(fake_openai.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_non_retryable_4xx_raise_immediately(fake_openai: FakeOpenAI, status: int) -> None:
    fake_openai.script([error(status, "nope, bad request"), text("never")])
    sleeps = Sleeps()

    with pytest.raises(ModelRejected) as info:
        await model_for(fake_openai, sleeps).complete(model="m", messages=MESSAGES, tools=[])

    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value) and "nope, bad request" in str(info.value)
    assert isinstance(info.value.__cause__, openai.APIStatusError)
    assert len(fake_openai.requests) == 1 and sleeps.delays == []


async def test_dropped_connection_is_retried(fake_openai: FakeOpenAI) -> None:
    fake_openai.script([disconnect(), text("back")])
    sleeps = Sleeps()
    reply = await model_for(fake_openai, sleeps).complete(model="m", messages=MESSAGES, tools=[])
    assert reply.text == "back"
    assert len(sleeps.delays) == 1


async def test_timeout_is_retried(fake_openai: FakeOpenAI) -> None:
    fake_openai.script([slow(5), text("fast now")])
    model = OpenAIChatModel(client_for(fake_openai), timeout=0.3, sleep=Sleeps())
    reply = await model.complete(model="m", messages=MESSAGES, tools=[])
    assert reply.text == "fast now"
    assert len(fake_openai.requests) == 2


async def test_unreachable_server_raises_model_unavailable() -> None:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{unused_port()}/v1", api_key="k")
    sleeps = Sleeps()
    with pytest.raises(ModelUnavailable) as info:
        await OpenAIChatModel(client, max_retries=2, sleep=sleeps).complete(
            model="m", messages=MESSAGES, tools=[]
        )
    assert (info.value.attempts, info.value.last_status) == (3, None)
    assert "last: connection error" in str(info.value)
    assert len(sleeps.delays) == 2


def test_parse_retry_after() -> None:
    now = datetime(2026, 3, 14, 9, 30, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)

    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5  # ms wins
    assert parse_retry_after({"retry-after-ms": "junk", "retry-after": "9"}) == 9.0
    assert parse_retry_after({"retry-after": later}, now=now.timestamp()) == 30.0
    assert parse_retry_after({"retry-after": earlier}, now=now.timestamp()) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None


def test_constructor_validates() -> None:
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="k")
    with pytest.raises(ValueError):
        OpenAIChatModel(client, max_retries=-1)
    # The wrapped client has its own retries off; the caller's client is untouched.
    model = OpenAIChatModel(client)
    assert model.client.max_retries == 0
    assert client.max_retries == 2


async def test_make_model_client_with_a_key_uses_the_given_endpoint(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.script([text("from the server")])
    model = make_model_client("sk-test", fake_openai.base_url, base_delay=0.01)

    reply = await model.complete(model="gpt-4o-mini", messages=MESSAGES, tools=[])

    assert reply.text == "from the server"
    assert fake_openai.recorded[0].headers["authorization"] == "Bearer sk-test"
    assert model.client.max_retries == 0


async def test_make_model_client_without_a_key_is_the_labelled_rules_model() -> None:
    model = make_model_client(None, "http://ignored.invalid/v1")
    reply = await model.complete(model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS)
    assert reply.model == RULES_MODEL_NAME
    assert make_model_client("").client.base_url.host == "rules-model.convlog.invalid"


async def test_a_refusal_after_a_transient_failure_is_a_refusal(fake_openai: FakeOpenAI) -> None:
    # The first attempt goes out without the retry loop; its transient failure
    # is the loop's first attempt, so what follows is judged as before.
    fake_openai.script([error(503), error(400, "bad now"), text("never")])
    sleeps = Sleeps()
    with pytest.raises(ModelRejected) as info:
        await model_for(fake_openai, sleeps).complete(model="m", messages=MESSAGES, tools=[])
    assert info.value.status == 400 and "bad now" in str(info.value)
    assert len(fake_openai.requests) == 2 and len(sleeps.delays) == 1


async def test_no_retries_allowed_makes_one_attempt(fake_openai: FakeOpenAI) -> None:
    fake_openai.script([error(503), text("never")])
    sleeps = Sleeps()
    with pytest.raises(ModelUnavailable) as info:
        await model_for(fake_openai, sleeps, max_retries=0).complete(model="m", messages=MESSAGES, tools=[])
    assert (info.value.attempts, info.value.last_status) == (1, 503)
    assert len(fake_openai.requests) == 1 and sleeps.delays == []
