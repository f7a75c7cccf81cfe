"""Where the JetStream store keeps a log: N log streams, and the fan-out stream.

``<prefix>.log.<k>.<sid>.<token>`` in stream ``<PREFIX>_LOG_<k>`` (a *shard*)
    One message per item of session ``sid``, whose shard ``k`` is a stable
    hash of the id (:meth:`Layout.shard_of`); ``token`` is the item's
    ``item_id`` in lowercase base32 (subject-safe and reversible, so two ids
    never share a subject).  The body is the envelope, byte for byte as
    served and exported; the header ``Nats-Msg-Id: <sid>:<item_order>``.
    The session's messages, in stream order, are its items in ``item_order``
    (``next_by_subj`` on ``<prefix>.log.<k>.<sid>.*``).

    A log stream keeps at most one message per subject and refuses a second
    (``max_msgs_per_subject: 1``, ``discard: new``, ``discard_new_per_subject``):
    an ``item_id`` is stored once, ever — a uniqueness constraint with no time
    window, where ``Nats-Msg-Id`` dedupe forgets after ``duplicate_window``.

``<prefix>.items.<sid>`` in stream ``<PREFIX>_ITEMS`` (the contract's fan-out)
    *Sources* every log stream with a subject transform back to
    ``<prefix>.items.<sid>``: workers and ``LogClient.follow`` consume it as
    on the SQLite store.  Each source is copied in order, so every session's
    items reach it in ``item_order``.  Reads never use it (it trails the log
    streams by the copy): they are direct gets on the log streams.

The number of shards is fixed when the log is created; it is recorded in the
metadata of every stream (``convlog_shards``) and a store opened with another
number refuses to start (:func:`ensure_streams`).
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from typing import Any

import nats.js.errors
from nats.aio.client import Client

from shared.errors import NotFoundError
from shared.failures import StreamConfigError
from shared.subjects import Subjects

__all__ = ["SHARDS_KEY", "Layout", "ensure_streams"]

log = logging.getLogger("convlog.store.jetstream")

#: JetStream's error code for a stream created meanwhile under the same name.
_STREAM_NAME_IN_USE = 10058
#: JetStream's error code for a stream whose subjects another stream takes.
_SUBJECTS_OVERLAP = 10065
#: Stream metadata key recording the number of shards the log was created with.
SHARDS_KEY = "convlog_shards"


class Layout:
    """Subject and stream names of the JetStream store for one prefix.

    Args:
        subjects: the contract's subjects for the prefix.
        shards: log streams the sessions are spread over.
    """

    def __init__(self, subjects: Subjects, shards: int = 1) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self.subjects = subjects
        self.shards = shards
        self.prefix = subjects.prefix
        self.stream = subjects.stream_name  # the fan-out, <PREFIX>_ITEMS
        self.items_all = subjects.items_all
        self._items = f"{subjects.prefix}.items."
        self._log = f"{subjects.prefix}.log."
        base = self.stream[: -len("_ITEMS")] if self.stream.endswith("_ITEMS") else self.stream
        self.log_streams = [f"{base}_LOG_{k}" for k in range(shards)]
        self._shard_cache: dict[str, int] = {}

    def shard_of(self, sid: str) -> int:
        """The session's shard: CRC-32 of its id modulo the shard count (stable
        across processes and versions, unlike Python's ``hash``)."""
        if self.shards == 1:
            return 0
        k = self._shard_cache.get(sid)
        if k is None:
            if len(self._shard_cache) > 100_000:
                self._shard_cache.clear()
            k = self._shard_cache[sid] = zlib.crc32(sid.encode()) % self.shards
        return k

    def items(self, sid: str) -> str:
        """The fan-out subject of a session (``sid`` is validated upstream)."""
        return self._items + sid

    def session_of_items(self, items_subject: str) -> str:
        return items_subject[len(self._items) :]

    def session_filter(self, sid: str) -> str:
        """Every item subject of one session, in its shard's log stream."""
        return f"{self._log}{self.shard_of(sid)}.{sid}.*"

    def log_all(self, k: int) -> str:
        return f"{self._log}{k}.>"

    def item_subject(self, sid: str, item_id: str) -> str:
        token = base64.b32encode(item_id.encode()).decode().rstrip("=").lower()
        return f"{self._log}{self.shard_of(sid)}.{sid}.{token}"

    @staticmethod
    def session_of_log(log_subject: str) -> str:
        """The session of ``<prefix>.log.<k>.<sid>.<token>``."""
        return log_subject.rsplit(".", 2)[1]

    def log_stream_config(self, k: int, replicas: int) -> dict[str, Any]:
        """Shard ``k``'s log stream.

        * ``max_msgs_per_subject: 1`` + ``discard: new`` +
          ``discard_new_per_subject``: an item subject (session + item_id)
          takes one message, ever; a second is refused (10077).
        * ``allow_atomic``: a multi-item append is stored whole or not at all
          (ADR-50, nats-server >= 2.12).
        * ``allow_direct``: reads are direct gets (``last_by_subj`` with the
          session's wildcard, ``next_by_subj`` batches) any replica answers.
        * limits retention with no other limit: nothing ages out of a log.
        * ``deny_delete`` / ``deny_purge``: append-only through the API too
          (retract and clear are envelopes, not deletions).
        * file storage, ``replicas`` copies (R3 on a cluster).
        """
        return {
            "name": self.log_streams[k],
            "subjects": [self.log_all(k)],
            "retention": "limits",
            "storage": "file",
            "discard": "new",
            "discard_new_per_subject": True,
            "max_msgs_per_subject": 1,
            "num_replicas": replicas,
            "duplicate_window": 120_000_000_000,
            "allow_direct": True,
            "allow_atomic": True,
            "deny_delete": True,
            "deny_purge": True,
            "metadata": {SHARDS_KEY: str(self.shards)},
        }

    def sources(self) -> list[dict[str, Any]]:
        """The fan-out's sources: every log stream, its subjects mapped back
        to ``<prefix>.items.<sid>``."""
        out = []
        for k, name in enumerate(self.log_streams):
            src = f"{self._log}{k}.*.*"
            out.append({"name": name, "subject_transforms": [{"src": src, "dest": self._items + "{{wildcard(1)}}"}]})
        return out

    def items_stream_config(self, replicas: int) -> dict[str, Any]:
        """The fan-out stream: the items subjects (as the SQLite store's outbox
        stream has them, so every check of the contract's stream holds) and
        the log streams as sources.  ``discard: old`` like the outbox's stream."""
        return {
            "name": self.stream,
            "subjects": [self.items_all],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "num_replicas": replicas,
            "duplicate_window": 120_000_000_000,
            "allow_direct": True,
            "sources": self.sources(),
            "metadata": {SHARDS_KEY: str(self.shards)},
        }


