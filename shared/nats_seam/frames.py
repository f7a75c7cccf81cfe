"""The fast seam's stand-ins inside nats-py: :class:`InlineDelivery` for a
subscription's pending queue, :class:`RawFrames` for a connection parser's
``parse`` (see :mod:`shared.nats_seam`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol import parser as nats_parser

__all__ = ["InlineDelivery", "RawDeliver", "RawFrames"]

log = logging.getLogger("convlog.nats_seam")


class InlineDelivery(asyncio.Queue):  # type: ignore[type-arg]
    """Stands in for a subscription's pending queue: each message nats-py puts
    in is handed to a function at once.  Nothing is ever queued, so the
    subscription's task waits forever and a drain finds nothing pending."""

    def __init__(self, sub: Subscription, deliver: Callable[[Msg], None]) -> None:
        super().__init__()
        self._sub = sub
        self._deliver = deliver

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)  # nats-py added it before the put
        try:
            self._deliver(msg)
        except Exception:  # never into nats-py's read loop
            log.exception("handling a message on %s failed", msg.subject[:200])


_CONTROL = getattr(nats_parser, "AWAITING_CONTROL_LINE", None)
_PAYLOAD = getattr(nats_parser, "AWAITING_MSG_PAYLOAD", None)

#: ``deliver(subject, payload, headers)``: a frame's bytes (headers raw, None without).
RawDeliver = Callable[[bytes, bytes, "bytes | None"], None]


class RawFrames:
    """Stands in for a connection parser's ``parse``: each complete MSG/HMSG
    frame of a routed subscription goes to its function as bytes, with no
    ``Msg`` or header parsing; anything else (another subscription, PING,
    INFO, -ERR) and all that follows it in the buffer is left to nats-py's
    own parse.  A frame not yet whole waits in nats-py's buffer."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._ps = nc._ps
        self._stock = nc._ps.parse
        self.routes: dict[int, RawDeliver] = {}

    async def parse(self, data: bytes = b"") -> None:
        ps = self._ps
        buf = ps.buf
        if data:
            buf.extend(data)
        if ps.state == _PAYLOAD and not self._finish_pending(ps, buf):
            return
        if ps.state == _CONTROL and self.routes:
            pos, wait = self._scan(buf)
            if pos:
                del buf[:pos]
            if wait:
                return
        if buf:
            await self._stock(b"")

    def _finish_pending(self, ps: nats_parser.Parser, buf: bytearray) -> bool:
        """A routed frame nats-py's parse began: finish it here (False: still partial)."""
        route = self.routes.get(ps.msg_arg.get("sid"))  # type: ignore[arg-type]
        if route is None:
            return True
        if len(buf) < ps.needed + 2:
            return False
        hsize = ps.header_needed
        headers = bytes(buf[:hsize]) if hsize else None
        payload = bytes(buf[hsize : ps.needed])
        del buf[: ps.needed + 2]
        ps.header_needed = 0
        ps.state = _CONTROL
        self._deliver(route, bytes(ps.msg_arg["subject"]), payload, headers)
        return True

    def _scan(self, buf: bytearray) -> tuple[int, bool]:
        """Deliver the routed frames at the head of ``buf``: (bytes consumed,
        True when it stopped at a routed frame not yet whole)."""
        pos = 0
        end = len(buf)
        routes = self.routes
        while pos < end:
            if buf.startswith(b"MSG ", pos):
                start = pos + 4
            elif buf.startswith(b"HMSG ", pos):
                start = pos + 5
            else:
                return pos, False
            eol = buf.find(b"\r\n", start)
            if eol < 0:
                return pos, end - pos < nats_parser.MAX_CONTROL_LINE_SIZE
            args = buf[start:eol].split()
            route = routes.get(int(args[1]))
            if route is None:
                return pos, False
            size = int(args[-1])
            hsize = int(args[-2]) if start == pos + 5 else 0
            body = eol + 2
            if body + size + 2 > end:
                return pos, True
            headers = bytes(buf[body : body + hsize]) if hsize else None
            self._deliver(route, bytes(args[0]), bytes(buf[body + hsize : body + size]), headers)
            pos = body + size + 2
        return pos, False

    def _deliver(self, route: RawDeliver, subject: bytes, payload: bytes, headers: bytes | None) -> None:
        stats = self._nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(payload)
        try:
            route(subject, payload, headers)
        except Exception:  # never into nats-py's read loop
            log.exception("handling a frame on %s failed", subject[:200])
