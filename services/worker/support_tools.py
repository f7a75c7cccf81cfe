"""Demo function tools for L2Support in the reference scenario.

These are demonstration tools: nothing is refunded, filed or created anywhere.
Each returns a confirmation string whose reference id is derived from its
inputs (a hash), so the same call always gives the same answer and replayed
conversations stay byte-identical.
"""

from __future__ import annotations

import hashlib
import math

__all__ = ["create_ticket", "file_bug_report", "issue_refund"]


def _ref(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"{prefix}-{digest[:8].upper()}"


def issue_refund(amount: float, reason: str) -> str:
    """Issue a refund to the customer's original payment method.

    Args:
        amount: refund amount in US dollars, greater than zero.
        reason: why the refund is issued, as the customer described it.

    Raises:
        ValueError: the amount is not a positive finite number or the reason is empty.
    """
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"refund amount must be a positive number of dollars, got {amount!r}")
    if not reason.strip():
        raise ValueError("refund reason must not be empty")
    refund_id = _ref("RF", f"{amount:.2f}", reason.strip())
    return (
        f"Refund {refund_id} of ${amount:.2f} issued to the original payment method "
        f"(reason: {reason.strip()}). It will appear within 5-10 business days."
    )


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
