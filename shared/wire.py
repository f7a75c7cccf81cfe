"""Publish a burst of messages on a nats-py connection in one go.

nats-py's ``publish`` spends several microseconds of Python on every message:
it checks the subject, builds the frame, queues it and kicks the flusher task,
each time.  The log service publishes in bursts (the replies of one group
commit, the envelopes of one outbox window), and so does a signing client
(the appends signed together, :mod:`shared.signed_appends`), so
:func:`publish_many` checks and frames a whole burst and queues it as one write.

The write itself goes through :mod:`shared.nats_seam` (it takes nats-py
internals).  On the public seam, or whenever the connection is not plainly
connected (reconnecting, draining, closed), it publishes message by message
through ``publish``, so the library's own buffering and errors apply there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client

from .nats_seam import seam_for

__all__ = ["Outgoing", "frame", "header_block", "over_max_payload", "publish_many"]

#: subject, reply subject ("" for none), payload, headers (a dict, or a
#: header block already encoded by :func:`header_block`)
Outgoing = tuple[str, str, bytes, dict[str, str] | bytes | None]

_BAD_SUBJECT = re.compile(r"[ \t\r\n]")  # what nats-py refuses in a published subject
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def header_block(headers: dict[str, str]) -> bytes:
    """The ``NATS/1.0`` header block, as nats-py builds it from a dict.

    A caller publishing many messages with the same keys can build the block
    itself (one format per message) and pass the bytes instead of a dict.
    """
    parts = ["NATS/1.0\r\n"]
    for key, value in headers.items():
        key = key.strip()
        if not key:
            continue
        if not _HEADER_KEY.fullmatch(key):
            raise nats.errors.BadHeaderError(key)
        parts.append(f"{key}: {value.strip().translate(_VALUE_NEWLINES)}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()


def _as_dict(block: bytes) -> dict[str, str]:
    """A header block back as a dict, for ``publish`` (the slow path)."""
    lines = block.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if line)


def over_max_payload(nc: Client, payload: bytes, headers: dict[str, str] | bytes) -> bool:
    """True when ``payload`` and its ``headers`` are over the server's max payload.

    nats-py's ``publish`` compares the payload alone with it, but the server
    counts the header block too: a message over it with its headers is
    answered with ``-ERR 'Maximum Payload Violation'``, and nats-py then
    closes the connection for good.
    """
    if type(headers) is bytes:
        return len(headers) + len(payload) > nc.max_payload
    # Clearly under (each character is at most 4 bytes; "NATS/1.0\r\n", ": " and "\r\n"
    # per header, "\r\n" at the end): no header block built for it, as is every notice.
    bound = 12 + sum(4 * (len(k) + len(v)) + 4 for k, v in headers.items())  # type: ignore[union-attr]
    if len(payload) + bound <= nc.max_payload:
        return False
    return len(header_block(headers)) + len(payload) > nc.max_payload  # type: ignore[arg-type]


def frame(subject: str, reply: str, payload: bytes, headers: dict[str, str] | bytes | None, max_payload: int) -> bytes:
    """One PUB or HPUB frame; raises what ``publish`` raises for a bad message."""
    if not subject or _BAD_SUBJECT.search(subject) or (reply and _BAD_SUBJECT.search(reply)):
        raise nats.errors.BadSubjectError
    if len(payload) > max_payload:
        raise nats.errors.MaxPayloadError
    if headers is None:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    hdr = headers if type(headers) is bytes else header_block(headers)  # type: ignore[arg-type]
    if len(hdr) + len(payload) > max_payload:  # the server counts the headers too
        raise nats.errors.MaxPayloadError
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(), reply.encode(), len(hdr), len(hdr) + len(payload), hdr, payload,
    )


async def publish_many(nc: Client, messages: Sequence[Outgoing]) -> list[tuple[int, Exception]]:
    """Publish ``messages`` in order, as ``nc.publish`` would one by one.

    Returns:
        ``(index, error)`` for each message that was refused and not sent
        (a bad subject, too large, no connection); every other one was sent.
    """
    refused: list[tuple[int, Exception]] = []
    seam = seam_for(nc)
    if not seam.can_write(nc):
        for i, (subject, reply, payload, headers) in enumerate(messages):
            try:
                if headers is not None and over_max_payload(nc, payload, headers):
                    raise nats.errors.MaxPayloadError
                if type(headers) is bytes:
                    headers = _as_dict(headers)
                await nc.publish(subject, payload, reply=reply, headers=headers)  # type: ignore[arg-type]
            except Exception as e:
                refused.append((i, e))
        return refused
    frames: list[bytes] = []
    sent_bytes = 0
    max_payload = nc.max_payload
    for i, (subject, reply, payload, headers) in enumerate(messages):
        try:
            frames.append(frame(subject, reply, payload, headers, max_payload))
        except Exception as e:
            refused.append((i, e))
            continue
        sent_bytes += len(payload)
    if frames:
        await seam.write(nc, b"".join(frames), len(frames), sent_bytes)
    return refused
