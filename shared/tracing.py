"""Traces with OpenTelemetry, when it is installed (``pip install 'convlog[otel]'``).

The W3C ``traceparent`` of the current span travels in NATS headers: from
:class:`~shared.client.LogClient` (``convlog send``, ``ConvlogSession``) to
the log service, from the log service on each committed item it publishes
to ``<prefix>.items.<sid>``, and so to the worker whose turn it starts, whose
own appends carry it on.  One trace shows a user message end to end.

Without OpenTelemetry every helper here is a no-op.  Spans are recorded only
when a real (SDK) tracer provider is configured — by
``opentelemetry-instrument``, by the embedding program, or with
:func:`use_provider` (tests).  Nothing here reads the environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator, Mapping
from typing import Any, TypeVar

try:  # optional: convlog[otel]
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised without the extra
    propagate = trace = None  # type: ignore[assignment]

__all__ = ["enabled", "headers", "span", "traced", "use_provider"]

T = TypeVar("T")
_provider: Any = None


def use_provider(provider: Any) -> Any:
    """Record spans with ``provider`` instead of the global one (``None``: global again).

    Returns the previous override.
    """
    global _provider
    previous, _provider = _provider, provider
    return previous


def enabled() -> bool:
    """True when spans are recorded (OpenTelemetry installed and an SDK provider set)."""
    if trace is None:
        return False
    provider = _provider or trace.get_tracer_provider()
    return type(provider).__module__.startswith("opentelemetry.sdk")


def _tracer() -> Any:
    return trace.get_tracer("convlog", tracer_provider=_provider)


@contextlib.contextmanager
def span(name: str, carrier: Mapping[str, str] | None = None, *, kind: str = "INTERNAL",
         **attributes: Any) -> Iterator[Any]:
    """A span, child of the current one or of the ``traceparent`` in ``carrier``.

    ``kind`` is a :class:`opentelemetry.trace.SpanKind` name.  Yields the span
    (``None`` when tracing is off).
    """
    if trace is None or not enabled():
        yield None
        return
    parent = propagate.extract(carrier) if carrier and "traceparent" in carrier else None
    attrs = {f"convlog.{k}": v for k, v in attributes.items() if v is not None}
    with _tracer().start_as_current_span(name, context=parent, kind=getattr(trace.SpanKind, kind),
                                         attributes=attrs) as current:
        yield current


async def traced(name: str, carrier: Mapping[str, str] | None, work: Awaitable[T], *,
                 kind: str = "INTERNAL", **attributes: Any) -> T:
    """Await ``work`` inside :func:`span` (a one-line way to trace a call)."""
    if trace is None or not enabled():  # the hot path of every request: no context manager
        return await work
    with span(name, carrier, kind=kind, **attributes):
        return await work


def headers() -> dict[str, str] | None:
    """NATS headers carrying the current span's ``traceparent``, or ``None``."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None
