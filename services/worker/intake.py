"""The agent's work consumer: turn notices addressed to it, pulled continuously.

Every replica of agent ``X`` pulls from the durable consumer
``convlog-agent-X`` on the work-queue stream ``<PREFIX>_WORK``
(:mod:`shared.work`), filtered on ``<prefix>.work.agent.X`` (and
``<prefix>.work.entry`` for the spec's entry agent).  So a worker receives
only what its agent must act on, one replica per notice, again if that
replica dies before acking.

Pulls are *continuous*: the worker keeps pull requests outstanding for as many
notices as it has room for, and each notice is handed over the moment it
arrives -- no fetch waits for a batch to fill or a timeout to pass.  The pull
requests are JetStream's documented protocol (``$JS.API.CONSUMER.MSG.NEXT``)
published on the worker's own connection, with an idle heartbeat, so a pull
the server lost (a restart, a reconnect, the consumer deleted) is noticed
within two heartbeats and made again; the consumer is created again if it is
gone.  nats-py's pull subscription is not used (nats-py #504: it can stop
delivering silently after a server restart).

Ack policy (declared once, STYLE rule 5): **ack** when the notice needs
nothing more from this agent (the part's appends and its handoff notice are
acknowledged, or the log shows the part done, or the notice was forwarded to
the active agent); **in progress** every ``ack_wait / 3`` while it waits or
runs; **nak** with a growing delay when the part could not finish, without
delay on shutdown; **term** only for a message that is not a notice;
``max_deliver`` unlimited (after ``max_attempts`` failures the worker ends the
turn with a ``system`` item).

The consumer is shared, so its ``ack_wait`` is the one the replica that bound it
last asked for (``--ack-wait``), not necessarily this worker's: the in-progress
acks go out every third of the shorter of the two, the consumer's as read back at
bind and every :data:`_CONSUMER_CHECK` seconds (:meth:`WorkIntake.beat_interval`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.failures import FatalError, is_transient
from shared.nats_seam import seam_for
from shared.subjects import Subjects
from shared.work import check_work_stream, work_entry_subject, work_stream_name, work_subject

__all__ = ["ACK_POLICY", "ConsumerConfigError", "WorkIntake", "consumer_config", "consumer_name"]

log = logging.getLogger("convlog.worker.intake")

ACK_POLICY = AckPolicy.EXPLICIT
_EXPIRES = 30.0  # seconds one pull request lives
_HEARTBEAT = 2.0  # the server's idle heartbeat on a waiting pull request
_CONSUMER_CHECK = 5.0  # seconds between reads of the shared consumer's ack_wait
_CONSUMER_CREATE = 10012  # JetStream's "consumer create" error (its description says why)
_NOT_UNIQUE = 10100  # "filtered consumer not unique on workqueue stream"


def consumer_name(agent: str) -> str:
    """The durable consumer shared by every replica of ``agent`` (on the work stream)."""
    return f"convlog-agent-{agent}"


def consumer_config(
    subjects: Subjects, agent: str, *, entry: bool, ack_wait: float, max_ack_pending: int = 1024
) -> ConsumerConfig:
    """The agent's consumer: the one place its delivery and ack policy are set."""
    name = consumer_name(agent)
    # One filter goes as filter_subject: nats-py then creates the consumer on
    # $JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>, and nats-server refuses a
    # body whose filter is not that one, so nats-users.conf can allow an agent
    # user its own filter only (services/cli/nats_users.py).  The entry agent's
    # two filters have no such subject.
    filters = [work_subject(subjects, agent)]
    if entry:
        filters.append(work_entry_subject(subjects))
    return ConsumerConfig(
        name=name,
        durable_name=name,
        description=f"convlog agent {agent}: turn notices addressed to {agent}",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=ACK_POLICY,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )


def _not_updatable(e: nats.js.errors.APIError) -> bool:
    """The existing consumer differs where an update cannot change it (nats-server answers
    500, error 10012, e.g. "max waiting can not be updated"): no retry changes that."""
    return e.err_code == _CONSUMER_CREATE and "can not be updated" in (e.description or "")


def _filters(config: ConsumerConfig) -> set[str]:
    return set(config.filter_subjects or ()) | ({config.filter_subject} if config.filter_subject else set())


def _overlap(a: str, b: str) -> bool:
    """Whether some subject matches both filters (``*`` one token, ``>`` the rest; a
    consumer without a filter takes every subject: ``>``)."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x, y = (ta[i] if i < len(ta) else None), (tb[i] if i < len(tb) else None)
        if ">" in (x, y):
            return True
        if x is None or y is None or (x != y and "*" not in (x, y)):
            return False
    return True


class ConsumerConfigError(FatalError):
    """The agent's durable consumer cannot be created on the work stream."""


