"""Log output: readable text (default) or one JSON object per line.

``CONVLOG_LOG_FORMAT=json`` makes every line a JSON object with ``ts`` (RFC
3339 UTC), ``level``, ``logger``, ``msg`` and, where the call site knows them,
``session_id``, ``item_order``, ``agent`` and ``turn`` (passed with
``extra=``), plus ``exc`` for a traceback.  Log shippers (Loki, Elasticsearch,
CloudWatch) then index those fields without a parsing rule.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "configure_logging", "context"]

#: The ``extra=`` fields convlog's log calls may carry, in output order.
CONTEXT_FIELDS = ("session_id", "item_order", "agent", "turn")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def context(session_id: str | None = None, item_order: int | None = None,
            agent: str | None = None, turn: str | None = None) -> dict[str, Any]:
    """``extra=`` for a log call: the fields that apply (``None`` ones are left out)."""
    values = (session_id, item_order, agent, turn)
    return {k: v for k, v in zip(CONTEXT_FIELDS, values, strict=True) if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(settings: Any) -> None:
    """Send logs to stderr at ``settings.log_level`` in ``settings.log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    if getattr(settings, "log_format", "text") == "json":
        handler.setFormatter(JsonFormatter())
        # Python's own stderr output becomes JSON lines too: warnings and a
        # crash's traceback.
        logging.captureWarnings(True)
        sys.excepthook = lambda *exc: logging.getLogger("convlog").critical(
            "uncaught exception", exc_info=exc)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        handlers=[handler])
