"""The OpenAI wire shapes :class:`~tests.support.fake_openai.FakeOpenAI` answers with:
a Chat Completions object or its SSE chunks, a Responses API object or its SSE
event sequence, built from one scripted :class:`~tests.support.fake_openai.Reply`."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fake_openai import Reply, ToolCall

__all__ = ["call_id", "chat_chunks", "chat_completion", "response", "response_events", "response_items", "tokens"]


def tokens(value: Any) -> int:
    return max(1, len(json.dumps(value)) // 4) if value else 0


def call_id(call: ToolCall, n: int, i: int) -> str:
    return call.call_id or f"call_fake_{n}_{i}"


def chat_completion(reply: Reply, model: str, n: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": call_id(c, n, i), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(reply.tool_calls)
        ]
    elif reply.content is None:
        message["content"] = ""
    completion = tokens(reply.content) + tokens([c.arguments for c in reply.tool_calls])
    return {
        "id": f"chatcmpl-fake-{n}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if reply.tool_calls else "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": completion,
                  "total_tokens": 10 + completion},
    }


def chat_chunks(reply: Reply, model: str, n: int, include_usage: bool) -> Iterator[Any]:
    full = chat_completion(reply, model, n)
    head = {k: full[k] for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    if reply.content:
        yield chunk({"content": reply.content})
    for i, call in enumerate(full["choices"][0]["message"].get("tool_calls", [])):
        yield chunk({"tool_calls": [{"index": i, **call}]})
    yield chunk({}, full["choices"][0]["finish_reason"])
    if include_usage:
        yield {**head, "choices": [], "usage": full["usage"]}
    yield "[DONE]"


def response_items(reply: Reply, n: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if reply.content is not None or not reply.tool_calls:
        items.append({
            "type": "message", "id": f"msg_fake_{n}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": reply.content or "", "annotations": [],
                         "logprobs": []}],
        })
    for i, call in enumerate(reply.tool_calls):
        items.append({"type": "function_call", "id": f"fc_fake_{n}_{i}",
                      "call_id": call_id(call, n, i), "name": call.name,
                      "arguments": call.arguments, "status": "completed"})
    return items


def response(reply: Reply, model: str, n: int, request: dict[str, Any]) -> dict[str, Any]:
    output = response_items(reply, n)
    out_tokens = tokens(output)
    choice = request.get("tool_choice")
    return {
        "id": f"resp_fake_{n}", "object": "response", "created_at": int(time.time()),
        "status": "completed", "model": model, "output": output,
        "instructions": request.get("instructions"), "error": None, "incomplete_details": None,
        "metadata": {}, "parallel_tool_calls": True, "previous_response_id": None,
        "temperature": 1.0, "top_p": 1.0, "tools": [],
        "tool_choice": choice if isinstance(choice, str) else "auto",
        "text": {"format": {"type": "text"}}, "truncation": "disabled",
        "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": out_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": 10 + out_tokens},
    }


def response_events(
    reply: Reply, model: str, n: int, request: dict[str, Any]
) -> Iterator[tuple[str, Any]]:
    final = response(reply, model, n, request)
    seq = itertools.count()

    def event(kind: str, **fields: Any) -> tuple[str, Any]:
        return kind, {"type": kind, "sequence_number": next(seq), **fields}

    started = {**final, "status": "in_progress", "output": [], "usage": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for idx, item in enumerate(final["output"]):
        where = {"item_id": item["id"], "output_index": idx}
        if item["type"] == "message":
            part = item["content"][0]
            yield event("response.output_item.added", output_index=idx,
                        item={**item, "status": "in_progress", "content": []})
            yield event("response.content_part.added", **where, content_index=0,
                        part={**part, "text": ""})
            yield event("response.output_text.delta", **where, content_index=0,
                        delta=part["text"], logprobs=[])
            yield event("response.output_text.done", **where, content_index=0,
                        text=part["text"], logprobs=[])
            yield event("response.content_part.done", **where, content_index=0, part=part)
        else:
            yield event("response.output_item.added", output_index=idx,
                        item={**item, "status": "in_progress", "arguments": ""})
            yield event("response.function_call_arguments.delta", **where,
                        delta=item["arguments"])
            yield event("response.function_call_arguments.done", **where,
                        arguments=item["arguments"], name=item["name"])
        yield event("response.output_item.done", output_index=idx, item=item)
    yield event("response.completed", response=final)
