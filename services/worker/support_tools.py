"""Demo function tools for L2Support in the reference scenario.

These are demonstration tools: nothing is refunded, filed or created anywhere.
Each returns a confirmation string with a reference id.

``issue_refund`` shows the idempotency contract of :mod:`.tools`: it takes the
call's ``idempotency_key`` and, like a payment API, answers a repeated key with
the first refund instead of issuing a second one.  The refunds it issued are
kept in this worker process's memory only (a stand-in for the payment
provider, which is where a real deployment keeps them): a worker that is
restarted, or another replica, does not know them and would issue the refund
again (under the same refund id, which is derived from the key).  The other
two tools have no effect to repeat; their ids are derived from their inputs.
"""

from __future__ import annotations

import hashlib
import math
import threading
import uuid

__all__ = ["REFUNDS", "create_ticket", "file_bug_report", "issue_refund"]


def _ref(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"{prefix}-{digest[:8].upper()}"


class _Refunds:
    """The refunds this process issued, by idempotency key (thread-safe: sync
    tools run in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[tuple[str, str], str]] = {}
        self.issued = 0  # refunds this process issued (repeated keys not counted)

    def issue(self, key: str, amount: float, reason: str) -> str:
        request = (f"{amount:.2f}", reason)
        with self._lock:
            first = self._by_key.get(key) if key else None
            if first is not None:
                if first[0] != request:
                    raise ValueError(
                        f"idempotency key {key!r} was already used for a refund of "
                        f"${first[0][0]} ({first[0][1]}); a new refund needs a new call"
                    )
                return first[1]
            refund_id = _ref("RF", key) if key else _ref("RF", uuid.uuid4().hex)
            confirmation = (
                f"Refund {refund_id} of ${amount:.2f} issued to the original payment method "
                f"(reason: {reason}). It will appear within 5-10 business days."
            )
            self.issued += 1
            if key:
                self._by_key[key] = (request, confirmation)
            return confirmation


REFUNDS = _Refunds()


def issue_refund(amount: float, reason: str, idempotency_key: str = "") -> str:
    """Issue a refund to the customer's original payment method.

    A repeated ``idempotency_key`` returns the first refund's confirmation and
    issues nothing new (the worker passes the call's key; see the module
    docstring for where the keys are kept).  Without a key every call is a new
    refund.

    Args:
        amount: refund amount in US dollars, greater than zero.
        reason: why the refund is issued, as the customer described it.
        idempotency_key: set by the worker, never by the model.

    Raises:
        ValueError: the amount is not a positive finite number, the reason is
            empty, or the key was used before for a different refund.
    """
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"refund amount must be a positive number of dollars, got {amount!r}")
    if not reason.strip():
        raise ValueError("refund reason must not be empty")
    return REFUNDS.issue(idempotency_key, amount, reason.strip())


def file_bug_report(summary: str) -> str:
    """File a bug report with engineering.

    Args:
        summary: what goes wrong, including the steps already tried.
    """
    if not summary.strip():
        raise ValueError("bug report summary must not be empty")
    return f"Bug report {_ref('BUG', summary.strip())} filed with engineering: {summary.strip()}"


async def create_ticket(summary: str) -> str:
    """Create an engineering ticket for an issue support cannot resolve.

    Args:
        summary: the issue and everything already tried.
    """
    if not summary.strip():
        raise ValueError("ticket summary must not be empty")
    return f"Ticket {_ref('TCK', summary.strip())} created for engineering: {summary.strip()}"
