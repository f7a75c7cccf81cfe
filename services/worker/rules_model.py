"""The offline rules model: a deterministic stand-in that plays the seed scenario.

**This is not an LLM.**  It is a small set of keyword rules that lets the demo
and the tests run with no network and no API key.  Every response it gives
names itself ``convlog-rules-model (offline, deterministic, not an LLM)``.

It is reached through exactly the same code path as a real model: an
``openai.AsyncOpenAI`` client whose HTTP client has a custom transport
(:class:`RulesTransport`).  The transport receives the real
``POST /chat/completions`` request the openai library built, decides from the
request alone (messages, tools offered, the system prompt naming the agent)
and answers with a real Chat Completions JSON body.  The same request always
gets the same response, byte for byte.

The behaviour per agent lives in :mod:`services.worker.rules_roles`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import httpx2
import msgspec
import openai

from .rules_roles import Conversation, Decision, decide

__all__ = [
    "RULES_BASE_URL",
    "RULES_MODEL_NAME",
    "RulesTransport",
    "rules_completion",
    "rules_openai_client",
]

RULES_MODEL_NAME = "convlog-rules-model (offline, deterministic, not an LLM)"
RULES_BASE_URL = "http://rules-model.convlog.invalid/v1"
_OFFLINE_KEY = "offline-rules-model-no-key"
_log = logging.getLogger(__name__)


class RulesTransport(httpx2.AsyncBaseTransport):
    """An ``httpx2`` async transport that answers Chat Completions with the rules model.

    Only ``POST .../chat/completions`` without streaming is served; anything
    else gets an OpenAI-style JSON error (404 or 400), never a network call.
    """

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Answer one HTTP request in memory."""
        body = await request.aread()
        if request.method != "POST" or not request.url.path.endswith("/chat/completions"):
            return _error(
                404,
                f"the offline rules model serves only POST /chat/completions, "
                f"not {request.method} {request.url.path}",
            )
        try:
            payload = msgspec.json.decode(body)
        except ValueError:  # msgspec.DecodeError is one
            return _error(400, "request body is not valid JSON")
        if (
            not isinstance(payload, dict)
            or not payload.get("messages")
            or not isinstance(payload["messages"], list)
        ):
            return _error(400, "request needs a non-empty 'messages' array")
        if payload.get("stream"):
            return _error(400, "the offline rules model does not support streaming")
        try:
            completion = rules_completion(payload)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            return _error(400, f"malformed chat request: {e}")
        except Exception:  # a bug in the rules: answer like a server would, never crash the caller
            _log.exception("rules model failed on a chat request")
            return _error(500, "the offline rules model failed on this request", "server_error")
        return httpx2.Response(
            200,
            content=msgspec.json.encode(completion),
            headers={"content-type": "application/json", "x-request-id": completion["id"],
                     "openai-model": RULES_MODEL_NAME},
        )


def rules_openai_client(*, timeout: float = 30.0) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` whose requests are answered by the offline rules model.

    Nothing leaves the process: the base URL is a reserved ``.invalid`` host and
    every request is served by :class:`RulesTransport`.
    """
    http_client = httpx2.AsyncClient(transport=RulesTransport(), timeout=timeout)
    return openai.AsyncOpenAI(
        api_key=_OFFLINE_KEY,
        base_url=RULES_BASE_URL,
        http_client=http_client,
        max_retries=0,
    )


def rules_completion(request: dict[str, Any]) -> dict[str, Any]:
    """Compute the Chat Completions response body for a decoded request body.

    Pure and deterministic: ids are hashes of the request, ``created`` is 0.
    """
    # Keys sorted, compact, UTF-8: the same bytes json.dumps(sort_keys=True, separators=(",", ":"),
    # ensure_ascii=False) gives for strings, at a tenth of its cost (it was 5% of a worker's
    # CPU per turn in `convlog bench --turns`, the request carrying the whole window).
    canonical = msgspec.json.encode(request, order="sorted")
    digest = hashlib.sha256(canonical).hexdigest()
    conversation = Conversation.from_request(request)
    decision: Decision = decide(conversation)

    message: dict[str, Any] = {"role": "assistant", "content": decision.text, "refusal": None}
    finish_reason = "stop"
    if decision.tool is not None:
        name, arguments = decision.tool
        call_id = "call_" + hashlib.sha256(f"{digest}:{name}".encode()).hexdigest()[:24]
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
        ]
        finish_reason = "tool_calls"
    prompt_tokens = max(1, len(canonical) // 4)
    completion_tokens = max(1, len(msgspec.json.encode(message)) // 4)
    return {
        "id": f"chatcmpl-rules-{digest[:24]}",
        "object": "chat.completion",
        "created": 0,
        "model": RULES_MODEL_NAME,
        "system_fingerprint": "convlog-rules-v1",
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error(status: int, message: str, kind: str = "invalid_request_error") -> httpx2.Response:
    return httpx2.Response(status, json={"error": {"message": message, "type": kind, "code": None}})
