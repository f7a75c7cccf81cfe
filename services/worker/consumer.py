"""The agent's durable JetStream pull consumer: config, ack policy, and self-healing pulls.

Every replica of agent ``X`` pulls from the durable consumer
``convlog-agent-X`` on the items stream (``<prefix>.items.>``), so each
committed envelope reaches one replica of each agent, and reaches one again if
that replica dies before acking.

nats-py #504 (a pull subscription that silently stops delivering after a
server restart) is designed around: after a reconnect, after repeated fetch
errors, or when pulls keep timing out while the consumer reports undelivered
messages, :class:`AgentConsumer` drops its binding and binds again (creating
the consumer if it is gone).  Items subjects are only ever consumed through
JetStream, never a core subscription (#678).

Failures follow :mod:`shared.failures`: a transient one (NATS away, JetStream
briefly unavailable, the stream not created yet) is waited out with backoff;
a consumer that cannot be created (the stream captures other subjects, say),
or a JetStream refusal that re-binding does not cure, is fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from shared.failures import LOOP_BACKOFF, FatalError, check_items_stream, is_transient
from shared.subjects import Subjects

__all__ = [
    "ACK_POLICY",
    "NATS_ERRORS",
    "AgentConsumer",
    "ConsumerConfigError",
    "consumer_config",
    "consumer_name",
]

log = logging.getLogger("convlog.worker.consumer")

#: How agent consumers acknowledge, declared once (STYLE rule 5):
#:
#: * **ack** after the envelope needs nothing more from this agent: the turn's
#:   appends were acknowledged by the log (or the log shows the part done), or
#:   the envelope is not this agent's business;
#: * **in progress** every ``ack_wait / 3`` while a fetched envelope waits or runs;
#: * **nak** (with a growing delay) when the part could not finish: log
#:   unavailable, session too busy, or an unexpected error; without delay on
#:   shutdown, so another replica takes it at once;
#: * **term** only for a message that is not an envelope at all;
#: * ``max_deliver`` is unlimited: a turn is never dropped silently; after
#:   ``max_attempts`` failed deliveries the worker ends the turn with a ``system`` item.
ACK_POLICY = AckPolicy.EXPLICIT

NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError)

#: Failed pulls in a row after which the binding is dropped and made again.
_REBIND_AFTER = 3
#: Failed pulls in a row (three re-bindings) after which a refusal is fatal.
_GIVE_UP_AFTER = 3 * _REBIND_AFTER


def consumer_name(agent: str) -> str:
    """The durable consumer shared by every replica of ``agent``."""
    return f"convlog-agent-{agent}"


def consumer_config(
    subjects: Subjects, agent: str, *, ack_wait: float, max_ack_pending: int = 1024
) -> ConsumerConfig:
    """The agent consumer: the one place its delivery and ack policy are set."""
    name = consumer_name(agent)
    return ConsumerConfig(
        name=name,
        durable_name=name,
        description=f"convlog agent {agent}: every committed item, to decide what {agent} answers",
        # A new agent sees the whole stream: a message sent before its first
        # start is still answered (finished turns are recognised from the log).
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=ACK_POLICY,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subject=subjects.items_all,
    )


class _StreamMissing(Exception):
    pass


class ConsumerConfigError(FatalError):
    """The agent's durable consumer cannot be created on the items stream."""


