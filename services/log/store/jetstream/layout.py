"""Where the JetStream store keeps a log: one stream, two subject families.

``<prefix>.items.<sid>``
    Every envelope of session ``sid``, in ``item_order``: message k on this
    subject IS item k.  The envelope bytes are the message body and the
    header ``Nats-Msg-Id: <sid>:<item_order>`` is set, exactly as the SQLite
    store's outbox publishes them — so followers and workers read the same
    subject either way, and on this store the stream is the log and its
    fan-out at once (no outbox).

``<prefix>.ids.<sid>.<token>``
    One small record per stored ``item_id`` (``token`` is the id in
    lowercase base32: subject-safe and reversible, so two ids never share a
    subject).  It is written in the same atomic batch as its item with
    ``Nats-Expected-Last-Subject-Sequence: 0``: the subject must be empty, a
    uniqueness constraint with no time window (``Nats-Msg-Id`` dedupe alone
    forgets after ``duplicate_window``).  Its body ``{"item_order", "hash"}``
    answers a retry with the original order and hash.

Both families live in ONE stream (``<PREFIX>_ITEMS``, the name workers and
followers already bind to) because an atomic batch cannot span streams.
"""

from __future__ import annotations

import base64
import logging

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from shared.subjects import Subjects

__all__ = ["Layout", "ensure_log_stream"]

log = logging.getLogger("convlog.store.jetstream")

#: JetStream's error code for a stream created meanwhile under the same name.
_STREAM_NAME_IN_USE = 10058


class Layout:
    """Subject names of the JetStream store for one prefix."""

    def __init__(self, subjects: Subjects) -> None:
        self.subjects = subjects
        self.stream = subjects.stream_name
        self.items_all = subjects.items_all
        self.ids_all = f"{subjects.prefix}.ids.>"
        self._items = f"{subjects.prefix}.items."
        self._ids = f"{subjects.prefix}.ids."

    def items(self, sid: str) -> str:
        """The subject of a session's envelopes (``sid`` is validated upstream)."""
        return self._items + sid

    def session_of(self, items_subject: str) -> str:
        return items_subject[len(self._items) :]

    def id_subject(self, sid: str, item_id: str) -> str:
        token = base64.b32encode(item_id.encode()).decode().rstrip("=").lower()
        return f"{self._ids}{sid}.{token}"

    def stream_config(self, replicas: int) -> StreamConfig:
        """The log stream.

        * ``allow_atomic``: a multi-item append (items plus their id records)
          is stored whole or not at all (ADR-50, nats-server >= 2.12).
        * ``allow_direct``: reads are direct gets (``last_by_subj``,
          ``next_by_subj`` batches, ``multi_last``) that any replica answers.
        * limits retention with no limits and ``discard: new``: nothing is
          ever aged out of a log; were a limit set by hand, new appends would
          be refused rather than history dropped.
        * ``deny_delete`` / ``deny_purge``: the log is append-only through
          the API too (retract and clear are envelopes, not deletions).
        * file storage, ``replicas`` copies (R3 on a cluster).
        """
        return StreamConfig(
            name=self.stream,
            subjects=[self.items_all, self.ids_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            num_replicas=replicas,
            duplicate_window=120.0,
            allow_direct=True,
            allow_atomic=True,
            deny_delete=True,
            deny_purge=True,
        )


async def ensure_log_stream(js: JetStreamContext, layout: Layout, *, replicas: int = 1) -> None:
    """Create the log stream, or bring an existing one up to what the store needs.

    An items stream the SQLite store's outbox created already holds valid
    envelopes; it only gains the ids subjects, atomic batches and direct gets.
    """
    wanted = layout.stream_config(replicas)
    try:
        info = await js.stream_info(layout.stream)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(wanted)
            return
        except nats.js.errors.BadRequestError as e:
            if e.err_code != _STREAM_NAME_IN_USE:  # anything but another instance winning the race
                raise
        info = await js.stream_info(layout.stream)
    cfg = info.config
    subjects = list(cfg.subjects or [])
    missing = [s for s in (layout.items_all, layout.ids_all) if s not in subjects]
    if missing or not cfg.allow_atomic or not cfg.allow_direct:
        cfg.subjects = subjects + missing
        cfg.allow_atomic = True
        cfg.allow_direct = True
        log.info("updating stream %s for the JetStream store (subjects %s, atomic, direct)", layout.stream, cfg.subjects)
        await js.update_stream(cfg)
