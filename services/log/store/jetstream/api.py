"""The few JetStream API calls the store makes, on nats-py's public client.

nats-py 2.16 has constants for atomic batches but no publisher, and its
direct get returns one message; these speak the wire protocol themselves
(ADR-50 batch headers; ``$JS.API.DIRECT.GET`` batch requests ending in a
``204 EOB`` status message).  Publish acks come back on one wildcard inbox
per store, routed by token to a future (no per-publish subscription or
task), so thousands of appends can be in flight.  nats and JetStream
failures become :class:`~shared.errors.UnavailableError`,
:class:`WrongLastSequence` or :class:`IdTaken` here, at this one seam.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.errors import TooLargeError, UnavailableError
from shared.inbox import Message, RoutedInbox, atomic_batch
from shared.nats_seam import seam_for
from shared.wire import over_max_payload

__all__ = [
    "RESEND_AFTER", "Acks", "BatchAck", "DirectGet", "IdTaken", "InProcess", "OutcomeUnknown", "Refused",
    "WrongLastSequence",
]

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
_WRONG_LAST = 10071  # JSStreamWrongLastSequenceErrF: the session's head moved
_BATCH_DUPLICATE = 10201  # JSAtomicPublishContainsDuplicateMessageErr: <sid>:<order> was just written
_BATCH_TOO_LARGE = 10199  # JSAtomicPublishTooLargeBatchErrF: over the server's batch max_msgs
#: A limit the stream or server is at, which nothing but an operator clears on a log
#: stream (nothing ages out of it, nor may be deleted): JSInsufficientResourcesErr (the
#: server's storage), JSStreamMessageExceedsMaximumErr (``max_msg_size``), and these
#: reasons of JSStreamStoreFailedF (its code is every store failure's: a closed store
#: during a leader change too, which may clear).
_AT_A_LIMIT = frozenset({10023, 10054})
_STORE_FAILED = 10077
_FULL = ("maximum messages exceeded", "maximum bytes exceeded", "insufficient resources")
_STATUS = "Status"
#: On a ``multi_last`` batch's status message: the stream sequence the answering
#: replica took its last messages at (its last one, unless the request set ``up_to_seq``).
_UPTO_SEQ = "Nats-UpTo-Sequence"
#: Seconds a publish, or a get, waits for its answer before it is
#: sent again (the store's ``timeout`` when that is shorter).  A stream leader
#: change drops what the old leader had not answered, with no reply, and so does
#: a server that dies (the client reconnects to another): each request would
#: wait out the whole timeout before going to the new leader or server.
#: A copy is harmless: a get is a read; a publish is settled (see
#: :mod:`.settle`; ``Nats-Msg-Id``, one message per id subject).
RESEND_AFTER = 1.0
#: Seconds between the tries of a get answered "no responders" (status 503), doubled up to
#: :data:`_NO_RESPONDERS_MAX`, within the store's timeout: for about 2 s after its leader
#: dies (kill -9) no node of a stream answers its direct gets, then the new leader does.
_NO_RESPONDERS_FIRST = 0.05
_NO_RESPONDERS_MAX = 0.25
#: More than the header block of any message the store publishes (ids, subjects, a traceparent).
_HEADERS_BOUND = 64 << 10

class WrongLastSequence(Exception):
    """An expected-last-subject-sequence check failed: nothing was stored."""


class InProcess(WrongLastSequence):
    """On a clustered stream, a publish with the same ``Nats-Msg-Id`` (``<sid>:<order>``)
    is still being replicated ("duplicate message id is in process"): nothing of this
    publish was stored, and the one in process may be stored yet (another instance's,
    or this append's own unanswered publish)."""


class IdTaken(Exception):
    """An item subject already holds a message (its ``item_id`` is stored): nothing was stored."""


class Refused(UnavailableError):
    """The stream answered the publish with an error of no kind above (a limit reached:
    max_msgs, max_bytes, the server's storage): nothing of it was stored.  Unlike the
    other :class:`~shared.errors.UnavailableError` of a publish (no stream answers, NATS
    unreachable), an answer: the stream took this connection's earlier messages first.

    ``at_limit``: the stream is at a limit only an operator clears, so the append
    is refused at once; any other refusal (no cluster quorum for a moment) may clear."""

    def __init__(self, message: str, *, at_limit: bool = False) -> None:
        super().__init__(message)
        self.at_limit = at_limit


class OutcomeUnknown(Exception):
    """The publish was sent but no answer came: it may or may not be stored."""


@dataclass(frozen=True, slots=True)
class BatchAck:
    """Stored messages: they hold ``first_seq .. last_seq``; ``duplicate``
    when the stream answered a ``Nats-Msg-Id`` it had already seen (whose
    message it was must then be checked)."""

    last_seq: int
    count: int
    duplicate: bool = False

    @property
    def first_seq(self) -> int:
        return self.last_seq - self.count + 1


def _ack(data: bytes, n: int) -> BatchAck:
    try:
        ack: dict[str, Any] = json.loads(data)
    except ValueError as e:
        raise OutcomeUnknown("unreadable publish ack") from e
    err = ack.get("error")
    if err:
        code = err.get("err_code")
        description = str(err.get("description", ""))
        if code in (_WRONG_LAST, _BATCH_DUPLICATE):
            raise WrongLastSequence(description)
        if code == _BATCH_TOO_LARGE:  # "atomic publish batch is too large: <max_msgs>"
            limit = description.rpartition(":")[2].strip()
            extra = {"limit": int(limit)} if limit.isdigit() else {}
            raise TooLargeError(f"{n} items in one append, over the log stream's limit: {description}", **extra)
        # Its code (JSStreamStoreFailedF) is every store failure's; only the per-subject
        # limit says the id's subject is taken (a full stream -- max_msgs, max_bytes, the
        # server's storage -- is a refusal, not contention to retry as a taken id).
        if "maximum messages per subject" in description:
            raise IdTaken(description)
        # On a clustered stream, two instances proposing one <sid>:<order> at
        # once get "duplicate message id is in process": a moved head too.
        if "duplicate message id" in description:
            raise InProcess(description)
        full = code in _AT_A_LIMIT or (code == _STORE_FAILED and description in _FULL)
        raise Refused(f"the log stream refused the append: {description or err}", at_limit=full)
    return BatchAck(last_seq=int(ack["seq"]), count=int(ack.get("count") or n), duplicate=bool(ack.get("duplicate")))


class _Inbox(RoutedInbox):
    """A :class:`~shared.inbox.RoutedInbox` whose requests time out after ``timeout``."""

    def __init__(self, nc: Client, *, timeout: float) -> None:
        super().__init__(nc)
        self._timeout = timeout


def _raise_too_large(nc: Client, e: BaseException, body: bytes) -> None:
    """nats-py refused to send a message over the server's ``max_payload`` (nothing
    was sent): a ``too_large`` that no retry cures, not an unreachable NATS.

    Raises:
        TooLargeError: ``e`` is that refusal.
    """
    if isinstance(e, nats.errors.MaxPayloadError):
        raise TooLargeError(f"an envelope of {len(body)} bytes and its headers are over the NATS "
                            f"server's max_payload of {nc.max_payload} bytes",
                            limit=nc.max_payload) from e


def _refuse_too_large(nc: Client, body: bytes, headers: dict[str, str]) -> None:
    """Refuse a message the server would take as a protocol violation: nats-py
    compares the payload alone with ``max_payload``, the server counts the
    headers too, answers ``-ERR 'Maximum Payload Violation'`` and the
    connection is closed for good.

    Raises:
        TooLargeError: ``body`` and ``headers`` are over the server's max payload.
    """
    if len(body) + _HEADERS_BOUND > nc.max_payload and over_max_payload(nc, body, headers):
        raise TooLargeError(f"an envelope of {len(body)} bytes and its headers are over the NATS "
                            f"server's max_payload of {nc.max_payload} bytes",
                            limit=nc.max_payload)


class Acks(_Inbox):
    """Publishes that want the stream's ack, many in flight on one connection."""

    def __init__(self, nc: Client, *, timeout: float) -> None:
        super().__init__(nc, timeout=timeout)
        self._waiting: dict[str, asyncio.Future[bytes]] = {}

    @property
    def pending(self) -> int:
        """Publishes (and batch commits) sent and not answered yet."""
        return len(self._waiting)

    def route(self, msg: Msg) -> None:
        fut = self._waiting.pop(self.token_of(msg), None)
        if fut is None or fut.done():
            return
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            fut.set_result(msg.data)
        else:  # 503: no stream listens on the subject (nats-server's no-responders status)
            fut.set_exception(UnavailableError(f"the log stream does not answer (status {status})"))

    def _expire(self, token: str) -> None:
        fut = self._waiting.pop(token, None)
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError())

    async def _request(self, subject: str, body: bytes, headers: dict[str, str]) -> bytes:
        _refuse_too_large(self._nc, body, headers)
        token = self.token()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        self._waiting[token] = fut
        timer = loop.call_later(self._timeout, self._expire, token)
        try:
            await self._nc.publish(subject, body, reply=self.reply_to(token), headers=headers)
        except (nats.errors.Error, OSError) as e:
            timer.cancel()
            self._waiting.pop(token, None)
            _raise_too_large(self._nc, e, body)
            raise UnavailableError(f"cannot reach NATS to append: {type(e).__name__}") from e
        try:
            return await fut
        except TimeoutError as e:
            raise OutcomeUnknown("no ack within the timeout") from e
        finally:
            timer.cancel()

    async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> BatchAck:
        """One message, acknowledged by the stream.

        Raises:
            WrongLastSequence: the expected last subject sequence did not hold.
            IdTaken: the subject already holds its one message.
            OutcomeUnknown: no answer (timeout, disconnect) after it was sent.
            UnavailableError: refused for another reason, or could not be sent.
        """
        return _ack(await self._request(subject, body, headers), 1)

    async def publish_atomic(self, messages: Sequence[Message]) -> BatchAck:
        """``messages`` as one atomic batch (stored whole, or not at all).

        Only the commit waits for an answer: the server checks every message's
        expectations under its lock at commit time, and answers once.  Raises
        as :meth:`publish`.
        """
        batch = atomic_batch(messages)
        for _, each_body, each_headers in batch:  # before any is sent: no batch left open
            _refuse_too_large(self._nc, each_body, each_headers)
        *leading, (subject, body, final) = batch
        try:
            for lead_subject, lead_body, lead_headers in leading:
                await self._nc.publish(lead_subject, lead_body, headers=lead_headers)
        except (nats.errors.Error, OSError) as e:
            _raise_too_large(self._nc, e, lead_body)
            raise UnavailableError(f"cannot reach NATS to append: {type(e).__name__}") from e
        return _ack(await self._request(subject, body, final), len(messages))