class AgentConsumer:
    """Pulls for one agent, binding (and re-binding) the durable consumer as needed.

    Args:
        nc: the worker's connection.
        subjects: subject and stream names.
        agent: the agent name.
        ack_wait: the consumer's ack wait, seconds.
        fetch_timeout: how long one pull waits for messages, seconds.
        stopping: set when the worker shuts down (cuts waits short).
    """

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        agent: str,
        *,
        ack_wait: float,
        fetch_timeout: float,
        stopping: asyncio.Event,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.agent = agent
        self.ack_wait = ack_wait
        self.fetch_timeout = fetch_timeout
        self.bound = asyncio.Event()
        self.rebinds = 0
        self._stopping = stopping
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stale_reason: str | None = None
        self._idle = self._errors = self._stale_checks = 0
        self._waiting_logged = False

    def mark_stale(self, reason: str) -> None:
        """Re-bind before the next pull (e.g. after a reconnect)."""
        self._stale_reason = reason

    async def ensure_bound(self) -> bool:
        """Bind (again) if needed; False after a failed attempt (already waited a moment)."""
        if self._stale_reason is not None:
            reason, self._stale_reason = self._stale_reason, None
            if self._sub is not None:
                await self._drop(reason)
        return self._sub is not None or await self._bind()

    async def fetch(self, batch: int) -> list[Msg]:
        """Up to ``batch`` messages; ``[]`` after a timeout or a failure already handled."""
        if not await self.ensure_bound():
            return []
        assert self._sub is not None
        try:
            msgs = await self._sub.fetch(batch=batch, timeout=self.fetch_timeout)
        except TimeoutError:  # nats' TimeoutError and FetchTimeoutError are TimeoutErrors
            self._idle += 1
            self._errors = 0
            if self._idle % 5 == 0:
                await self._health_check()
            return []
        except Exception as e:
            # Transient failures, and JetStream refusals a fresh binding may cure
            # (it checks the stream and the consumer again), are retried; a
            # refusal that outlasts three bindings, or anything else, is fatal.
            self._errors += 1
            refusal = isinstance(e, nats.js.errors.APIError)
            if not is_transient(e) and not (refusal and self._errors < _GIVE_UP_AFTER):
                raise
            log.info("agent %s: pull failed (%d in a row): %r", self.agent, self._errors, e)
            if self._errors % _REBIND_AFTER == 0:
                await self._drop(f"{self._errors} pull errors in a row")
            await self._pause(LOOP_BACKOFF.delay(self._errors))
            return []
        self._idle = self._errors = self._stale_checks = 0
        return msgs

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _bind(self) -> bool:
        try:
            self._sub = await self._subscribe()
        except _StreamMissing:
            if not self._waiting_logged:
                log.info("agent %s: waiting for the items stream %s (is the log service up?)",
                         self.agent, self.subjects.stream_name)
                self._waiting_logged = True
            await self._pause(1.0)
            return False
        except Exception as e:
            if not is_transient(e):
                raise
            log.info("agent %s: cannot bind the consumer yet: %r", self.agent, e)
            await self._pause(1.0)
            return False
        self.bound.set()
        return True

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        js = self.nc.jetstream()
        stream = self.subjects.stream_name
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError as e:
            raise _StreamMissing(stream) from e
        check_items_stream(info.config, self.subjects)  # else the pulls would wait forever
        config = consumer_config(self.subjects, self.agent, ack_wait=self.ack_wait)
        try:
            await js.add_consumer(stream, config)  # creates, or updates the shared one
        except nats.js.errors.BadRequestError as e:
            try:
                await js.consumer_info(stream, config.durable_name)
            except nats.js.errors.NotFoundError:
                raise ConsumerConfigError(
                    f"cannot create the consumer {config.durable_name} on the items stream "
                    f"{stream}: {e.description} (JetStream error {e.err_code})"
                ) from e
            # An existing consumer with a config that cannot be updated: use it as it is.
            log.warning("agent %s: keeping the existing consumer %s: %s",
                        self.agent, config.durable_name, e.description)
        return await js.pull_subscribe_bind(durable=config.durable_name, stream=stream)

    async def _drop(self, why: str) -> None:
        log.warning("agent %s: re-creating the pull subscription (%s)", self.agent, why)
        self.rebinds += 1
        await self.close()

    async def _health_check(self) -> None:
        """Pulls keep timing out: is the consumer gone, or the subscription stalled?"""
        if self._sub is None:
            return
        try:
            info = await self._sub.consumer_info()
        except nats.js.errors.NotFoundError:
            await self._drop("the consumer is gone")
            return
        except NATS_ERRORS:
            return
        pending = info.num_pending or 0
        capacity = (info.config.max_ack_pending or 0) - (info.num_ack_pending or 0)
        if pending > 0 and capacity > 0:
            self._stale_checks += 1
            if self._stale_checks >= 2:
                self._stale_checks = 0
                await self._drop(f"{pending} messages pending but none delivered")
        else:
            self._stale_checks = 0

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
