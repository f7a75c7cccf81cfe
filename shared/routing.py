"""The routing KV value: one Struct, written and read by the same code.

Routing state (a session's active agent) is agent metadata, not conversation:
it lives in the KV bucket ``<prefix>_routing`` keyed by session id.  Only the log
service writes it: the entry agent (``to``) of a new session, and, after each
committed handoff item, "after this item, its target is active"
(:func:`handoff_target_of` reads a handoff the way workers write it).  So an
agent's NATS user needs no write access to the bucket, and a checkpoint always
names an item of the log that workers can check it against.  It encodes with
:func:`encode_checkpoint`, and workers read with :func:`decode_checkpoint`,
so the shape lives here, once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
import nats.js.errors
from msgspec import Meta
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from .codec import decode_as
from .messages import AgentName, NonNegInt
from .startup import create_or_find
from .subjects import Subjects

__all__ = [
    "EntryProof",
    "RoutingCheckpoint",
    "decode_checkpoint",
    "encode_checkpoint",
    "entry_checkpoint",
    "handoff_target_of",
    "open_routing_bucket",
    "parse_handoff_output",
]


class EntryProof(msgspec.Struct, frozen=True, kw_only=True):
    """The gateway's signature of a session's entry agent: the ``to_sig`` of the
    user message that asked for it (``shared.signing.route_signing_input``)."""

    item_id: str
    key_id: str
    to_sig: str


class RoutingCheckpoint(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """"After item ``order``, ``active`` is the active agent; the session began at ``entry``."

    Unknown fields are ignored on decoding (not refused), so a newer writer can
    add fields without breaking an older reader.

    Attributes:
        active: the active agent.
        order: the ``item_order`` the checkpoint is valid after (0: before any item).
        entry: the session's entry agent, if recorded.
        entry_proof: the gateway's signature of ``entry``, when the message was signed.
    """

    active: AgentName
    order: NonNegInt
    entry: Annotated[str, Meta(min_length=1)] | None = None
    entry_proof: EntryProof | None = None


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
        msgspec.DecodeError: not JSON (or nested too deeply to decode).
        msgspec.ValidationError: the wrong shape, naming the field.
    """
    cp = decode_as(_decoder, value, "a checkpoint")
    if cp.entry is None and cp.order == 0:
        return msgspec.structs.replace(cp, entry=cp.active)
    return cp


#: Longer than any handoff output (``{"assistant": X}``, agent names are short):
#: a longer string is not parsed at all.  An item's data nests at most 100 levels,
#: but a string in it can hold JSON of any depth, on which ``json.loads`` raised
#: RecursionError: in the log service's commit listener that stopped the service.
_MAX_HANDOFF_OUTPUT = 1024


def parse_handoff_output(output: Any) -> str | None:
    """The target agent if ``output`` is a handoff output (``{"assistant": X}``), else ``None``."""
    if not isinstance(output, str) or not output.startswith("{") or len(output) > _MAX_HANDOFF_OUTPUT:
        return None
    try:
        parsed = json.loads(output)
    except (ValueError, RecursionError):  # RecursionError: JSON nested ~1000 deep in the string
        return None
    if isinstance(parsed, dict) and len(parsed) == 1 and isinstance(parsed.get("assistant"), str):
        return parsed["assistant"]
    return None


def handoff_target_of(kind: str, data: Mapping[str, Any]) -> str | None:
    """The agent an item hands the conversation to (a handoff's ``function_call_output``), or ``None``."""
    if kind != "item" or data.get("type") != "function_call_output":
        return None
    return parse_handoff_output(data.get("output"))


def entry_checkpoint(agent: str, proof: EntryProof | None = None) -> RoutingCheckpoint:
    """What the log service records when a user message with ``to`` starts a session."""
    return RoutingCheckpoint(active=agent, order=0, entry=agent, entry_proof=proof)


async def open_routing_bucket(nc: Client, subjects: Subjects, *, replicas: int = 1) -> Any:
    """Open the routing KV bucket, creating it if missing (log service and workers alike)."""
    js = nc.jetstream()
    try:
        return await js.key_value(subjects.routing_bucket)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        config = KeyValueConfig(bucket=subjects.routing_bucket, history=5, replicas=replicas)
        return await create_or_find(lambda: js.create_key_value(config),
                                    lambda: js.key_value(subjects.routing_bucket))
