"""The log service's spans, and the trace context it hands the outbox.

With tracing on (:func:`shared.tracing.enabled` when the service starts),
each append and each user message gets a server span, child of the
``traceparent`` its request carried.  The span's own ``traceparent`` reaches
the item's headers on ``<prefix>.items.<sid>``, so the worker's turn span
continues the same trace: on the SQLite store it is kept per committed item,
``(session_id, item_order)``, in the outbox's ``traces``, which adds it when
it publishes; a store that writes the items itself (JetStream) is handed it
with the append (:meth:`ServiceTraces.start_append`) and stores it as a
header of the items.

With tracing off the service never calls in here on the append path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from shared import tracing
from shared.errors import ConvlogError
from shared.messages import AppendReply

__all__ = ["ServiceTraces"]

MAX_PENDING = 100_000  # trace contexts waiting for the outbox (dropped beyond: traces only)


class ServiceTraces:
    """Spans for one log service; ``traces`` is the outbox's header map."""

    def __init__(self, traces: dict[tuple[str, int], bytes]) -> None:
        self.traces = traces

    def _record(self, span: Any, sid: str, reply: AppendReply) -> None:
        from opentelemetry import propagate, trace

        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        parent = carrier.get("traceparent")
        if parent is None:
            return
        if len(self.traces) > MAX_PENDING:
            self.traces.clear()
        value = parent.encode()
        for item in reply.items:
            if not item.duplicate:
                self.traces[(sid, item.item_order)] = value
        span.set_attribute("convlog.first_order", reply.first_order)
        span.set_attribute("convlog.last_order", reply.last_order)

    def around_append(self, done: Callable[[AppendReply | ConvlogError], None],
                      headers: dict[str, str] | None, sid: str) -> Callable[[Any], None]:
        """``done`` wrapped in a span from now until the store's outcome."""
        return self.start_append(done, headers, sid)[0]

    def start_append(self, done: Callable[[AppendReply | ConvlogError], None],
                     headers: dict[str, str] | None, sid: str) -> tuple[Callable[[Any], None], str | None]:
        """:meth:`around_append`, and the span's own ``traceparent`` (for a
        store that publishes the items itself)."""
        from opentelemetry import propagate, trace

        parent = propagate.extract(headers) if headers and "traceparent" in headers else None
        span = trace.get_tracer("convlog", tracer_provider=tracing._provider).start_span(
            "convlog.log.append", context=parent, kind=trace.SpanKind.SERVER,
            attributes={"convlog.session_id": sid})

        def finish(outcome: AppendReply | ConvlogError) -> None:
            try:
                if isinstance(outcome, AppendReply):
                    self._record(span, sid, outcome)
                else:
                    span.set_attribute("convlog.error", outcome.code)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.code))
            finally:
                span.end()
                done(outcome)

        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return finish, carrier.get("traceparent")

    async def serve(self, endpoint: str, subject: str, headers: dict[str, str] | None,
                    work: Awaitable[tuple[bytes, dict[str, str] | None]]
                    ) -> tuple[bytes, dict[str, str] | None]:
        """A server span around one ``read``/``sessions``/``in`` request."""
        sid = subject.rpartition(".")[2] if endpoint != "sessions" else None
        with tracing.span(f"convlog.log.{endpoint}", headers, kind="SERVER", session_id=sid) as span:
            payload, error = await work
            if span is not None and endpoint == "in" and error is None:
                # Still in the task step that saw the commit: the outbox has
                # not published the item yet, so its headers get this span.
                self._record(span, sid or "", msgspec.json.decode(payload, type=AppendReply))
            return payload, error
