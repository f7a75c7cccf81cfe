"""A worker's turn at its edges, against the real log service and the fake model (the
turn runner in-process); each a bug once (found in a review): a tool result that cannot
be stored (not JSON, a lone surrogate) is an ``error:`` output, not a redelivered turn
that runs the tool again; a history limit the log cannot serve is refused with the
spec; a model refusal is the reply's text, not an empty reply; more tool calls in one
response than ids allow end the turn with a ``fail`` item; a window over one read's reply
limit is cut to the newest items that fit, not a turn that can never end."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.worker.model import make_model_client
from services.worker.spec import SpecError, parse_spec
from services.worker.tools import run_tool
from services.worker.turn import TurnPart, TurnRunner
from services.worker.turn_ids import turn_key
from shared.errors import BadRequestError
from shared.messages import AppendItem
from tests.support import odd_tools, openai_wire
from tests.support.eventually import assert_eventually
from tests.support.fake_openai import Body, FakeOpenAI, text, tool_call
from tests.support.workerstack import WorkerStack, solo_spec, terminal_items

TOOL_SPEC = """
entry = "Clerk"

[[agents]]
name = "Clerk"
instructions = "Use your tool."
tools = ["tests.support.odd_tools:{tool}"]
"""


async def _part(stack: WorkerStack, sid: str, msg: str) -> TurnPart:
    ack = await stack.send(sid, msg)
    return TurnPart(sid, turn_key(ack.items[0].item_id), ack.items[0].item_order)


@contextlib.asynccontextmanager
async def _clerk(stack: WorkerStack, fake_openai: FakeOpenAI, tool: str,
                 session_id: str) -> AsyncIterator[tuple[TurnRunner, TurnPart]]:
    """Agent Clerk's turn runner (TOOL_SPEC with ``tool``) on the fake model server, and
    the part of ``session_id``'s turn for the user message "go"; odd_tools.RUNS cleared."""
    spec = parse_spec(TOOL_SPEC.format(tool=tool))
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    try:
        runner = TurnRunner(stack.client, spec.agent("Clerk"), model)
        part = await _part(stack, session_id, "go")
        odd_tools.RUNS.clear()
        yield runner, part
    finally:
        await model.client.close()


@pytest.mark.parametrize("tool", ["tuple_keys", "file_name", "missing_file"])
async def test_a_tool_result_that_cannot_be_stored_becomes_an_error_output(
    stack: WorkerStack, fake_openai: FakeOpenAI, tool: str
) -> None:
    # tools.py: "Every failure of a tool ... becomes the output the model sees, starting
    # with error:".  A dict with non-str keys (json.dumps raises TypeError) or a str with a
    # lone surrogate (os.fsdecode of a non-UTF-8 name; the append's encoder raises), in a
    # result or in the message of the exception a tool raises, escapes run_tool: the turn
    # raises, is redelivered, and the tool runs again each time.
    fake_openai.script([tool_call(tool, {"n": 2}), text("done")])
    async with _clerk(stack, fake_openai, tool, f"r10-{tool.replace('_', '-')}") as (runner, part):
        result = await runner.run(part)
        assert result.outcome == "replied"
        log = await stack.log(part.session_id)
        (out,) = [e for e in log if e.data.get("type") == "function_call_output"]
        assert isinstance(out.data["output"], str)
        assert odd_tools.RUNS == [2]


async def test_run_tool_never_raises_for_a_result_json_cannot_encode() -> None:
    spec = parse_spec(TOOL_SPEC.format(tool="tuple_keys"))
    out = await run_tool("Clerk", spec.agent("Clerk").tool_for("tuple_keys"), "tuple_keys", '{"n": 1}',
                         key="k", time_limit=5)
    assert isinstance(out, str)


HUGE_WINDOW = """
entry = "Solo"

[[agents]]
name = "Solo"
instructions = "Answer the user."
history_limit = 200000
"""


