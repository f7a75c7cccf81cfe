"""A function tool with an effect that tests can count across worker processes.

``charge(amount, idempotency_key)`` is written the way the README asks tool
authors to write one: it honours the idempotency key as a payment API does.
Its state lives in files under ``$COUNTING_TOOL_DIR`` (set in the worker's
environment), so it survives ``kill -9`` and is shared by replicas:

* ``runs.jsonl`` — one line per run of the tool: ``{"key", "amount", "pid"}``
  (at-least-once delivery may make this longer than the number of calls);
* ``ledger.jsonl`` — one line per charge applied: the effect, applied only the
  first time a key is seen (checked and written under an ``flock``);
* ``hold`` — while this file exists, a run waits *after* applying the charge
  and before returning, so a test can kill or freeze the worker between the
  tool's effect and the append of its output.

Tests read the files with :func:`runs` and :func:`ledger`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["DIR_ENV", "charge", "ledger", "runs"]

DIR_ENV = "COUNTING_TOOL_DIR"


def _dir() -> Path:
    return Path(os.environ[DIR_ENV])


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def runs(directory: Path) -> list[dict[str, Any]]:
    """Every run of :func:`charge` so far, in order."""
    return _lines(directory / "runs.jsonl")


def ledger(directory: Path) -> list[dict[str, Any]]:
    """Every charge applied so far, in order."""
    return _lines(directory / "ledger.jsonl")


def charge(amount: float, idempotency_key: str = "") -> str:
    """Charge the customer's card.

    Args:
        amount: dollars to charge.
        idempotency_key: set by the worker: a repeated key returns the first charge.
    """
    d = _dir()
    with (d / "runs.jsonl").open("a") as f:
        f.write(json.dumps({"key": idempotency_key, "amount": amount, "pid": os.getpid()}) + "\n")
    with (d / "ledger.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        first = next((c for c in ledger(d) if idempotency_key and c["key"] == idempotency_key), None)
        if first is None:
            first = {"key": idempotency_key, "amount": amount,
                     "charge_id": f"CH-{len(ledger(d)) + 1:04d}"}
            with (d / "ledger.jsonl").open("a") as f:
                f.write(json.dumps(first) + "\n")
    while (d / "hold").exists():
        time.sleep(0.02)
    return f"Charge {first['charge_id']} of ${first['amount']:.2f} applied"
