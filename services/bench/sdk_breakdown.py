"""Where the time of a ``ConvlogSession.add_items`` call goes, from measured stamps.

Client side, per call (:class:`CallClock`): the call's start and end, and for
the request it makes, the :attr:`LogClient.observer <shared.requester.Requester.observer>`
stamps: entering the send, the publish done, the reply back in the task.  So
a call splits into

* *prepare, encode, publish*: the SDK item dicts to an append request on the
  wire (ids, authors, msgspec encoding, the publish call);
* *round trip*: publish done to reply in hand;
* *reply, local copy*: decoding the acks and folding the items into the
  process's copy of the session, until the call returns.

Service side, from two samples of the log service's ``$SRV.STATS`` around the
phase (:func:`service_sample`): appends answered and their time from arrival
to reply queued (waiting for a commit included), and the commits' count,
items, and time (decide + write + COMMIT) and fsync.  The round trip minus
the service's time is NATS and scheduling: two hops through nats-server each
way, and each process's event loop getting to the message.  Service figures
cover every append of the phase, so with ``--url`` other traffic counts too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

__all__ = ["CallClock", "ClientSplit", "ServiceSplit", "service_delta", "service_sample"]

STATS_SUBJECT = "$SRV.STATS.convlog-log"  # services.log.service.SERVICE_NAME


@dataclass
class ClientSplit:
    """Summed client-side seconds of ``calls`` calls that made ``requests`` requests."""

    calls: int = 0
    requests: int = 0
    total: float = 0.0
    before: float = 0.0
    round_trip: float = 0.0
    after: float = 0.0

    def add(self, other: ClientSplit) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientSplit:
        return cls(**{k: d[k] for k in asdict(cls())})


class CallClock:
    """Times sequential calls (one at a time) and the one request each makes.

    Set :meth:`observe` as the ``observer`` of the session's :class:`LogClient`,
    then run each call through :meth:`timed`.
    """

    def __init__(self) -> None:
        self.split = ClientSplit()
        self._stamps: list[tuple[float, float, float]] = []

    def observe(self, subject: str, started: float, sent: float, replied: float) -> None:
        if ".append." in subject:
            self._stamps.append((started, sent, replied))

    async def timed(self, call: Callable[[], Awaitable[Any]]) -> None:
        self._stamps.clear()
        t0 = time.perf_counter()
        await call()
        t3 = time.perf_counter()
        s = self.split
        s.calls += 1
        s.total += t3 - t0
        if len(self._stamps) != 1:  # coalesced or retried: only the total is this call's
            s.requests += len(self._stamps)
            return
        _started, sent, replied = self._stamps[0]
        s.requests += 1
        s.before += sent - t0
        s.round_trip += replied - sent
        s.after += t3 - replied


@dataclass
class ServiceSplit:
    """What the log service did between two samples."""

    appends: int = 0
    append_s: float = 0.0  # summed arrival -> reply queued
    commits: int = 0
    commit_items: int = 0
    commit_s: float = 0.0
    fsync_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def service_sample(nc: Any) -> dict[str, Any] | None:
    """The log service's append endpoint stats, or ``None`` when it does not answer."""
    try:
        msg = await nc.request(STATS_SUBJECT, b"", timeout=2.0)
        stats = msgspec.json.decode(msg.data)
    except Exception:
        return None
    for ep in stats.get("endpoints") or []:
        if ep.get("name") == "append":
            return ep
    return None


def service_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> ServiceSplit | None:
    """The service's work between two :func:`service_sample` results."""
    if not before or not after:
        return None
    b, a = before.get("data") or {}, after.get("data") or {}
    if "commits" not in a:  # a log service without commit totals
        return None
    return ServiceSplit(
        appends=after["num_requests"] - before["num_requests"],
        append_s=(after["processing_time"] - before["processing_time"]) / 1e9,
        commits=a["commits"] - b.get("commits", 0),
        commit_items=a["commit_items"] - b.get("commit_items", 0),
        commit_s=(a["commit_ns"] - b.get("commit_ns", 0)) / 1e9,
        fsync_s=(a["fsync_ns"] - b.get("fsync_ns", 0)) / 1e9,
    )
