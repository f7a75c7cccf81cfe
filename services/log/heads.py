"""The head witness: every session written to gets its head signed by the log
service within ``interval`` seconds of a commit, kept outside the store in
the KV bucket ``<prefix>_heads`` (one key per session, the latest head).

A store that later loses or cuts its tail (a restored backup, an edited
file) then contradicts a head the service signed earlier, and ``convlog
replay`` from the service says so.  The window: items committed less than
``interval`` seconds before the loss are not yet covered by any witness head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from shared.errors import UnavailableError
from shared.messages import SignedHead
from shared.signing import Signer, sign_head
from shared.startup import create_or_find
from shared.subjects import Subjects

from .kv_forward import put_forward
from .store.base import Committed, LogStore
from .store.ordering import now_rfc3339

__all__ = ["HeadWitness", "read_witness_head"]

log = logging.getLogger("convlog.log.heads")

_last = msgspec.json.Decoder(type=dict)
_head = msgspec.json.Decoder(SignedHead)
#: Sessions whose last stored head a witness remembers (moved on without a store read).
_HELD = 65536


async def _bucket(nc: Client, subjects: Subjects, *, create: bool, replicas: int = 1) -> Any:
    js = nc.jetstream()
    try:
        return await js.key_value(subjects.heads_bucket)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        if not create:
            return None
        config = KeyValueConfig(bucket=subjects.heads_bucket, history=1, replicas=replicas)
        return await create_or_find(lambda: js.create_key_value(config), lambda: js.key_value(config.bucket))


async def read_witness_head(nc: Client, subjects: Subjects, session_id: str) -> SignedHead | None:
    """The latest witness head of a session, or ``None`` (no bucket, no head, undecodable).

    Raises:
        UnavailableError: the bucket did not answer (down, JetStream unavailable, or this
            NATS user may not read it: nats-server drops a request it forbids, and the
            request times out).  Not ``None``: that would pass off a head that exists
            as none, and the truncation check with it.
    """
    try:
        kv = await _bucket(nc, subjects, create=False)
        if kv is None:
            return None
        entry = await kv.get(session_id)
        return _head.decode(entry.value) if entry.value else None
    except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error) as e:
        # nats.js.errors.Error: JetStream not answering (ServiceUnavailableError for no
        # responders, a cluster without quorum): no more "no head" than a timeout is.
        raise UnavailableError(f"cannot read the signed heads in the KV bucket {subjects.heads_bucket}: "
                               f"{e} (may this NATS user read it?)") from e


class HeadWitness:
    """Sign the heads of written sessions every ``interval`` seconds.

    Args:
        nc: the log service's connection.
        subjects: the prefix's names.
        signer: the log service's key.
        interval: the longest a committed item waits to be covered by a witness head.
        store: the log; a stored head is moved on only while the log still holds its
            hash at its order (a store restored from an older copy and written past
            the head keeps contradicting it, instead of the head following the fork).
    """

    def __init__(
        self, nc: Client, subjects: Subjects, signer: Signer, *, interval: float = 1.0, replicas: int = 1,
        store: LogStore | None = None,
    ) -> None:
        self.nc, self.subjects, self.signer = nc, subjects, signer
        self.interval = interval
        self.replicas = replicas
        self.store = store
        self.signed = 0
        self._dirty: dict[str, bytes] = {}  # session -> its newest committed envelope
        self._held: dict[str, tuple[int, str]] = {}  # session -> (order, hash) of the head it stored last
        self._kv: Any = None
        self._task: asyncio.Task[None] | None = None
        self._refused: str | None = None  # why the key may not sign, as said last

    async def start(self) -> None:
        self._kv = await _bucket(self.nc, self.subjects, create=True, replicas=self.replicas)
        # The sessions written last before this start (SQLite: this process is their only
        # writer): a crash (kill -9) may have come before their heads were signed, and an
        # idle session would otherwise keep its newest items unwitnessed for good.
        recent = getattr(self.store, "recent_heads", None)
        if recent is not None:
            for sid, raw in await recent(2 * self.interval):
                self._dirty.setdefault(sid, raw)
        self._task = asyncio.create_task(self._loop(), name="convlog-head-witness")

    def on_commit(self, batch: Sequence[Committed]) -> None:
        """Commit listener: remember each session's newest envelope (no I/O here)."""
        for c in batch:
            self._dirty[c.session_id] = c.envelope

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as e:  # the next round retries what is still dirty
                log.warning("signing session heads failed: %s: %s", type(e).__name__, e)

    async def flush(self) -> None:
        """Sign and store the head of every session written since the last flush.

        Not while the log's key may not sign (its keyring retired it, and its file holds
        no successor yet): such a head verifies nowhere, and once stored it would outlive
        the successor's arrival (a head moves forward only).  The sessions stay to sign."""
        if self._dirty and (why := self.signer.refused()) is not None:
            if why != self._refused:  # said once per cause
                log.error("session heads not signed until the log service's key may sign: %s", why)
            self._refused = why
            return
        self._refused = None
        dirty, self._dirty = self._dirty, {}
        signed_at = now_rfc3339()
        puts = []
        for sid, raw in dirty.items():
            env = _last.decode(raw)
            head = sign_head(self.signer, sid, int(env["item_order"]), str(env["hash"]), signed_at)
            puts.append((sid, raw, head))
        for i in range(0, len(puts), 256):
            chunk = puts[i : i + 256]
            try:  # a chunk's stores made only now: a cancel leaves none of them never awaited
                results = await asyncio.gather(*(self._store(sid, h) for sid, _, h in chunk),
                                               return_exceptions=True)
            except asyncio.CancelledError:  # stopping: keep what is not known stored for stop()
                for sid, raw, _ in puts[i:]:
                    self._dirty.setdefault(sid, raw)
                raise
            for (sid, raw, _), res in zip(chunk, results, strict=True):
                if isinstance(res, BaseException):
                    self._dirty.setdefault(sid, raw)  # retry next round (unless newer came)
                else:
                    self.signed += 1

    async def _store(self, sid: str, head: SignedHead) -> None:
        """Store ``head`` unless the bucket holds a later one (another instance's):
        compare-and-set on the revision, forward only."""

        async def over(stored: bytes | None) -> bytes | None:
            if stored:
                try:
                    old = _head.decode(stored)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    return msgspec.json.encode(head)
                if old.item_order >= head.item_order:
                    return None
                if not await self._holds(sid, old):
                    log.error("session %s: the log does not hold item_order %d with the hash the witness "
                              "head signed at %s: that head is kept", sid, old.item_order, old.signed_at)
                    return None
            return msgspec.json.encode(head)

        written = await put_forward(self._kv, sid, over)
        if written is None:
            raise RuntimeError(f"the witness head of {sid} kept changing under ten writes")
        if written:
            self._held.pop(sid, None)
            if len(self._held) >= _HELD:
                del self._held[next(iter(self._held))]
            self._held[sid] = (head.item_order, head.hash)

    async def _holds(self, sid: str, old: SignedHead) -> bool:
        """Whether the log holds ``old``'s hash at its order (what a new head may move past)."""
        if old.item_order <= 0 or self.store is None or self._held.get(sid) == (old.item_order, old.hash):
            return True
        page = await self.store.read(sid, after=old.item_order - 1, limit=1, max_bytes=1 << 20, visible=False)
        if not page.items:
            # Nothing there, yet a later item is being signed: a replica that trails the
            # stream leader answered (orders are contiguous: a store that lost this order
            # holds no later one). Not a fork; say nothing.
            return True
        env = _last.decode(page.items[0])
        return bool(env.get("item_order") == old.item_order and env.get("hash") == old.hash)

    async def stop(self, within: float = 5.0) -> None:
        """Stop the loop and sign what is still pending (best effort, for up to ``within``
        seconds: a KV that does not answer costs a timeout per chunk of 256 sessions)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._kv is not None and self._dirty:
            with contextlib.suppress(Exception):  # TimeoutError included
                async with asyncio.timeout(within):
                    await self.flush()