class WorkIntake:
    """Keeps pulls outstanding on the agent's consumer and hands notices to ``deliver``.

    Args:
        nc: the worker's connection.
        subjects: subject and stream names.
        agent: the agent name.
        entry: the agent is the spec's entry agent (takes ``work.entry`` too).
        ack_wait: the consumer's ack wait, seconds.
        room: how many more notices the worker can hold now.
        deliver: called (on the event loop) with each notice message.
        stopping: set when the worker shuts down.
    """

    def __init__(
        self, nc: Client, subjects: Subjects, agent: str, *, entry: bool, ack_wait: float,
        room: Callable[[], int], deliver: Callable[[Msg], None], stopping: asyncio.Event,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.agent = agent
        self.entry = entry
        self.ack_wait = ack_wait
        self.stream = work_stream_name(subjects)
        self.name = consumer_name(agent)
        self.bound = asyncio.Event()
        self.rebinds = 0
        self._room = room
        self._deliver = deliver
        self._stopping = stopping
        self._wake = asyncio.Event()
        self._sub: object | None = None
        self._inbox = ""
        self._outstanding = 0
        self._heard = time.monotonic()
        self._stale = False
        self._unanswered = False  # a pull was answered "no responders" (503)
        self._refused = ""  # why the consumer refused a pull (409 Exceeded ...)
        self._waiting_logged = False
        #: the shared consumer's ack_wait as last read (another replica may have set it)
        self.consumer_ack_wait = ack_wait
        #: set when the consumer's ack_wait got shorter: in-progress acks are due now
        self.beat_now = asyncio.Event()
        self._checked = time.monotonic()

    def beat_interval(self) -> float:
        """Seconds between in-progress acks: a third of the shorter of this worker's
        ``ack_wait`` and the consumer's (a replica started with a shorter ``--ack-wait``
        sets it for every replica)."""
        return max(min(self.ack_wait, self.consumer_ack_wait) / 3, 0.2)

    def _saw_ack_wait(self, config: ConsumerConfig) -> None:
        self._checked = time.monotonic()
        if config.ack_wait is None or config.ack_wait == self.consumer_ack_wait:
            return
        if config.ack_wait < self.consumer_ack_wait:
            self.beat_now.set()
        if config.ack_wait < self.ack_wait:
            log.warning("agent %s: the consumer %s redelivers after %gs (set by another replica), "
                        "not this worker's %gs: in-progress acks follow it",
                        self.agent, self.name, config.ack_wait, self.ack_wait)
        self.consumer_ack_wait = config.ack_wait

    def poke(self) -> None:
        """The worker has room again (or must look at something): pull now."""
        self._wake.set()

    def mark_stale(self, reason: str) -> None:
        """Forget the outstanding pulls and make them again (e.g. after a reconnect)."""
        log.info("agent %s: pulling again (%s)", self.agent, reason)
        self._stale = True
        self._wake.set()

    async def run(self) -> None:
        """Pull until the worker stops (raises a fatal error for a consumer that cannot exist)."""
        while not self._stopping.is_set():
            if not self.bound.is_set():
                if self._unanswered:
                    self._unanswered = False
                    log.info("agent %s: no responders for pulls on %s: binding it again", self.agent, self.name)
                    await self._pause(0.5)
                    continue
                if self._refused:
                    log.warning("agent %s: the consumer %s refused a pull (%s): binding it again",
                                self.agent, self.name, self._refused)
                    self._refused = ""
                    await self._pause(1.0)
                    continue
                if not await self._bind():
                    continue
            if self._stale:
                self._stale = False
                self._outstanding = 0
                self.rebinds += 1
                await self._check_consumer()
            free = self._room() - self._outstanding
            if free > 0 and (self._outstanding == 0 or free >= 8):
                await self._pull(free)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_HEARTBEAT):
                    await self._wake.wait()
            if self._outstanding and time.monotonic() - self._heard > 2.5 * _HEARTBEAT:
                self.mark_stale("no heartbeat from the pending pull")
            elif self.bound.is_set() and time.monotonic() - self._checked >= _CONSUMER_CHECK:
                await self._check_consumer(within=1.0)  # pulls made meanwhile deliver on

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()  # type: ignore[attr-defined]
            self._sub = None

    # -- pulls -------------------------------------------------------------
    async def _pull(self, n: int) -> None:
        body = json.dumps({"batch": n, "expires": int(_EXPIRES * 1e9),
                           "idle_heartbeat": int(_HEARTBEAT * 1e9)}).encode()
        try:
            await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.name}", body,
                                  reply=self._inbox)
        except nats.errors.Error as e:
            log.info("agent %s: pull request not sent: %r", self.agent, e)
            await self._pause(0.5)
            return
        if self._outstanding == 0:
            self._heard = time.monotonic()
        self._outstanding += n

    async def _on_msg(self, msg: Msg) -> None:
        self._take(msg)

    def _take(self, msg: Msg) -> None:
        """One message of the pull inbox: a notice, a heartbeat or a pull's end
        (called as nats-py parses it, on the fast seam: no task hop per notice)."""
        self._heard = time.monotonic()
        status = (msg.headers or {}).get("Status") if not msg.reply else None
        if status is None and msg.reply:
            self._outstanding = max(0, self._outstanding - 1)
            self._deliver(msg)
            return
        if status == "100":  # idle heartbeat: the pull is alive
            return
        # 404/408/409: a pull request ended; give back what it did not deliver.
        pending = (msg.headers or {}).get("Nats-Pending-Messages")
        if pending is not None and pending.isdigit():
            self._outstanding = max(0, self._outstanding - int(pending))
        else:
            self._outstanding = 0
        if status == "409":
            desc = (msg.headers or {}).get("Description", "")
            if "Deleted" in desc:
                self.bound.clear()
            elif desc.startswith("Exceeded"):
                # Over the consumer's limits (its max batch, expires or waiting pulls, changed
                # under the worker): pulling again at once would spin on the same answer.
                # Bind again after a pause (the update restores the worker's own limits).
                self._refused = desc
                self.bound.clear()
        elif status == "503":
            # No responders: the consumer (or its stream) is gone -- deleted while no pull of
            # ours waited, so no 409 came -- or has no leader right now.  Pulling again at once
            # would spin on the same answer: bind again (it creates the consumer), after a pause.
            self._unanswered = True
            self.bound.clear()
        self._wake.set()

    # -- binding -----------------------------------------------------------
    async def _bind(self) -> bool:
        try:
            await self._ensure_consumer()
        except _StreamMissing:
            if not self._waiting_logged:
                log.info("agent %s: waiting for the work stream %s (is the log service up?)",
                         self.agent, self.stream)
                self._waiting_logged = True
            await self._pause(1.0)
            return False
        except FatalError:
            raise
        except Exception as e:
            if not (is_transient(e) or isinstance(e, nats.errors.Error)):
                raise
            log.info("agent %s: cannot bind the consumer yet: %r", self.agent, e)
            await self._pause(1.0)
            return False
        if self._sub is None:
            self._inbox = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)
            seam_for(self.nc).deliver_inline(self._sub, self._take)  # else _on_msg serves
        self._outstanding = 0
        self.bound.set()
        return True

    async def _ensure_consumer(self) -> None:
        js = self.nc.jetstream()
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError as e:
            raise _StreamMissing(self.stream) from e
        check_work_stream(info.config, self.subjects)  # else the pulls would wait forever
        config = consumer_config(self.subjects, self.agent, entry=self.entry, ack_wait=self.ack_wait)
        try:
            info = await js.add_consumer(self.stream, config)  # creates, or updates the shared one
        except nats.js.errors.APIError as e:
            if not isinstance(e, nats.js.errors.BadRequestError) and not _not_updatable(e):
                raise
            try:
                info = await js.consumer_info(self.stream, self.name)
            except nats.js.errors.NotFoundError:
                raise ConsumerConfigError(
                    f"cannot create the consumer {self.name} on the work stream {self.stream}: "
                    f"{e.description} (JetStream error {e.err_code}){await self._held_by(config, e)}"
                ) from e
            have, want = _filters(info.config), _filters(config)
            if not want <= have:  # it would miss notices for this agent
                raise ConsumerConfigError(
                    f"cannot update the consumer {self.name} on the work stream {self.stream} to take "
                    f"{sorted(want)} (it takes {sorted(have)}): "
                    f"{e.description} (JetStream error {e.err_code}){await self._held_by(config, e)}"
                ) from e
            log.warning("agent %s: keeping the existing consumer %s: %s",
                        self.agent, self.name, e.description)
        self._saw_ack_wait(info.config)

    async def _held_by(self, config: ConsumerConfig, e: nats.js.errors.APIError) -> str:
        """For a refusal because another consumer filters a subject of ours (a work-queue
        stream takes one consumer per subject): which one, and what to do; else ``""``.

        nats-server's words alone ("filtered consumer not unique on workqueue stream")
        name neither.  The usual holder is the consumer of an agent that was the spec's
        entry agent (``work.entry``) and is gone from it, or whose workers still run an
        older spec."""
        if e.err_code != _NOT_UNIQUE:
            return ""
        try:
            others = await self.nc.jetstream().consumers_info(self.stream)
        except Exception:  # the refusal stands as nats-server worded it
            return ""
        want = _filters(config)
        held = [(c.name, sorted(s for s in want if any(_overlap(s, f) for f in _filters(c.config) or {">"})))
                for c in others if c.name != self.name]
        return "".join(
            f"; the consumer {name} takes {', '.join(subjects)} too: run its agent's workers with this "
            f"spec, or delete it if that agent is gone (nats consumer rm {self.stream} {name})"
            for name, subjects in held if subjects)

    async def _check_consumer(self, within: float | None = None) -> None:
        self._checked = time.monotonic()
        try:
            info = await self.nc.jetstream().consumer_info(self.stream, self.name, timeout=within)
        except nats.js.errors.NotFoundError:
            self.bound.clear()
        except Exception as e:
            if not (is_transient(e) or isinstance(e, nats.errors.Error | nats.js.errors.Error)):
                raise
        else:
            self._saw_ack_wait(info.config)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()


class _StreamMissing(Exception):
    pass
