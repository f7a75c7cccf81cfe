"""What the fast nats-py seam needs, checked: :func:`probe` looks for every
private name of nats-py that :mod:`shared.nats_seam` uses, on real objects
built without a connection, and checks the installed version is one the test
suite ran on (:data:`TESTED_NATS_PY`)."""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Request
from nats.micro.service import Endpoint, EndpointConfig, Service, ServiceConfig
from nats.protocol import parser as nats_parser

from .frames import _CONTROL

__all__ = ["TESTED_NATS_PY", "Probe", "probe"]

#: nats-py versions the suite ran on: lowest tested, first untested
#: (``pyproject.toml`` declares the same range; a test keeps them equal).
TESTED_NATS_PY: tuple[tuple[int, ...], tuple[int, ...]] = ((2, 16, 0), (2, 17))


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` found: the installed version and every missing name."""

    version: str
    tested: bool
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.tested and not self.missing

    def reason(self) -> str:
        """Why the fast seam is not used ("" when it is)."""
        low, high = (".".join(map(str, v)) for v in TESTED_NATS_PY)
        parts = [] if self.tested else [f"nats-py {self.version} is outside the tested range >={low},<{high}"]
        if self.missing:
            parts.append("missing nats-py internals: " + ", ".join(self.missing))
        return "; ".join(parts)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _check(missing: list[str], name: str, test: Callable[[], bool]) -> None:
    try:
        ok = test()
    except Exception:
        ok = False
    if not ok:
        missing.append(name)


@functools.cache
def probe() -> Probe:
    """Check every nats-py private name the fast seam uses (once per process)."""
    version = importlib.metadata.version("nats-py")
    low, high = TESTED_NATS_PY
    tested = low <= _version_tuple(version) < high
    missing: list[str] = []
    for name in ("_send_command", "_flush_pending"):
        _check(missing, f"Client.{name}", lambda n=name: inspect.iscoroutinefunction(getattr(Client, n)))
    try:
        nc = Client()
        sub = Subscription(nc)
        service = Service(nc, ServiceConfig(name="probe", version="0.0.0"))

        async def handler(req: Request) -> None:
            return None

        endpoint = Endpoint(service, EndpointConfig(name="probe", subject="probe", handler=handler))
        msg = Msg(_client=nc, subject="probe", reply="probe.reply")
        request = Request(msg)
    except Exception as e:  # a constructor's signature changed
        return Probe(version, tested, (*missing, f"constructors ({type(e).__name__}: {e})"))
    _check(missing, "Client._flush_queue", lambda: "_flush_queue" in vars(nc))
    _check(missing, "Client._pending", lambda: type(vars(nc)["_pending"]) is list)
    _check(missing, "Client._transport", lambda: "_transport" in vars(nc))
    _check(missing, "Client._ps", lambda: isinstance(vars(nc)["_ps"], nats_parser.Parser))
    _check(missing, "Parser.parse", lambda: inspect.iscoroutinefunction(nats_parser.Parser.parse))
    _check(missing, "Parser state", lambda: type(nc._ps.buf) is bytearray and nc._ps.state == _CONTROL
           and nats_parser.AWAITING_MSG_PAYLOAD != _CONTROL and type(nc._ps.msg_arg) is dict
           and type(nc._ps.needed) is int and type(nc._ps.header_needed) is int)
    _check(missing, "Subscription._id", lambda: Subscription(nc, id=7)._id == 7)
    _check(missing, "Client.stats", lambda: {"in_msgs", "in_bytes"} <= set(nc.stats))
    _check(missing, "Subscription._pending_queue", lambda: type(sub._pending_queue) is asyncio.Queue)
    _check(missing, "Subscription._pending_size", lambda: type(sub._pending_size) is int)
    _check(missing, "Service._endpoints", lambda: type(service._endpoints) is list)
    _check(missing, "Endpoint._name", lambda: endpoint._name == "probe")
    _check(missing, "Endpoint._subscription", lambda: "_subscription" in vars(endpoint))
    _check(missing, "Request._msg", lambda: request._msg is msg)
    return Probe(version, tested, tuple(missing))