class StreamRefused(nats.js.errors.APIError):
    """JetStream answered a stream request with an error: its code and err_code
    kept (so :func:`shared.failures.is_transient` can judge it), its text ours."""

    def __init__(self, message: str, error: dict[str, Any]) -> None:
        super().__init__(code=error.get("code"), err_code=error.get("err_code"), description=message)

    def __str__(self) -> str:
        return str(self.description)


def _failed(message: str, reply: dict[str, Any]) -> StreamRefused:
    error = reply["error"]
    return StreamRefused(f"{message}: {error.get('description')}", error)


async def _api(nc: Client, subject: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """One JetStream API request; a timeout or no responders is raised as nats-py
    raised it (transient: JetStream is starting or electing)."""
    msg = await nc.request(f"$JS.API.{subject}", json.dumps(body or {}).encode(), timeout=timeout)
    result: dict[str, Any] = json.loads(msg.data)
    return result


def _not_found(reply: dict[str, Any]) -> bool:
    return reply.get("error", {}).get("err_code") == 10059  # stream not found


def _refuse(message: str) -> None:
    raise StreamConfigError(message)


def _check_shards(layout: Layout, name: str, config: dict[str, Any]) -> None:
    recorded = (config.get("metadata") or {}).get(SHARDS_KEY)
    if recorded is not None and recorded != str(layout.shards):
        _refuse(
            f"the log in stream {name} was created with CONVLOG_SHARDS={recorded}, not {layout.shards}: "
            f"start every log service with CONVLOG_SHARDS={recorded} (to change it, migrate the log "
            "to SQLite and back into a new prefix)"
        )


def _check_log_stream(layout: Layout, k: int, config: dict[str, Any]) -> None:
    """Refuse a log stream that would not take (or not keep unique) this prefix's items."""
    name = layout.log_streams[k]
    if list(config.get("subjects") or []) != [layout.log_all(k)]:
        _refuse(
            f"stream {name} captures {config.get('subjects')}, not {layout.log_all(k)}: it belongs to "
            "another prefix (stream names drop dots and case) or was changed by hand"
        )
    wanted = {"max_msgs_per_subject": 1, "discard": "new", "discard_new_per_subject": True}
    wrong = {key: config.get(key) for key, value in wanted.items() if config.get(key) != value}
    if wrong:
        _refuse(f"stream {name} no longer keeps one message per item id ({wrong}): put back {wanted}")


def _check_items(layout: Layout, info: dict[str, Any]) -> dict[str, Any]:
    """Refuse an existing ``<PREFIX>_ITEMS`` this layout cannot make its fan-out;
    returns its config."""
    items: dict[str, Any] = info["config"]
    _check_shards(layout, layout.stream, items)
    if f"{layout.prefix}.ids.>" in (items.get("subjects") or []):
        _refuse(
            f"stream {layout.stream} holds a log in the earlier single-stream JetStream layout "
            "(items and ids in one stream): copy it out with that version's `convlog migrate --from "
            "jetstream --to sqlite:PATH`, delete the stream, then `convlog migrate --from sqlite:PATH "
            "--to jetstream`"
        )
    if (items.get("metadata") or {}).get(SHARDS_KEY) is None and int(info["state"].get("messages", 0)):
        _refuse(
            f"stream {layout.stream} holds {info['state']['messages']} items the SQLite store's outbox "
            "published; the JetStream store fills it from its own log streams: delete it (`nats stream "
            f"rm {layout.stream}`; the JetStream store creates it again and copies every item into it)"
        )
    return items


async def _refuse_foreign_overlap(
    nc: Client, layout: Layout, wanted: list[tuple[str, str]], timeout: float  # noqa: ASYNC109
) -> None:
    """Before any stream of the log is created: refuse, naming them, streams of
    something else that capture subjects of a stream to create (JetStream would
    refuse that stream with "subjects overlap with an existing stream", naming
    none, after creating the ones before it)."""
    ours = {layout.stream, *layout.log_streams}
    for name, subject in wanted:
        reply = await _api(nc, "STREAM.NAMES", {"subject": subject}, timeout)
        others = sorted(set(reply.get("streams") or []) - ours)
        if others:
            error = {"code": 400, "err_code": _SUBJECTS_OVERLAP}
            raise StreamRefused(
                f"cannot create stream {name}: its subjects {subject} overlap with those of stream "
                f"{', '.join(others)}, which is not convlog's: move that stream off them, or give convlog "
                "another CONVLOG_PREFIX", error)


async def _created_by_another(nc: Client, name: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """The info of stream ``name``, which another instance created first."""
    info = await _api(nc, f"STREAM.INFO.{name}", None, timeout)
    if "error" in info:
        raise _failed(f"stream {name}", info)
    return info


async def ensure_streams(
    nc: Client, layout: Layout, *, replicas: int = 1, timeout: float = 5.0, create: bool = True  # noqa: ASYNC109
) -> None:
    """Create the log streams and the fan-out stream, or check the existing ones.

    With ``create`` false, a log that does not exist is not created.

    Raises:
        NotFoundError: without ``create``, a stream of the log does not exist.
        StreamConfigError: the streams were created with another shard count,
            or ``<PREFIX>_ITEMS`` holds a log this layout cannot serve (one line
            saying what to do).
        StreamRefused: JetStream refused a stream request (its reason).
        nats.errors.TimeoutError, nats.errors.NoRespondersError: JetStream did not answer.
    """
    info = await _api(nc, f"STREAM.INFO.{layout.stream}", None, timeout)
    if not create:
        if "config" in info:  # a log of another shard count exists: say so, not that it does not
            _check_shards(layout, layout.stream, info["config"])
        for name in (layout.stream, *layout.log_streams):
            if _not_found(info if name == layout.stream else await _api(nc, f"STREAM.INFO.{name}", None, timeout)):
                raise NotFoundError(f"there is no JetStream log for prefix {layout.prefix!r}: stream {name} does not exist")
    items: dict[str, Any] | None = None
    if not _not_found(info):
        if "error" in info:
            raise _failed(f"stream {layout.stream}", info)
        items = _check_items(layout, info)
    missing: list[int] = []
    for k, name in enumerate(layout.log_streams):
        got = await _api(nc, f"STREAM.INFO.{name}", None, timeout)
        if _not_found(got):
            missing.append(k)
        elif "error" in got:
            raise _failed(f"stream {name}", got)
        else:
            _check_shards(layout, name, got["config"])
            _check_log_stream(layout, k, got["config"])
    if items is not None and (items.get("metadata") or {}).get(SHARDS_KEY) is not None:
        # The fan-out is made last, after every log stream: one of its sources missing now
        # was deleted. Made again empty, its sessions would vanish from reads and start over
        # at item_order 1 while the fan-out still holds their items.
        sourced = {src.get("name") for src in items.get("sources") or []}
        gone = [layout.log_streams[k] for k in missing if layout.log_streams[k] in sourced]
        if gone:
            _refuse(
                f"stream {', '.join(gone)} of this log is gone (deleted?) while {layout.stream} still holds "
                f"its items: restore it, or to start the prefix afresh delete {layout.stream} and "
                f"{', '.join(layout.log_streams)} too"
            )
    to_create = [(layout.log_streams[k], layout.log_all(k)) for k in missing]
    await _refuse_foreign_overlap(nc, layout, to_create + ([(layout.stream, layout.items_all)] if items is None else []),
                                  timeout)
    for k in missing:
        name = layout.log_streams[k]
        created = await _api(nc, f"STREAM.CREATE.{name}", layout.log_stream_config(k, replicas), timeout)
        if "error" in created:
            if created["error"].get("err_code") != _STREAM_NAME_IN_USE:
                raise _failed(f"cannot create stream {name}", created)
            # Another instance won the race: its stream (made with its shard count, for its
            # prefix: ``a.b`` and ``a_b`` name the same streams) must fit ours, as one found is.
            theirs = (await _created_by_another(nc, name, timeout))["config"]
            _check_shards(layout, name, theirs)
            _check_log_stream(layout, k, theirs)
    if items is None:
        created = await _api(nc, f"STREAM.CREATE.{layout.stream}", layout.items_stream_config(replicas), timeout)
        if "error" not in created:
            return
        if created["error"].get("err_code") != _STREAM_NAME_IN_USE:
            raise _failed(f"cannot create stream {layout.stream}", created)
        # Made meanwhile: by another instance (the fan-out already), or by an SQLite log
        # service's outbox (an items stream without sources, whose workers would get
        # nothing): checked, and made the fan-out, as one found above.
        items = _check_items(layout, await _created_by_another(nc, layout.stream, timeout))
    have = {s.get("name") for s in items.get("sources") or []}
    if have != set(layout.log_streams) or not items.get("allow_direct"):
        # An empty stream the outbox (or a worker) created first: make it the fan-out.
        items["sources"] = layout.sources()
        items["allow_direct"] = True
        items["metadata"] = {**(items.get("metadata") or {}), SHARDS_KEY: str(layout.shards)}
        log.info("making stream %s the fan-out of %s", layout.stream, ", ".join(layout.log_streams))
        updated = await _api(nc, f"STREAM.UPDATE.{layout.stream}", items, timeout)
        if "error" in updated:
            raise _failed(f"cannot update stream {layout.stream}", updated)
