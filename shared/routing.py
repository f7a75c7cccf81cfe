"""The routing KV value: one Struct, written and read by the same code.

Routing state (a session's active agent) is agent metadata, not conversation:
it lives in the KV bucket ``<prefix>_routing`` keyed by session id.  Two sides
write it: the log service records the entry agent (``to``) of a new session,
and workers checkpoint the active agent.  Both encode with
:func:`encode_checkpoint`, and workers read with :func:`decode_checkpoint`,
so the shape lives here, once.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import nats.js.errors
from msgspec import Meta
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from .messages import AgentName, NonNegInt
from .subjects import Subjects

__all__ = [
    "RoutingCheckpoint",
    "decode_checkpoint",
    "encode_checkpoint",
    "entry_checkpoint",
    "open_routing_bucket",
]


class RoutingCheckpoint(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """"After item ``order``, ``active`` is the active agent; the session began at ``entry``."

    Unknown fields are ignored on decoding (not refused), so a newer writer can
    add fields without breaking an older reader.

    Attributes:
        active: the active agent.
        order: the ``item_order`` the checkpoint is valid after (0: before any item).
        entry: the session's entry agent, if recorded.
    """

    active: AgentName
    order: NonNegInt
    entry: Annotated[str, Meta(min_length=1)] | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RoutingCheckpoint)


def encode_checkpoint(checkpoint: RoutingCheckpoint) -> bytes:
    """The KV value for ``checkpoint``."""
    return _encoder.encode(checkpoint)


def decode_checkpoint(value: bytes) -> RoutingCheckpoint:
    """A KV value back as a checkpoint.

    A value without ``entry`` at order 0 (written before ``entry`` was
    recorded) names its ``active`` agent as the entry.

    Raises:
        msgspec.DecodeError: not JSON.
        msgspec.ValidationError: the wrong shape, naming the field.
    """
    cp = _decoder.decode(value)
    if cp.entry is None and cp.order == 0:
        return msgspec.structs.replace(cp, entry=cp.active)
    return cp


def entry_checkpoint(agent: str) -> RoutingCheckpoint:
    """What the log service records when a user message with ``to`` starts a session."""
    return RoutingCheckpoint(active=agent, order=0, entry=agent)


async def open_routing_bucket(nc: Client, subjects: Subjects, *, replicas: int = 1) -> Any:
    """Open the routing KV bucket, creating it if missing (log service and workers alike)."""
    js = nc.jetstream()
    try:
        return await js.key_value(subjects.routing_bucket)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        try:
            return await js.create_key_value(
                KeyValueConfig(bucket=subjects.routing_bucket, history=5, replicas=replicas)
            )
        except nats.js.errors.BadRequestError:  # created concurrently with another config
            return await js.key_value(subjects.routing_bucket)
