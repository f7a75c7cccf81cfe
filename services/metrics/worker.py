"""The workers' metrics: ``prometheus_client`` objects in one registry, always counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared import tracing

__all__ = [
    "UNKNOWN_TOOL",
    "WORKER_REGISTRY",
    "delivered",
    "instrument_model",
    "sample_consumer",
    "tool_called",
    "turn_done",
    "turn_failed",
]

WORKER_REGISTRY = CollectorRegistry(auto_describe=True)
#: The ``tool`` label of a call to a name the agent has no tool of (no valid function name).
UNKNOWN_TOOL = "(unknown)"
_TURN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

TURNS = Counter("convlog_worker_turns", "Turn parts this worker ran, by agent and outcome "
                "(replied, handed_off, failed, done, retry, error)", ["agent", "outcome"],
                registry=WORKER_REGISTRY)
TURN_SECONDS = Histogram("convlog_worker_turn_seconds", "One agent's part of a turn, start to end",
                         ["agent"], buckets=_TURN_BUCKETS, registry=WORKER_REGISTRY)
MODEL_SECONDS = Histogram("convlog_worker_model_call_seconds", "One model call, retries included",
                          ["agent", "model", "outcome"], buckets=_TURN_BUCKETS,
                          registry=WORKER_REGISTRY)
MODEL_TOKENS = Counter("convlog_worker_model_tokens", "Tokens the model server reported, by kind",
                       ["agent", "model", "kind"], registry=WORKER_REGISTRY)
TOOL_CALLS = Counter("convlog_worker_tool_calls", "Function tool calls, by tool and outcome",
                     ["agent", "tool", "outcome"], registry=WORKER_REGISTRY)
HANDOFFS = Counter("convlog_worker_handoffs", "Handoffs written, from one agent to another",
                   ["from_agent", "to_agent"], registry=WORKER_REGISTRY)
REDELIVERIES = Counter("convlog_worker_redeliveries", "Envelopes delivered to this worker again "
                       "(JetStream redelivery)", ["agent"], registry=WORKER_REGISTRY)
CONSUMER_PENDING = Gauge("convlog_worker_consumer_pending", "The agent consumer's envelopes not "
                         "yet delivered", ["agent"], registry=WORKER_REGISTRY)
CONSUMER_ACK_PENDING = Gauge("convlog_worker_consumer_ack_pending", "The agent consumer's envelopes "
                             "delivered and not yet acked", ["agent"], registry=WORKER_REGISTRY)
CONSUMER_REDELIVERED = Gauge("convlog_worker_consumer_redelivered", "The agent consumer's envelopes "
                             "redelivered and not yet acked", ["agent"], registry=WORKER_REGISTRY)


def turn_done(agent: str, result: Any, started: float) -> None:
    """A part of a turn ended with ``result`` (a :class:`~services.worker.turn.TurnResult`)."""
    TURNS.labels(agent, result.outcome).inc()
    TURN_SECONDS.labels(agent).observe(time.perf_counter() - started)
    if result.handoff_to and result.outcome == "handed_off":
        HANDOFFS.labels(agent, result.handoff_to).inc()


def turn_failed(agent: str, outcome: str) -> None:
    """A delivery ended without a result: ``retry`` (nak'd) or ``error`` (unexpected)."""
    TURNS.labels(agent, outcome).inc()


def delivered(agent: str, msg: Any) -> None:
    """Count a redelivery (``num_delivered`` > 1) of a JetStream message."""
    with contextlib.suppress(Exception):
        if (msg.metadata.num_delivered or 1) > 1:
            REDELIVERIES.labels(agent).inc()


def tool_called(agent: str, tool: str, output: str) -> None:
    """A function tool returned ``output`` (failures are outputs starting ``error:``)."""
    outcome = "ok"
    if output.startswith("error:"):
        outcome = "timeout" if output.startswith(f"error: {tool} did not finish within ") else "error"
    TOOL_CALLS.labels(agent, tool, outcome).inc()


class _TimedModel:
    """A :class:`~services.worker.model.ModelClient` that records each call."""

    def __init__(self, model: Any, agent: str) -> None:
        self._model = model
        self._agent = agent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    async def complete(self, *, model: str, messages: Any, tools: Any) -> Any:
        started = time.perf_counter()
        outcome = "error"
        try:
            reply = await tracing.traced("convlog.model_call", None, self._model.complete(
                model=model, messages=messages, tools=tools), agent=self._agent, model=model)
            outcome = "ok"
        finally:
            MODEL_SECONDS.labels(self._agent, model, outcome).observe(time.perf_counter() - started)
        for kind in ("input", "output"):
            n = getattr(reply, f"{kind}_tokens", None)
            if n:
                MODEL_TOKENS.labels(self._agent, model, kind).inc(n)
        return reply


def instrument_model(model: Any, agent: str) -> Any:
    """``model`` with each ``complete`` call timed and its tokens counted."""
    return _TimedModel(model, agent)


def sample_consumer(settings: Any, nc: Any, stream: str, consumer: str, agent: str,
                    interval: float = 5.0) -> asyncio.Task[None]:
    """A task refreshing the consumer gauges every ``interval`` s while metrics are
    served; it ends when the connection closes."""

    async def run() -> None:
        if getattr(settings, "metrics_port", None) is None:
            return
        js = nc.jetstream()
        while not nc.is_closed:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(stream, consumer)
                CONSUMER_PENDING.labels(agent).set(info.num_pending or 0)
                CONSUMER_ACK_PENDING.labels(agent).set(info.num_ack_pending or 0)
                CONSUMER_REDELIVERED.labels(agent).set(info.num_redelivered or 0)
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(run(), name=f"metrics-consumer-{agent}")