async def test_a_history_limit_the_log_cannot_serve_is_refused_or_still_answers(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # spec.py puts no upper bound on history_limit, but a read's tail is at most 100,000
    # (shared.messages.ReadRequest): every read of the window is bad_request, and so is the
    # fail item's (_give_up reads first too): no turn is ever answered.
    try:
        spec = parse_spec(HUGE_WINDOW)
    except SpecError:
        return  # refused at startup: fine
    fake_openai.script([text("hello")])
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Solo"), model)
    part = await _part(stack, "r10-window", "hi")
    try:
        try:
            result = await runner.run(part)
        except BadRequestError:
            # what NoticeHandler._give_up does after max_attempts: it cannot end the turn either
            result = await runner.run(part, fail_reason="internal error")
        assert result.outcome in ("replied", "failed")
    finally:
        await model.client.close()


async def test_a_refusal_is_not_stored_as_an_empty_reply(
    stack: WorkerStack, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Chat Completions refusal comes as content null + message.refusal (OpenAI's
    # structured-output / safety refusals).  model._Message does not read `refusal`, so the
    # turn's terminal reply is "" and what the model said is lost.
    plain = openai_wire.chat_completion

    def refusing(reply: Any, model: str, n: int) -> dict[str, Any]:
        doc = plain(reply, model, n)
        message = doc["choices"][0]["message"]
        message["content"], message["refusal"] = None, "I can't help with that."
        return doc

    monkeypatch.setattr(openai_wire, "chat_completion", refusing)
    spec = parse_spec(HUGE_WINDOW.replace("history_limit = 200000", ""))
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Solo"), model)
    part = await _part(stack, "r10-refusal", "do something bad")
    try:
        result = await runner.run(part)
        assert result.outcome == "replied"
        log = await stack.log(part.session_id)
        (reply,) = terminal_items(log, log[0])
        assert "I can't help with that." in str(reply.data["content"])
    finally:
        await model.client.close()


async def test_a_reply_with_a_thousand_and_one_tool_calls_ends_the_turn_cleanly(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # turn_ids allows call0..call999; _items_for names the i-th call call<i> for every i, so
    # a reply with 1,001 calls (a looping model) raises ValueError out of the turn: the
    # delivery is retried (the model asked again each time) until max_attempts gives up.
    from tests.support.fake_openai import tool_calls

    spec = parse_spec(TOOL_SPEC.format(tool="quick"))
    fake_openai.script([tool_calls(*[tool_call("quick", {"n": i}) for i in range(1001)]), text("done")])
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Clerk"), model, tool_timeout=1)
    part = await _part(stack, "r10-many", "go")
    try:
        result = await runner.run(part)
        # turn.py: more than MAX_CALLS_PER_STEP calls end the turn with a fail item, no call run.
        assert result.outcome == "failed"
        log = await stack.log(part.session_id)
        (fail,) = terminal_items(log, log[0])
        assert fail.agent == "system" and "1001 tool calls" in str(fail.data["content"]), fail.data
        assert not [e for e in log if e.data.get("type") in ("function_call", "function_call_output")]
        assert len(fake_openai.requests) == 1  # not asked again
    finally:
        await model.client.close()


async def test_a_window_over_one_reads_limit_is_cut_not_stuck(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # Each message is within the item limit (256 KiB), but the session's last 50 visible
    # items are over the 1 MiB reply limit: the window's tail read is too_large, every
    # time, the fail item's too (_give_up reads first): the session's turns never ended.
    spec = parse_spec(HUGE_WINDOW.replace("history_limit = 200000", ""))
    fake_openai.script([text("read it")])
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Solo"), model)
    sid = "r11-big-window"
    for i in range(6):
        await stack.client.append(sid, [AppendItem(agent="user", data={
            "role": "user", "content": f"log {i}: " + "x" * 200_000}, item_id=f"noturn:{i}")])
    part = await _part(stack, sid, "what went wrong?")
    try:
        result = await runner.run(part)
        assert result.outcome == "replied"
        (request,) = fake_openai.requests
        assert request["messages"][-1]["content"] == "what went wrong?"  # the newest items are kept
    finally:
        await model.client.close()


async def test_a_worker_answers_a_session_whose_window_is_over_one_reads_limit(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # The same through a worker process (its first read is parts.PartFinder's).
    fake_openai.responder(lambda r: text("read it"))
    await stack.start_workers(stack.worker("Solo", solo_spec(stack.tmp / "solo.toml")))
    sid = "r11-big-window-worker"
    for i in range(6):
        await stack.client.append(sid, [AppendItem(agent="user", data={
            "role": "user", "content": f"log {i}: " + "x" * 200_000}, item_id=f"noturn:{i}")])
    await stack.send(sid, "what went wrong?")

    async def answered() -> list[Any]:
        log = await stack.log(sid)
        assert len(log) >= 7 and terminal_items(log, log[6]), stack.outputs()[-2000:]
        return terminal_items(log, log[6])

    (reply,) = await assert_eventually(answered, timeout=15)
    assert reply.data["content"][0]["text"] == "read it"


@pytest.mark.parametrize(("tool", "raised"), [
    ("exits", "SystemExit: 0"), ("exits_async", "SystemExit: 0"),
    ("interrupts", "KeyboardInterrupt: "), ("interrupts_async", "KeyboardInterrupt: "),
])
async def test_a_tool_that_raises_system_exit_or_keyboard_interrupt_becomes_an_error_output(
    stack: WorkerStack, fake_openai: FakeOpenAI, tool: str, raised: str
) -> None:
    # README "Function tools": every exception a tool raises becomes an `error: ...` output.
    # SystemExit (argparse refusing arguments, a sys.exit deep in a library) is not an
    # Exception: it escaped run_tool and the turn, and ended the worker's event loop -- the
    # process exited with the tool's status (0 here: a process manager restarting only on
    # failure left the agent down), and a restarted worker ran the tool again, forever.
    # Nor is KeyboardInterrupt: the worker handles SIGINT itself (a graceful shutdown), so
    # one in a tool is the tool's own; it ended the worker (exit 130), and every replica
    # the delivery came back to ran the tool and died the same way.
    spec = stack.tmp / "clerk.toml"
    spec.write_text(TOOL_SPEC.format(tool=tool), encoding="utf-8")
    fake_openai.script([tool_call(tool, {"n": 0}), text("done")])
    (worker,) = await stack.start_workers(stack.worker("Clerk", spec))
    sid = f"raise-{tool.replace('_', '-')}"
    await stack.send(sid, "go")

    async def answered() -> list[Any]:
        assert worker.running, worker.output()
        return await stack.answered(sid, users=1, timeout=0.5)

    log = await assert_eventually(answered, timeout=20)
    (out,) = [e for e in log if e.data.get("type") == "function_call_output"]
    assert out.data["output"] == f"error: {tool} failed: {raised}"
    assert [e.data["content"][0]["text"] for e in terminal_items(log, log[0])] == ["done"]
    assert worker.running, worker.output()


@pytest.mark.parametrize("body", [
    b'{"choices": [{"message": {"content": "cut sh',  # truncated
    b'{"choices": [], "junk": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nested past msgspec's limit
], ids=["truncated", "nested"])
async def test_a_2xx_answer_that_is_no_chat_completion_ends_the_turn_at_once(
    stack: WorkerStack, fake_openai: FakeOpenAI, body: bytes
) -> None:
    # model._to_reply: "a 2xx body that is not a Chat Completions answer" is ModelRejected,
    # so the turn ends with one system item.  JSON nested too deeply made msgspec raise
    # RecursionError, not DecodeError: it escaped the model client, the turn raised, and the
    # worker asked the model again on each of max_attempts redeliveries before giving up.
    spec = parse_spec(HUGE_WINDOW.replace("history_limit = 200000", ""))
    fake_openai.script([Body(body)])
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Solo"), model)
    part = await _part(stack, f"r45-garbage-{len(body)}", "hello")
    try:
        result = await runner.run(part)
        assert (result.outcome, result.model_calls) == ("failed", 1)
        log = await stack.log(part.session_id)
        (fail,) = terminal_items(log, log[0])
        assert fail.agent == "system" and "no chat completion" in fail.data["content"]
    finally:
        await model.client.close()


async def test_tool_arguments_nested_too_deeply_become_an_error_output(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # tools.py: "Every failure of a tool (..., bad arguments from the model) becomes the
    # output the model sees".  json.loads raises RecursionError, not ValueError, for
    # arguments nested past the interpreter's recursion limit: it escaped run_tool, the
    # turn raised and was redelivered, the same committed call failed again every time,
    # and only the give-up after max_attempts ended the turn.
    deep = '{"n": ' + "[" * 5000 + "]" * 5000 + "}"
    fake_openai.script([tool_call("quick", deep), text("done")])
    async with _clerk(stack, fake_openai, "quick", "r45-deep-args") as (runner, part):
        result = await runner.run(part)
        assert (result.outcome, result.model_calls) == ("replied", 2)
        log = await stack.log(part.session_id)
        (out,) = [e for e in log if e.data.get("type") == "function_call_output"]
        assert out.data["output"].startswith("error: the arguments of quick are not valid JSON")
        assert odd_tools.RUNS == []


@pytest.mark.parametrize("message", [
    {"content": None},
    {"content": ""},
    {"content": " \n"},
    {"content": None, "reasoning_content": "The user wants... (cut off at max_tokens)"},
    None,  # no choices at all
], ids=["null", "empty", "blank", "reasoning-only", "no-choices"])
async def test_a_model_answer_with_no_text_and_no_tool_call_ends_the_turn_with_a_fail_item(
    stack: WorkerStack, fake_openai: FakeOpenAI, message: dict[str, Any] | None
) -> None:
    # Content null (or empty) and no tool calls -- a reasoning model that spent max_tokens
    # thinking (only reasoning_content), a server answering no choices -- was stored as the
    # turn's terminal reply with the text "": the user got a blank answer and nothing said
    # the model had failed.  Now it is a model failure: a system item naming the agent.
    doc: dict[str, Any] = {"id": "x", "object": "chat.completion", "model": "m", "choices": []}
    if message is not None:
        doc["choices"] = [{"index": 0, "message": {"role": "assistant", **message},
                           "finish_reason": "length"}]
    fake_openai.script([Body(json.dumps(doc).encode())])
    spec = parse_spec(HUGE_WINDOW.replace("history_limit = 200000", ""))
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Solo"), model)
    part = await _part(stack, "r56-empty", "hello")
    try:
        result = await runner.run(part)
        assert (result.outcome, result.model_calls) == ("failed", 1)
        log = await stack.log(part.session_id)
        (fail,) = terminal_items(log, log[0])
        assert fail.agent == "system", fail.data
        assert fail.data["content"] == "Solo failed to answer: the model answered with no text and no tool call"
    finally:
        await model.client.close()


@pytest.mark.parametrize("content,expected", [
    ([{"type": "text", "text": "Hello, "}, {"type": "text", "text": "how can I help?"}],
     "Hello, how can I help?"),
    ([{"type": "thinking", "thinking": [{"type": "text", "text": "The user greets me."}]},
      {"type": "text", "text": "Hi!"}], "Hi!"),
    ([], None),
], ids=["text-parts", "thinking-then-text", "empty-list"])
async def test_a_content_given_as_a_list_of_parts_is_the_replys_text(
    stack: WorkerStack, fake_openai: FakeOpenAI, content: list[Any], expected: str | None
) -> None:
    # Some OpenAI-compatible servers (Mistral's, reasoning models behind proxies) answer
    # message.content as a list of parts.  model._Message declared it a str: the answer
    # failed to decode and the turn ended with "model endpoint answered with no chat
    # completion: Expected `str | null`, got `array`" although the model had answered.
    doc = {"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
    fake_openai.script([Body(json.dumps(doc).encode())])
    spec = parse_spec(HUGE_WINDOW.replace("history_limit = 200000", ""))
    model = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, spec.agent("Solo"), model)
    part = await _part(stack, "r56-parts", "hello")
    try:
        result = await runner.run(part)
        log = await stack.log(part.session_id)
        (last,) = terminal_items(log, log[0])
        if expected is None:  # nothing said: a model failure, not a decoding error
            assert result.outcome == "failed"
            assert last.data["content"].endswith("the model answered with no text and no tool call")
        else:
            assert result.outcome == "replied"
            assert last.data["content"][0]["text"] == expected
    finally:
        await model.client.close()


async def test_a_tool_call_whose_id_is_null_is_run_under_an_id_the_worker_derives(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # Some OpenAI-compatible servers send "id": null on a tool call.  The worker names a
    # call with no id itself (turn._items_for), but model._Call declared id a str: the
    # answer did not decode and the turn ended with "model endpoint answered with no chat
    # completion: Expected `str`, got `null`", the tool never run.
    call = {"id": None, "type": "function", "function": {"name": "quick", "arguments": '{"n": 7}'}}
    doc = {"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
         "finish_reason": "tool_calls"}]}
    fake_openai.script([Body(json.dumps(doc).encode()), text("done")])
    async with _clerk(stack, fake_openai, "quick", "r56-null-id") as (runner, part):
        result = await runner.run(part)
        assert (result.outcome, result.model_calls) == ("replied", 2)
        log = await stack.log(part.session_id)
        (fc,) = [e for e in log if e.data.get("type") == "function_call"]
        (out,) = [e for e in log if e.data.get("type") == "function_call_output"]
        assert fc.data["call_id"] == out.data["call_id"] == f"call_{part.turn}.Clerk.1.0"
        assert out.data["output"] == "quick 7" and odd_tools.RUNS == [7]


SMALL_WINDOW = """
entry = "Clerk"

[[agents]]
name = "Clerk"
instructions = "Use your tool."
tools = ["tests.support.odd_tools:quick"]
history_limit = {limit}
"""


async def test_a_call_id_the_server_reuses_is_unique_in_the_turn_beyond_the_window(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    # A server that names every tool call "call_0" (some do).  turn._items_for renamed a
    # reused id only when the window held it: with a window of 3 items, step 4's call was
    # stored as "call_0" again, a second pair under step 1's id.  A reader with a larger
    # window (another agent, the Agents SDK session) pairs outputs by call_id: convert
    # gave step 1's output to the first call and dropped step 4's call and output, so the
    # next model saw a turn with one tool run fewer than it had.
    fake_openai.script([tool_call("quick", {"n": n}, call_id="call_0") for n in range(1, 5)]
                       + [text("done"), text("again")])
    small = make_model_client("test", fake_openai.base_url, max_retries=0)
    runner = TurnRunner(stack.client, parse_spec(SMALL_WINDOW.format(limit=3)).agent("Clerk"), small)
    part = await _part(stack, "r56-reused-ids", "go")
    try:
        assert (await runner.run(part)).outcome == "replied"
        log = await stack.log(part.session_id)
        ids = [e.data["call_id"] for e in log if e.data.get("type") == "function_call"]
        assert len(ids) == 4 and len(set(ids)) == 4, ids
        # The next turn, read with the default window, shows the model every run.
        wide = TurnRunner(stack.client, parse_spec(SMALL_WINDOW.format(limit=50)).agent("Clerk"), small)
        assert (await wide.run(await _part(stack, "r56-reused-ids", "and?"))).outcome == "replied"
        tool_messages = [m["content"] for m in fake_openai.requests[-1]["messages"] if m["role"] == "tool"]
        assert tool_messages == ["quick 1", "quick 2", "quick 3", "quick 4"]
    finally:
        await small.client.close()
