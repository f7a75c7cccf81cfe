"""The log service's replies: one queue, sent by one replier task.

Every endpoint's reply goes through :meth:`Replies._reply`; the replier task
(:meth:`Replies._reply_loop`) sends the queued replies of a whole commit in
one go.  convlog counts each endpoint's requests and errors itself
(:class:`EndpointCounters`) and shows them in ``$SRV.STATS``.

A mixin of :class:`~services.log.service.LogService`, which owns the state
declared below.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import EndpointStats

from services import metrics
from shared.errors import ERROR_HEADER
from shared.failures import is_transient
from shared.wire import Outgoing, over_max_payload, publish_many

log = logging.getLogger("convlog.log")

#: where a reply goes: a reply subject ("" for none), or a micro request to
#: answer through ``Request.respond`` (the public seam)
ReplyTo = str | Request


@dataclass
class EndpointCounters:
    """convlog's own ``$SRV.STATS`` figures for one endpoint.

    micro counts only what its handler sees and times only the handler;
    appends skip that handler (inline delivery) and every reply is sent
    later, so convlog keeps its own and shows them in ``$SRV.STATS``.
    """

    requests: int = 0
    errors: int = 0
    last_error: str = ""
    processing_ns: int = 0


def answerable(reply: str, prefix: str) -> bool:
    """Whether the service may answer on ``reply``: not a subject of its own (``<prefix>.``:
    items, log, work, its endpoints) nor a system one (``$JS``, ``$KV``, ``$SRV``, ...)."""
    return not (reply.startswith("$") or reply.startswith(prefix + "."))


class Replies:
    """The reply queue and its replier task (state owned by ``LogService``)."""

    nc: Client | None
    metrics: Any  # what services.metrics.log_metrics returns
    fanout: metrics.Fanout
    commit_tally: metrics.CommitTally
    counters: dict[str, EndpointCounters]
    tally: dict[str, int]
    _awaiting: int
    _outgoing: list[Outgoing]
    _responses: list[tuple[Request, bytes, dict[str, str] | None]]
    _outgoing_ready: asyncio.Event
    _replying: bool
    _quiet: asyncio.Event
    subjects: Any  # shared.subjects.Subjects
    _seam: Any  # shared.nats_seam.NatsSeam | None


    def _endpoint_stats(self, stats: EndpointStats) -> dict[str, Any] | None:
        """micro's ``stats_handler``: show convlog's counters in ``$SRV.STATS``, and
        the fan-out lag (for ``convlog health``) and the commit totals (for
        ``convlog bench --sdk``) as the append endpoint's data."""
        c = self.counters.get(stats.name)
        if c is not None:
            stats.num_requests = c.requests
            stats.num_errors = c.errors
            stats.last_error = c.last_error
            stats.processing_time = c.processing_ns
            stats.average_processing_time = c.processing_ns // max(1, c.requests)
        if stats.name != "append":
            return None
        return {**self.fanout.stats(), **self.commit_tally.stats()}

    def _reply(
        self, name: str, reply_to: ReplyTo, subject: str, payload: bytes, headers: dict[str, str] | None
    ) -> None:
        """Queue a reply for the replier task (and count an error reply)."""
        self.metrics.replied(name, headers)
        if headers:
            self.tally["errors"] += 1
            c = self.counters[name]
            c.errors += 1
            c.last_error = headers.get(ERROR_HEADER, "")
            if not reply_to:
                log.warning("%s on %s without reply subject: %s", name, subject[:160], payload[:300])
        to = reply_to if type(reply_to) is str else self._seam.reply_subject(reply_to) if self._seam else None
        if to and not answerable(to, self.subjects.prefix):
            # The reply subject is the requester's to choose, and this service's user
            # may publish the items, the notices, the buckets and the JetStream API:
            # answering there would write for someone NATS does not let write.
            log.warning("%s on %s: not answered on %s (not a reply subject)", name, subject[:160], to[:160])
        elif type(reply_to) is str:
            if reply_to:
                self._outgoing.append((reply_to, "", payload, headers))
                self._outgoing_ready.set()
                return
        else:
            self._responses.append((reply_to, payload, headers))  # type: ignore[arg-type]
            self._outgoing_ready.set()
            return
        # Nothing to send, so the replier does not wake: say here that all is answered
        # when it is (a shutdown waits for that, up to its grace).
        if not (self._awaiting or self._outgoing or self._responses or self._replying):
            self._quiet.set()

    async def _reply_loop(self) -> None:
        assert self.nc is not None
        nc = self.nc
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            batch, self._outgoing = self._outgoing, []
            responses, self._responses = self._responses, []
            self._replying = True
            try:
                refused = await publish_many(nc, batch) if batch else []
            except Exception as e:
                if not is_transient(e):
                    raise
                refused = [(0, e)]  # the requesters retry an unknown outcome
            for req, payload, headers in responses:  # the public seam
                try:
                    if headers is not None and over_max_payload(nc, payload, headers):
                        raise nats.errors.MaxPayloadError  # the server would close the connection
                    await req.respond(payload, headers=headers)
                except ValueError:  # no reply subject (a plain publish)
                    if headers:
                        log.warning("%s without reply subject: %s", req.subject[:160], payload[:300])
                except nats.errors.MaxPayloadError as e:  # that one reply is refused, as publish_many's
                    refused.append((0, e))
                except Exception as e:
                    if not is_transient(e):
                        raise
                    refused.append((0, e))
            for _, e in refused:
                log.debug("reply not sent: %s: %s", type(e).__name__, e)
            self._replying = False
            if not self._awaiting and not self._outgoing and not self._responses:
                self._quiet.set()
