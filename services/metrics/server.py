"""The ``/metrics`` HTTP endpoint of one process (``prometheus_client``'s server thread)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.registry import Collector

__all__ = ["REQUEST_TIMEOUT", "MetricsServer", "close", "serve"]

log = logging.getLogger("convlog.metrics")

#: Seconds a connection may keep each read or write of its request waiting (a scrape's
#: request comes at once and its answer is a few kB).
REQUEST_TIMEOUT = 5.0


class MetricsServer:
    """The ``/metrics`` HTTP endpoint (a thread of ``prometheus_client``)."""

    def __init__(self, port: int, addr: str, registry: Collector) -> None:
        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        # A thread per connection, which waited for a request line without end: each
        # connection that sent nothing (a scraper's host gone without closing it, or anyone
        # who reaches the port) held a thread of the process for good.  The handler's
        # ``timeout`` closes it instead (from the next connection on: the server is serving).
        handler = self._server.RequestHandlerClass
        self._server.RequestHandlerClass = type(  # type: ignore[misc]
            "_TimedHandler", (handler,), {"timeout": REQUEST_TIMEOUT})
        # socketserver prints a failed request's traceback to stderr (a scraper that hung
        # up mid-request): lines of plain text among the JSON ones. A log record instead.
        self._server.handle_error = _request_failed  # type: ignore[method-assign]
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _request_failed(request: Any, client_address: Any) -> None:
    e = sys.exc_info()[1]
    log.debug("metrics: a request from %s failed: %s: %s", client_address, type(e).__name__, e)


def serve(settings: Any, registry: Collector, what: str) -> MetricsServer | None:
    """Serve ``registry`` when ``settings.metrics_port`` is set; log where."""
    port = getattr(settings, "metrics_port", None)
    if port is None:
        return None
    try:
        server = MetricsServer(port, "0.0.0.0", registry)
    except OSError as e:
        # Serving the log matters more than exposing metrics: say so loudly and go on.
        log.error("%s: cannot serve metrics on port %d (CONVLOG_METRICS_PORT / --metrics-port; "
                  "each process needs its own port): %s; running without metrics", what, port, e)
        return None
    log.info("%s metrics on http://0.0.0.0:%d/metrics", what, server.port)
    return server


def close(server: MetricsServer | None) -> None:
    """Stop serving (``None``: metrics were off)."""
    if server is not None:
        server.close()
