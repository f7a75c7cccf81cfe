"""Which server leads the JetStream store's streams (for fault benches and tests).

The store's streams are the ones whose name starts with the prefix's stream
name stem: ``<PREFIX>_`` (``CONVLOG_ITEMS`` today, and any ``<PREFIX>_LOG_<k>``
shard streams), as :attr:`shared.subjects.Subjects.stream_name` names them.
KV buckets (``KV_<prefix>_...``) are not among them.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext

from shared.subjects import Subjects

__all__ = ["StreamLeader", "busiest_leader", "store_streams", "stream_stem"]


@dataclass(frozen=True)
class StreamLeader:
    """One of the store's streams, its message count and its leader's server name."""

    stream: str
    messages: int
    leader: str | None
    replicas: int


def stream_stem(prefix: str) -> str:
    """``convlog`` -> ``CONVLOG_``: every stream of the store starts with it."""
    return Subjects(prefix).stream_name.removesuffix("ITEMS")


async def store_streams(js: JetStreamContext, prefix: str) -> list[StreamLeader]:
    """The store's streams with their leaders, fresh from each stream's info."""
    stem = stream_stem(prefix)
    names = [i.config.name for i in await js.streams_info() if (i.config.name or "").startswith(stem)]
    out = []
    for name in sorted(n for n in names if n):
        info = await js.stream_info(name)
        out.append(StreamLeader(
            stream=name, messages=info.state.messages,
            leader=info.cluster.leader if info.cluster is not None else None,
            replicas=info.config.num_replicas or 1,
        ))
    return out


async def busiest_leader(js: JetStreamContext, prefix: str) -> StreamLeader:
    """The store's stream holding most messages, and who leads it (among the
    ``<PREFIX>_LOG_<k>`` shard streams appends go to, when there are any).

    Raises:
        LookupError: no stream of the store exists, or it has no leader now.
    """
    streams = await store_streams(js, prefix)
    if not streams:
        raise LookupError(f"no stream named {stream_stem(prefix)}* exists")
    # Where appends are written: the shard streams when the store has them
    # (the items stream then only sources them), else the items stream.
    shards = [s for s in streams if s.stream.startswith(stream_stem(prefix) + "LOG_")]
    top = max(shards or streams, key=lambda s: s.messages)
    if not top.leader:
        raise LookupError(f"stream {top.stream} has no leader right now")
    return top
