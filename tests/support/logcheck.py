"""End-state checks of the log: is every session whole, does the items stream match it.

The checks read the log through :class:`~shared.client.LogClient` and the
items stream through JetStream (``get_msg`` by sequence), never through a core
subscription on a captured subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

from nats.aio.client import Client

from shared.chain import verify
from shared.client import LogClient
from shared.codec import decode
from shared.messages import Envelope
from shared.subjects import Subjects

from .eventually import assert_eventually
from .load import Acks, read_acks

__all__ = [
    "SUBJECTS",
    "assert_load_kept",
    "check_session",
    "check_sessions",
    "following",
    "read_stream",
    "stream_matches_log",
]

SUBJECTS = Subjects("convlog")


def check_session(
    session_id: str, envelopes: list[Envelope], acked: Mapping[tuple[str, str], int],
    hashes: Mapping[tuple[str, str], str] | None = None,
) -> None:
    """Assert the log of one session is whole: orders 1..n, ids unique, chain valid,
    and every acknowledged item at its acknowledged order (with its acknowledged
    hash, for the items in ``hashes``)."""
    orders = [e.item_order for e in envelopes]
    assert orders == list(range(1, len(envelopes) + 1)), f"{session_id}: orders not 1..n"
    ids = [e.item_id for e in envelopes]
    assert len(set(ids)) == len(ids), f"{session_id}: duplicate item_ids in the log"
    problem = verify(envelopes, session_id=session_id)
    assert problem is None, f"{session_id}: chain does not verify: {problem}"
    at = {e.item_id: e.item_order for e in envelopes}
    for (sid, iid), order in acked.items():
        if sid == session_id:
            assert at.get(iid) == order, f"{sid}: acked {iid} at {order}, log has {at.get(iid)}"
    hash_of = {e.item_id: e.hash for e in envelopes}
    for (sid, iid), h in (hashes or {}).items():
        if sid == session_id:
            assert hash_of.get(iid) == h, f"{sid}: acked {iid} with hash {h}, log has {hash_of.get(iid)}"


@contextlib.asynccontextmanager
async def following(
    client: LogClient, session_id: str, *, after: int = 0
) -> AsyncIterator[list[Envelope]]:
    """Run ``client.follow(session_id)`` in a task for the block; yields the list it fills."""
    seen: list[Envelope] = []

    async def consume() -> None:
        async for env in client.follow(session_id, after=after, idle_check=1.0):
            seen.append(env)

    task = asyncio.create_task(consume(), name=f"follow-{session_id}")
    try:
        yield seen
    finally:
        # Bounded: a follower that ignores cancellation fails the test, never hangs it.
        for _ in range(3):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            if done:
                break
        else:
            raise AssertionError(f"the follower of {session_id} ignored 3 cancellations")
        if not task.cancelled() and task.exception() is not None:
            raise AssertionError(f"the follower of {session_id} died") from task.exception()


async def read_stream(nc: Client, stream: str = SUBJECTS.stream_name) -> list[tuple[str, str, bytes]]:
    """Every message in the items stream as (subject, Nats-Msg-Id, data), in stream order."""
    js = nc.jetstream(timeout=5)
    info = await js.stream_info(stream)
    out: list[tuple[str, str, bytes]] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq=seq, direct=True)
        out.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id", ""), msg.data or b""))
    return out


async def stream_matches_log(nc: Client, client: LogClient, sessions: Iterable[str]) -> None:
    """Assert the items stream holds exactly the log: each committed envelope once, in
    ``item_order``, with ``Nats-Msg-Id: <sid>:<order>``, byte-identical, and nothing else.

    Meant for ``assert_eventually``: the outbox publishes asynchronously.
    """
    msgs = await read_stream(nc)
    per: dict[str, list[tuple[str, bytes]]] = {}
    for subject, msg_id, data in msgs:
        sid = subject.rpartition(".")[2]
        per.setdefault(sid, []).append((msg_id, data))
    total = 0
    for sid in sessions:
        log_envs = await client.items(sid)
        total += len(log_envs)
        got = per.get(sid, [])
        ids = [m for m, _ in got]
        assert len(ids) == len(set(ids)), f"{sid}: a message id is in the stream twice"
        assert ids == [f"{sid}:{e.item_order}" for e in log_envs], (
            f"{sid}: stream has {len(ids)} msgs, log {len(log_envs)}; "
            f"first difference at {_first_diff(ids, [f'{sid}:{e.item_order}' for e in log_envs])}"
        )
        assert [decode(d, Envelope) for _, d in got] == log_envs, f"{sid}: envelopes differ"
    assert len(msgs) == total, f"stream holds {len(msgs)} messages, the logs {total}"


def _first_diff(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"index {i}: stream {x!r} vs log {y!r}"
    return f"index {min(len(a), len(b))} (one is a prefix of the other)"


async def check_sessions(client: LogClient, sessions: Iterable[str], acks: Acks) -> int:
    """:func:`check_session` for each of ``sessions``; the number of items they hold."""
    logged = 0
    for sid in sessions:
        envelopes = await client.items(sid)
        check_session(sid, envelopes, acks.by_item)
        logged += len(envelopes)
    return logged


async def assert_load_kept(
    nats_url: str, outs: Iterable[str | os.PathLike[str]], sessions: Sequence[str], writers: int
) -> Acks:
    """After a load run whose writers all finished: no append's outcome stayed unknown,
    every session is whole with each acknowledged item at its acknowledged order, the
    log holds exactly the acknowledged items, and the items stream matches the log.
    Returns what the writers acknowledged."""
    acks = read_acks(outs)
    assert acks.done == writers
    assert not acks.unknown, f"appends whose outcome stayed unknown: {acks.unknown[:5]}"
    async with await LogClient.connect(nats_url) as client:
        # No acked item lost, none duplicated, orders contiguous, chain intact.
        logged = await check_sessions(client, sessions, acks)
        # Every append was acknowledged in the end, so the log holds exactly the acked items.
        assert logged == acks.items == len(acks.by_item)
        # The items stream holds every committed envelope exactly once, in order.
        await assert_eventually(
            lambda: stream_matches_log(client.nc, client, sessions), timeout=30, interval=0.25
        )
    return acks
