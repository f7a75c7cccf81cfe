"""The log service's request paths: the append hot path and the dispatchers.

An append is decoded, checked and submitted to the store on the event loop
(no task per append); the store answers once the group commit is durable.
A signed append's signatures are checked on the loop or, one check per item,
off it (:mod:`.verifier`).  Reads, session listings and user messages run as
one task each, started in arrival order.

A mixin of :class:`~services.log.service.LogService`, which owns the state
declared below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter_ns
from typing import Any

from nats.micro.request import Request

from shared.errors import ConvlogError, UnavailableError
from shared.messages import AppendReply, AppendRequest
from shared.nats_seam import NatsSeam

from .handlers import CLOSED, Handlers, encode_outcome, error_reply
from .replies import Replies, ReplyTo
from .store.base import LogStore, StoreClosedError
from .traces import ServiceTraces
from .verifier import Verifier


def _batch_signed(request: AppendRequest) -> bool:
    """Every signed item carries a batch signature (``<signature>.<path>``)."""
    return all(it.sig is None or "." in it.sig for it in request.items)


class Endpoints(Replies):
    """Deliver requests to the handlers and the store (state owned by ``LogService``)."""

    store: LogStore
    traces: ServiceTraces | None
    _verifier: Verifier | None
    _seam: NatsSeam | None
    _inflight: set[asyncio.Task[None]]

    def _append_endpoint(self, handlers: Handlers) -> Callable[[str, bytes, ReplyTo], None]:
        """The hot path: no task, coroutine chain or future per append.

        ``deliver`` only decodes, checks and submits to the store, and
        returns.  The store calls back once the group commit is durable, and
        the replier task sends the replies of a whole commit in one go.
        Submission follows arrival order, so one publisher's appends keep
        their order.
        """
        store = self.store
        tally = self.tally
        counters = self.counters["append"]

        def deliver(subject: str, data: bytes, reply_to: ReplyTo, headers: dict[str, str] | None = None) -> None:
            tally["append"] += 1
            counters.requests += 1
            answer: Callable[[Any], None] | None = None
            try:
                sid, request, signed = handlers.parse_append_deferred(subject, data)
                answer = partial(self._answer, reply_to, subject, perf_counter_ns())
                trace = None
                if self.traces:
                    answer, trace = self.traces.start_append(answer, headers, sid)
                if signed and _batch_signed(request):
                    # Cheap per item (a few hashes; one Ed25519 check per batch root, then
                    # remembered): on the loop, in arrival order behind any threaded check.
                    assert handlers.authorize is not None
                    handlers.authorize.verify_signatures(sid, request)
                    if self._verifier is not None and self._verifier.busy:
                        self._verifier.submit_verified(partial(self._verified, sid, request, answer, trace=trace))
                    else:
                        self._submit(sid, request, answer, trace)
                elif signed:  # one Ed25519 check per item: off the loop (see verifier.py)
                    self._verifier_for(handlers).submit(
                        sid, request, partial(self._verified, sid, request, answer, trace=trace))
                elif self._verifier is not None and self._verifier.busy:  # behind a signed one
                    self._verifier.submit_verified(partial(self._verified, sid, request, answer, trace=trace))
                elif trace is None:
                    store.submit(sid, request, answer)
                else:
                    self._submit(sid, request, answer, trace)
            except Exception as e:
                if answer is None:  # refused as it came: neither timed nor traced yet
                    self._reply("append", reply_to, subject, *error_reply(e, subject))
                    return
                # Refused after its timing and span began (a bad batch signature, a closed
                # store): answered through them, so the span ends and the refusal is timed.
                if isinstance(e, StoreClosedError):  # shutting down, or the store failed (logged as such)
                    e = UnavailableError(CLOSED)
                elif not isinstance(e, ConvlogError):
                    error_reply(e, subject)  # logs it
                    e = UnavailableError("internal error; the request was not applied")
                self._awaiting += 1
                answer(e)
                return
            self._awaiting += 1

        return deliver

    def _verifier_for(self, handlers: Handlers) -> Verifier:
        if self._verifier is None:
            assert handlers.authorize is not None
            self._verifier = Verifier(handlers.authorize, asyncio.get_running_loop())
        return self._verifier

    def _submit(self, sid: str, request: AppendRequest, answer: Callable[[Any], None], trace: str | None) -> None:
        """Hand an append to the store; its trace context too if the store
        publishes the items itself (on SQLite the outbox adds it)."""
        if trace is not None and getattr(self.store, "publishes_items", False):
            self.store.submit(sid, request, answer, trace=trace)  # type: ignore[call-arg]
        else:
            self.store.submit(sid, request, answer)

    def _verified(self, sid: str, request: AppendRequest, answer: Callable[[Any], None],
                  error: ConvlogError | None, *, trace: str | None = None) -> None:
        """A signed append's signatures were checked: submit it, or refuse it."""
        if error is not None:
            answer(error)
            return
        try:
            self._submit(sid, request, answer, trace)
        except Exception as e:  # the store closed meanwhile
            answer(e if isinstance(e, ConvlogError) else UnavailableError(CLOSED))

    def _answer(
        self, reply_to: ReplyTo, subject: str, submitted_ns: int, outcome: AppendReply | ConvlogError
    ) -> None:
        """The store's callback for one submitted append."""
        self._awaiting -= 1
        ns = perf_counter_ns() - submitted_ns  # the commit included
        self.counters["append"].processing_ns += ns
        self.metrics.request("append", ns)
        self._reply("append", reply_to, subject, *encode_outcome(outcome))

    @staticmethod
    def _micro_handler(
        deliver: Callable[[str, bytes, ReplyTo, dict[str, str] | None], None], seam: NatsSeam
    ) -> Callable[[Request], Awaitable[None]]:
        """micro's handler for an endpoint whose messages are not delivered inline."""
        reply_to = seam.reply_to

        async def handler(req: Request) -> None:
            deliver(req.subject, req.data, reply_to(req), req.headers)

        return handler

    def _dispatcher(
        self, name: str, fn: Callable[[str, bytes], Awaitable[bytes]], handlers: Handlers
    ) -> Callable[[Request], Awaitable[None]]:
        # micro awaits a handler inline, one message at a time per endpoint; a
        # task per request lets slow reads and user messages overlap.  Tasks
        # start in arrival order, so one publisher's requests keep order.
        counters = self.counters[name]
        assert self._seam is not None
        reply_to = self._seam.reply_to

        async def process(req: Request, started_ns: int) -> None:
            self.tally[name] += 1
            counters.requests += 1
            work = handlers.guarded(fn, req.subject, req.data)
            payload, headers = await (self.traces.serve(name, req.subject, req.headers, work) if self.traces else work)
            ns = perf_counter_ns() - started_ns
            counters.processing_ns += ns
            self.metrics.request(name, ns)
            self._reply(name, reply_to(req), req.subject, payload, headers)

        async def handler(req: Request) -> None:
            task = asyncio.create_task(process(req, perf_counter_ns()))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        return handler
