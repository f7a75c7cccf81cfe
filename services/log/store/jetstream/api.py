"""The few JetStream API calls the store makes, on nats-py's public client.

nats-py 2.16 has constants for atomic batches but no publisher, and its
direct get returns one message; these speak the wire protocol themselves
(ADR-50 batch headers; ``$JS.API.DIRECT.GET`` batch requests ending in a
``204 EOB`` status message).  nats and JetStream failures become
:class:`~shared.errors.UnavailableError` or :class:`WrongLastSequence` here,
at this one seam.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.errors import UnavailableError
from shared.nats_seam import seam_for

__all__ = ["BatchAck", "DirectGet", "OutcomeUnknown", "WrongLastSequence", "publish_atomic"]

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
# Refusals that mean "the head moved or the id exists": decide again.
_STALE = {
    10071,  # JSStreamWrongLastSequenceErrF
    10201,  # JSAtomicPublishContainsDuplicateMessageErr: <sid>:<order> was just written
}
_STATUS = "Status"

#: (subject, body, headers)
Message = tuple[str, bytes, dict[str, str]]


class WrongLastSequence(Exception):
    """An expected-last-subject-sequence check failed: nothing was stored."""


class OutcomeUnknown(Exception):
    """The commit was sent but no answer came: the batch may or may not be stored."""


@dataclass(frozen=True, slots=True)
class BatchAck:
    """A committed atomic batch: its messages hold ``first_seq .. last_seq``."""

    last_seq: int
    count: int

    @property
    def first_seq(self) -> int:
        return self.last_seq - self.count + 1


async def publish_atomic(nc: Client, messages: Sequence[Message], *, timeout: float) -> BatchAck:  # noqa: ASYNC109
    """Publish ``messages`` as one atomic batch (stored whole, or not at all).

    Only the commit is a request: the server checks every message's
    expectations under its lock at commit time, and answers once.

    Raises:
        WrongLastSequence: a ``Nats-Expected-Last-Subject-Sequence`` did not hold.
        OutcomeUnknown: no answer (timeout, disconnect) after the commit was sent.
        UnavailableError: the batch was refused for another reason, or could not be sent.
    """
    batch_id = uuid.uuid4().hex
    n = len(messages)
    try:
        for i, (subject, body, headers) in enumerate(messages[:-1], 1):
            await nc.publish(
                subject, body, headers={**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
            )
        subject, body, headers = messages[-1]
        final = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n), "Nats-Batch-Commit": "1"}
    except (nats.errors.Error, OSError) as e:
        raise UnavailableError(f"cannot reach NATS to append: {type(e).__name__}") from e
    try:
        reply = await nc.request(subject, body, headers=final, timeout=timeout)
    except nats.errors.NoRespondersError as e:
        raise UnavailableError("the log stream does not answer (no responders)") from e
    except (nats.errors.Error, TimeoutError, OSError) as e:
        raise OutcomeUnknown(type(e).__name__) from e
    try:
        ack = json.loads(reply.data)
    except ValueError as e:
        raise OutcomeUnknown("unreadable publish ack") from e
    err = ack.get("error")
    if err:
        description = str(err.get("description", ""))
        # On a clustered stream, two instances proposing the same <sid>:<order>
        # at once get "duplicate message id is in process": a stale head too.
        if err.get("err_code") in _STALE or "duplicate message id" in description:
            raise WrongLastSequence(description)
        raise UnavailableError(f"the log stream refused the append: {err.get('description', err)}")
    return BatchAck(last_seq=int(ack["seq"]), count=int(ack.get("count") or n))


class _Collect:
    """The messages of one batch get, until its status message."""

    __slots__ = ("done", "msgs")

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def add(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status is None:
            self.msgs.append(msg)
        elif not self.done.done():
            self.done.set_result(status)


class DirectGet:
    """Direct gets on one stream (``allow_direct``); any replica may answer."""

    def __init__(self, nc: Client, stream: str, *, timeout: float) -> None:
        self._nc = nc
        self._subject = f"$JS.API.DIRECT.GET.{stream}"
        self._timeout = timeout
        # One wildcard inbox for every batch get, routed by its last token.
        self._prefix = nc.new_inbox() + "."
        self._waiting: dict[str, _Collect] = {}
        self._sub: object | None = None
        self._next = 0

    async def start(self) -> None:
        if self._sub is None:
            sub = await self._nc.subscribe(self._prefix + "*", cb=self._route_async)
            # A batch is thousands of messages: take each as nats-py parses it
            # (no queue, task switch or coroutine per message) where the seam can.
            seam_for(self._nc).deliver_inline(sub, self._route)
            self._sub = sub

    def _route(self, msg: Msg) -> None:
        collect = self._waiting.get(msg.subject[len(self._prefix) :])
        if collect is not None:
            collect.add(msg)

    async def _route_async(self, msg: Msg) -> None:
        self._route(msg)

    async def last(self, subject: str) -> Msg | None:
        """The last message on ``subject``, or ``None`` when it has none."""
        body = json.dumps({"last_by_subj": subject}).encode()
        try:
            msg = await self._nc.request(self._subject, body, timeout=self._timeout)
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

    async def batch(self, request: dict[str, object]) -> list[Msg]:
        """Every message of one batch request (``next_by_subj`` + ``seq`` +
        ``batch``, or ``multi_last``), in stream order."""
        await self.start()
        self._next += 1
        token = str(self._next)
        collect = _Collect()
        self._waiting[token] = collect
        try:
            await self._nc.publish(self._subject, json.dumps(request).encode(), reply=self._prefix + token)
            status = await asyncio.wait_for(collect.done, self._timeout)
        except (nats.errors.Error, TimeoutError, OSError) as e:
            raise UnavailableError(f"cannot read the log stream: {type(e).__name__}") from e
        finally:
            del self._waiting[token]
        if status not in ("204", "404"):  # end of batch; nothing matched
            raise UnavailableError(f"direct get batch failed with status {status}")
        return collect.msgs

    async def subjects(self, filter_subject: str) -> dict[str, int]:
        """Every subject matching ``filter_subject`` with its message count."""
        stream = self._subject.rsplit(".", 1)[1]
        found: dict[str, int] = {}
        offset = 0
        while True:
            body = json.dumps({"subjects_filter": filter_subject, "offset": offset}).encode()
            try:
                msg = await self._nc.request(f"$JS.API.STREAM.INFO.{stream}", body, timeout=self._timeout)
            except (nats.errors.Error, TimeoutError, OSError) as e:
                raise UnavailableError(f"cannot list sessions: {type(e).__name__}") from e
            info = json.loads(msg.data)
            if "error" in info:
                raise UnavailableError(f"cannot list sessions: {info['error'].get('description')}")
            page = (info.get("state") or {}).get("subjects") or {}
            found.update(page)
            total = int(info.get("total") or 0)
            offset += len(page)
            if not page or offset >= total:
                return found