class _Collect:
    """The messages (or with ``bodies``, their bodies) of one batch get, until its status message."""

    __slots__ = ("bodies", "done", "items", "upto")

    def __init__(self, *, bodies: bool = False) -> None:
        self.bodies = bodies
        self.items: list[Any] = []
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.upto: int | None = None  # the status message's Nats-UpTo-Sequence, if any

    def add(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status is None:
            self.items.append(msg.data if self.bodies else msg)
        elif not self.done.done():
            upto = headers.get(_UPTO_SEQ, "")  # type: ignore[union-attr]
            self.upto = int(upto) if upto.isdigit() else None
            self.done.set_result(status)

    def add_raw(self, payload: bytes, headers: bytes | None) -> None:
        """A frame's bytes (see :meth:`shared.nats_seam.NatsSeam.deliver_raw`):
        a status message's headers begin ``NATS/1.0 <code>``."""
        if headers is None or headers[8:9] != b" ":
            self.items.append(payload)
        elif not self.done.done():
            self.done.set_result(headers[9:12].decode())


class _Batches(_Inbox):
    """The inbox of batch gets: messages routed to their request's :class:`_Collect`."""

    def __init__(self, nc: Client, *, timeout: float, raw: bool = False) -> None:
        super().__init__(nc, timeout=timeout)
        self._raw = raw
        self._cut = len(self._prefix.encode())
        self.waiting: dict[str, _Collect] = {}

    def _deliver(self, sub: Any) -> None:
        # Inline even when raw: a frame nats-py parses itself (one that follows
        # another subscription's message in the same read) must reach its batch
        # in wire order, not later through the subscription's task.
        super()._deliver(sub)
        if self._raw:
            seam_for(self._nc).deliver_raw(self._nc, sub, self._route_raw)

    def route(self, msg: Msg) -> None:
        collect = self.waiting.get(self.token_of(msg))
        if collect is not None:
            collect.add(msg)

    def _route_raw(self, subject: bytes, payload: bytes, headers: bytes | None) -> None:
        collect = self.waiting.get(subject[self._cut :].decode())
        if collect is not None:
            collect.add_raw(payload, headers)

    async def get(self, api: str, request: dict[str, object], collect: _Collect) -> list[Any]:
        """Send ``request`` and collect its batch until the status message.  Sent
        again (on a new token: a late answer to the first is dropped) every
        :data:`RESEND_AFTER` seconds nothing at all came back, as a one-message
        get: a request the server lost (its connection died) has no answer.  One
        answered "no responders" (503: the stream has no leader for a moment) is
        sent again after a short pause, until the timeout."""
        await self.start()
        body = json.dumps(request).encode()
        loop = asyncio.get_running_loop()
        end = loop.time() + self._timeout
        pause = _NO_RESPONDERS_FIRST
        while True:
            if collect.done.done():  # "no responders" (and nothing else) came: try again
                collect.done = loop.create_future()
            token = self.token()
            self.waiting[token] = collect
            try:
                await self._nc.publish(api, body, reply=self.reply_to(token))
                await asyncio.wait((collect.done,), timeout=min(RESEND_AFTER, end - loop.time()))
                if not collect.done.done() and (collect.items or loop.time() + 0.001 >= end):
                    # An answer is coming in (a big batch): it has until the timeout.
                    await asyncio.wait((collect.done,), timeout=max(0.0, end - loop.time()))
                if collect.done.done():
                    status = collect.done.result()
                    if status != "503" or collect.items or loop.time() + pause >= end:
                        break
                elif loop.time() + 0.001 >= end:
                    raise TimeoutError
            except (nats.errors.Error, TimeoutError, OSError) as e:
                raise UnavailableError(f"cannot read the log stream: {type(e).__name__}") from e
            finally:
                del self.waiting[token]
            if collect.done.done():  # no responders: the stream has no leader yet
                await asyncio.sleep(pause)
                pause = min(2 * pause, _NO_RESPONDERS_MAX)
        if status not in ("204", "404"):  # end of batch; nothing matched
            raise UnavailableError(f"direct get batch failed with status {status}")
        return collect.items


class DirectGet:
    """Direct gets on one stream (``allow_direct``); any replica may answer."""

    def __init__(self, nc: Client, stream: str, *, timeout: float) -> None:
        self._nc = nc
        self._subject = f"$JS.API.DIRECT.GET.{stream}"
        self._leader_get = f"$JS.API.STREAM.MSG.GET.{stream}"
        self._timeout = timeout
        self._messages = _Batches(nc, timeout=timeout)
        # Batches without headers want only the bodies: off the wire where the seam can.
        self._bodies = _Batches(nc, timeout=timeout, raw=True)

    @property
    def max_payload(self) -> int:
        """The server's max payload now: no request may be larger."""
        return self._nc.max_payload

    async def start(self) -> None:
        await self._messages.start()
        await self._bodies.start()

    async def _request(self, subject: str, body: bytes) -> Msg:
        """One request, sent again every :data:`RESEND_AFTER` seconds it is not
        answered, until the timeout: a leader change drops it unanswered.  One
        answered "no responders" (the stream has no leader for a moment: for about
        2 s after its leader is killed) is sent again after a short pause.

        Raises:
            TimeoutError: no answer within the timeout.
            nats.errors.NoRespondersError: still none at the timeout.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + self._timeout
        pause = _NO_RESPONDERS_FIRST
        while True:
            wait = min(RESEND_AFTER, end - loop.time())
            try:
                return await self._nc.request(subject, body, timeout=wait)
            except nats.errors.NoRespondersError:
                if loop.time() + pause >= end:
                    raise
                await asyncio.sleep(pause)
                pause = min(2 * pause, _NO_RESPONDERS_MAX)
            except nats.errors.TimeoutError:
                if loop.time() + 0.001 >= end:
                    raise

    async def last(self, subject: str) -> Msg | None:
        """The last message on ``subject``, or ``None`` when it has none."""
        body = json.dumps({"last_by_subj": subject}).encode()
        try:
            msg = await self._request(self._subject, body)
        except nats.errors.NoRespondersError as e:
            raise UnavailableError("the log stream does not answer (no responders)") from e
        except (nats.errors.Error, TimeoutError, OSError) as e:
            raise UnavailableError(f"cannot read the log stream: {type(e).__name__}") from e
        status = (msg.headers or {}).get(_STATUS)
        if status == "404":
            return None
        if status:
            raise UnavailableError(f"direct get of {subject} failed with status {status}")
        return msg

    async def last_from_leader(self, subject: str) -> Msg | None:
        """:meth:`last`, answered by the stream's leader (the JetStream API's message
        get, not a direct get): what a replica that trails the leader cannot be."""
        body = json.dumps({"last_by_subj": subject}).encode()
        try:
            reply = await self._request(self._leader_get, body)
            doc = json.loads(reply.data)
        except (nats.errors.Error, TimeoutError, OSError, ValueError) as e:
            raise UnavailableError(f"cannot read the log stream's leader: {type(e).__name__}") from e
        err = doc.get("error")
        if err is not None:
            if err.get("code") == 404:
                return None
            raise UnavailableError(f"the log stream's leader: {err.get('description', err)}")
        m = doc["message"]
        return Msg(_client=self._nc, subject=m["subject"], data=base64.b64decode(m.get("data") or b""),
                   headers={"Nats-Sequence": str(m["seq"]), "Nats-Subject": m["subject"]})

    async def batch(self, request: dict[str, object]) -> list[Msg]:
        """Every message of one batch request (``next_by_subj`` + ``seq`` +
        ``batch``, or ``multi_last``), in stream order."""
        return await self._messages.get(self._subject, request, _Collect())

    async def multi_last(self, subjects: list[str]) -> tuple[list[Msg], int | None]:
        """The last message of each of ``subjects`` that has one (:meth:`batch` of a
        ``multi_last`` request; the server may stop short of them all), and the stream
        sequence the replica that answered took them at (``None`` from a server that
        does not say): on R3 any replica answers, one that trails the leader with the
        stream as it was a little earlier."""
        collect = _Collect()
        msgs = await self._messages.get(self._subject, {"multi_last": subjects, "batch": len(subjects)}, collect)
        return msgs, collect.upto

    async def bodies(self, request: dict[str, object]) -> list[bytes]:
        """The bodies of :meth:`batch`'s messages, for a request without headers (``no_hdr``)."""
        return await self._bodies.get(self._subject, {**request, "no_hdr": True}, _Collect(bodies=True))

    async def _stream_info(self, body: bytes) -> dict[str, Any]:
        """The stream's ``STREAM.INFO`` answer to ``body`` (for the sessions list), from
        its leader: sent again after :data:`RESEND_AFTER`, as a get.

        Raises:
            UnavailableError: no answer, or an error answer.
        """
        stream = self._subject.rsplit(".", 1)[1]
        try:
            msg = await self._request(f"$JS.API.STREAM.INFO.{stream}", body)
            info = json.loads(msg.data)
        except (nats.errors.Error, TimeoutError, OSError, ValueError) as e:
            raise UnavailableError(f"cannot list sessions: {type(e).__name__}") from e
        if "error" in info:
            raise UnavailableError(f"cannot list sessions: {info['error'].get('description')}")
        return info  # type: ignore[no-any-return]

    async def subject_count(self) -> tuple[int, int, int]:
        """The stream's ``(num_subjects, first_seq, num_deleted)``: unchanged, so is its set
        of subjects (with no message removed, at its start or inside, it only gains some)."""
        state = (await self._stream_info(b"")).get("state") or {}
        return (int(state.get("num_subjects") or 0), int(state.get("first_seq") or 0),
                int(state.get("num_deleted") or 0))

    async def subjects(self, filter_subject: str) -> dict[str, int]:
        """Every subject matching ``filter_subject`` with its message count."""
        found: dict[str, int] = {}
        offset = 0
        while True:
            info = await self._stream_info(
                json.dumps({"subjects_filter": filter_subject, "offset": offset}).encode())
            page = (info.get("state") or {}).get("subjects") or {}
            found.update(page)
            total = int(info.get("total") or 0)
            offset += len(page)
            if not page or offset >= total:
                return found
