"""Work addressed to an agent: turn notices on ``<prefix>.work.<agent>``.

A worker of agent ``X`` must act only when a committed item asks ``X`` for a
turn: a user message while ``X`` is the session's active agent, or a handoff
output naming ``X``.  For each such item a small *notice* is published on
``<prefix>.work.agent.<X>`` (or ``<prefix>.work.entry`` when the sender does
not know the session's agent yet: the entry agent's consumer takes those),
captured by the work-queue stream ``<PREFIX>_WORK``.  Each agent has one
durable consumer there, filtered on its own subject, shared by its replicas:
one delivery per notice, to one replica.

A notice names the item: ``{"session_id", "item_order", "kind"}``.  What the
worker acts on is what the log holds, and an address that went stale (a
handoff committed meanwhile) is corrected by the receiver, which forwards the
notice to the agent the log says is active.  A notice the log service
publishes may also carry ``items``: the session's last committed envelopes up
to the trigger, byte for byte as stored, contiguous -- the very bytes a read
would return.  A worker whose copy of the session reaches into them (or a
young session carried whole) needs no read to start the turn; any other
worker, and every redelivery, reads the log as before.

Every notice is published with ``Nats-Msg-Id: <sid>:<item_order>`` (plus
``:<agent>`` when forwarded), so publishing it again -- a retried user
message, a redelivered handoff, the log service's reconciler -- is dropped by
the stream within its duplicate window, and a late duplicate only costs the
receiver a read: the log shows the turn done.

Items that start no turn: an application that runs its own agent (the
Agents SDK app behind ``ConvlogSession``) answers its user messages itself,
so it gives their ``item_id`` the prefix :data:`NO_TURN_PREFIX`
(``noturn:``).  The log service announces no item with such an id, neither
when it commits it nor when its reconciler looks again; the mark is in the
envelope, so every log-service instance, after any restart, and every
auditor reads the same answer.  A message on ``<prefix>.in.<sid>`` is by
definition for the agents, so that subject refuses the prefix.

This module holds the shape, the names and the stream config, for the log
service and the workers alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Literal

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from .codec import decode_as
from .failures import StreamConfigError
from .messages import NonNegInt, SessionId
from .routing import parse_handoff_output
from .startup import create_or_find
from .subjects import Subjects

__all__ = [
    "ENTRY",
    "Notice",
    "decode_notice",
    "encode_notice",
    "check_work_stream",
    "ensure_work_stream",
    "handoff_target_of",
    "NO_TURN_PREFIX",
    "starts_no_turn",
    "notice_msg_id",
    "publish_notice",
    "was_forwarded",
    "work_entry_subject",
    "work_stream_name",
    "work_subject",
]

#: The address of a user message whose session's agent the sender does not know.
ENTRY = "entry"
#: Seconds the work stream remembers a notice id (a republish within it is dropped).
DUPLICATE_WINDOW = 120.0
#: An ``item_id`` with this prefix starts no turn: its writer answers it (see the module).
NO_TURN_PREFIX = "noturn:"


def starts_no_turn(item_id: str | None) -> bool:
    """True when ``item_id`` marks an item the log service announces to no agent."""
    return item_id is not None and item_id.startswith(NO_TURN_PREFIX)


class Notice(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """"Item ``item_order`` of ``session_id`` asks you for a turn."

    Attributes:
        session_id: the session.
        item_order: the trigger item (a user message or a handoff output).
        kind: ``user`` or ``handoff``: a hint; the worker decides from the log.
        ts: wall-clock seconds when the notice was published (for the
            per-phase breakdown of ``convlog bench --turns``).
        items: the session's committed envelopes ending at the trigger,
            contiguous, as stored (empty: read the log).
        entry: only on a session's first item (a user message at order 1),
            from a log service that is its sessions' only writer: the routing
            checkpoint that message left -- the agent its ``to`` named, or
            ``""`` for none (the spec's entry agent answers).  ``None``: not
            known here; the receiver reads the checkpoint.
    """

    session_id: SessionId
    item_order: NonNegInt
    kind: Literal["user", "handoff"] = "user"
    ts: float = 0.0
    items: tuple[msgspec.Raw, ...] = ()
    entry: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Notice)


def encode_notice(notice: Notice) -> bytes:
    return _encoder.encode(notice)


def decode_notice(data: bytes) -> Notice:
    """Raises: msgspec.DecodeError (ValidationError included): not a notice."""
    return decode_as(_decoder, data, "a notice")


def work_stream_name(subjects: Subjects) -> str:
    """The work-queue stream capturing ``<prefix>.work.>``."""
    return subjects.prefix.replace(".", "_").upper() + "_WORK"


def work_subject(subjects: Subjects, agent: str) -> str:
    """Where notices for ``agent`` are published."""
    return f"{subjects.prefix}.work.agent.{agent}"


def work_entry_subject(subjects: Subjects) -> str:
    """Where notices for "the session's entry agent" are published."""
    return f"{subjects.prefix}.work.{ENTRY}"


def notice_msg_id(session_id: str, item_order: int, forwarded_to: str | None = None) -> str:
    base = f"{session_id}:{item_order}"
    return base if forwarded_to is None else f"{base}:{forwarded_to}"


def was_forwarded(headers: dict[str, str] | None, notice: Notice) -> bool:
    """Whether a delivered notice is one a worker forwarded (its ``Nats-Msg-Id`` names
    the agent it was sent on to), not the log service's or a handing-off worker's."""
    msg_id = (headers or {}).get("Nats-Msg-Id", "")
    return msg_id.startswith(notice_msg_id(notice.session_id, notice.item_order) + ":")


def handoff_target_of(data: dict[str, Any]) -> str | None:
    """The agent a handoff output (``{"assistant": X}``, as the Agents SDK writes it) names."""
    if data.get("type") != "function_call_output":
        return None
    return parse_handoff_output(data.get("output"))


def check_work_stream(config: StreamConfig, subjects: Subjects) -> None:
    """Refuse a work stream that would not store the notices for ``agent`` subjects.

    Raises:
        StreamConfigError: it does not capture ``<prefix>.work.>`` (someone
            created or changed it), or it is sealed: the agent's pulls would
            wait forever; or it is not a work queue on file storage: notices
            would be lost.
    """
    name = work_stream_name(subjects)
    captured = list(config.subjects or [])
    wanted = f"{subjects.prefix}.work.>"
    if wanted not in captured:
        raise StreamConfigError(
            f"the work stream {name} captures {captured}, not {wanted}: it was created or changed "
            "by something else. Fix its subjects, or delete it (the log service creates it again)"
        )
    if config.sealed:
        raise StreamConfigError(f"the work stream {name} is sealed: it stores nothing more")
    # Interest retention drops a notice no consumer wants yet (acked all the same);
    # memory storage loses the unacked ones with a server restart.
    kept = {"retention": RetentionPolicy.WORK_QUEUE, "storage": StorageType.FILE}
    wrong = {key: str(getattr(getattr(config, key), "value", getattr(config, key)))
             for key, value in kept.items() if getattr(config, key) not in (value, None)}
    if wrong:
        raise StreamConfigError(
            f"the work stream {name} has {', '.join(f'{k} {v}' for k, v in wrong.items())}, not "
            f"{', '.join(f'{k} {kept[k].value}' for k in wrong)}: it was created or changed by something "
            "else and would lose notices. Delete it (the log service creates it again)"
        )


async def ensure_work_stream(js: JetStreamContext, subjects: Subjects, *, replicas: int = 1) -> None:
    """Create the work stream if it does not exist (idempotent; log service and workers).

    Raises:
        StreamConfigError: an existing one would lose notices (:func:`check_work_stream`).
    """
    name = work_stream_name(subjects)
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        pass
    else:
        check_work_stream(info.config, subjects)  # made by something else: it must not lose notices
        if not info.config.allow_atomic:  # created before the log service batched its notices
            with contextlib.suppress(nats.js.errors.Error):  # a server before 2.12: one publish each
                await js.update_stream(dataclasses.replace(info.config, allow_atomic=True))
        return
    config = StreamConfig(
        name=name,
        subjects=[f"{subjects.prefix}.work.>"],
        retention=RetentionPolicy.WORK_QUEUE,  # a notice is gone once its agent acked it
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW,
        # The log service stores the notices of a loaded moment in atomic
        # batches: one fsync for many (services/log/pubacks.py).
        allow_atomic=True,
    )
    await create_or_find(lambda: js.add_stream(config), lambda: js.stream_info(name))


async def publish_notice(
    nc: Client, subject: str, notice: Notice, msg_id: str, *, wait: float = 5.0,
    headers: dict[str, str] | None = None,
) -> None:
    """Publish a notice and wait until the work stream holds it (or dropped it as a duplicate).

    ``headers`` may add a ``traceparent``: the worker's turn continues that trace.

    Raises:
        nats.errors.Error / nats.js.errors.Error: not stored (transient ones retry).
    """
    js = nc.jetstream()
    await js.publish(subject, encode_notice(notice), timeout=wait, headers={**(headers or {}), "Nats-Msg-Id": msg_id})


def now() -> float:
    """Wall-clock seconds for :attr:`Notice.ts`."""
    return time.time()
