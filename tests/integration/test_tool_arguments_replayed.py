"""A tool call whose arguments are not JSON does not poison the session's later requests.

The model may write anything as a call's ``arguments``; the worker answers such a call
with an ``error:`` output and asks the model again, with the call in the history.  It
sent the arguments back as they were, and an OpenAI-compatible server that parses the
arguments of the calls in the history (vLLM turns them into the dicts chat templates
expect, with ``json.loads``, and answers 500 when that fails) refused every later
request of the session while the call was in the window: the turn, and every next one,
ended "failed to answer".  The fake OpenAI server here answers as such a server does.
"""

from __future__ import annotations

import json
from typing import Any

from tests.fault.test_tool_once import Tool, worker
from tests.support.fake_openai import Entry, FakeOpenAI, error, text, tool_call
from tests.support.workerstack import WorkerStack, is_user, terminal_items, user_texts


def _arguments_parse(request: dict[str, Any]) -> bool:
    """Whether every call in the request's history has a JSON object as arguments."""
    for message in request["messages"]:
        for call in message.get("tool_calls") or []:
            try:
                if not isinstance(json.loads(call["function"]["arguments"]), dict):
                    return False
            except ValueError:
                return False
    return True


async def test_a_call_with_arguments_that_are_not_json_leaves_the_next_requests_valid(
    stack: WorkerStack, fake_openai: FakeOpenAI
) -> None:
    def strict(request: dict[str, Any]) -> Entry:
        if not _arguments_parse(request):
            return error(500, "JSONDecodeError: Expecting value: line 1 column 1 (char 0)")
        if not any(m["role"] == "tool" for m in request["messages"]):
            return tool_call("charge", "amount: 7.5")  # not JSON
        return text(f"answered: {user_texts(request)[-1]}")

    fake_openai.responder(strict)
    await stack.start_workers(worker(stack, Tool(stack.tmp)))
    await stack.send("args", "pay")
    await stack.answered("args", users=1, timeout=20)
    await stack.send("args", "and now?")
    log = await stack.answered("args", users=2, timeout=20)

    outputs = [e.data["output"] for e in log if e.data.get("type") == "function_call_output"]
    assert len(outputs) == 1 and outputs[0].startswith("error: the arguments of charge are not valid JSON")
    # The call is stored as the model wrote it; only the requests carry it as {}.
    assert [e.data["arguments"] for e in log if e.data.get("type") == "function_call"] == ["amount: 7.5"]
    ends = [terminal_items(log, u) for u in log if is_user(u)]
    assert [[_text(e.data["content"]) for e in end] for end in ends] == [
        ["answered: pay"], ["answered: and now?"]]


def _text(content: Any) -> str:
    """A reply's text, or a ``system`` item's (a turn that failed)."""
    return content if isinstance(content, str) else content[0]["text"]
