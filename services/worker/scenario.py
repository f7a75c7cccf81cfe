"""The demo conversations of the reference scenario (``deploy/agents.toml``).

``SEED_CONVERSATION`` is the seed article's four user messages, verbatim.
Played against the offline rules model it goes:

1. Triage calls ``route_to_billing``; L1Billing asks for the amounts and dates,
   restating that the user was charged twice for the subscription.
2. L1Billing recognises the duplicate ($29.99 on March 1st and March 3rd).
3. L1Billing proposes the amount from the history ($29.99) and asks to confirm.
4. L1Billing (refund <= $50, no dispute) confirms it will refund $29.99 for the
   later charge, recapping the earlier turns.

``ESCALATION_CONVERSATION`` exercises both handoff levels and a function tool:

1. Triage calls ``route_to_billing``; L1Billing sees a dispute and calls
   ``escalate_to_senior``; L2Support, in the same turn, summarises what the
   user reported and offers to refund the $120.
2. L2Support (still the active agent) calls ``issue_refund(amount=120.0, ...)``
   once, then confirms quoting the tool's output (a ``RF-…`` refund id).
3. L2Support answers a follow-up from the history, citing the refund id.
"""

from __future__ import annotations

__all__ = [
    "ESCALATION_CONVERSATION",
    "ESCALATION_SESSION_ID",
    "SEED_CONVERSATION",
    "SEED_SESSION_ID",
]

#: The session id the seed article uses for its support conversation.
SEED_SESSION_ID = "ticket-2026-0314-001"

#: The seed article's four user messages, verbatim (note the em dash in the last).
SEED_CONVERSATION: tuple[str, ...] = (
    "Hi, I was charged twice for my subscription this month.",
    "Yes, I can see two charges of $29.99 on March 1st and March 3rd.",
    "I'd like a refund for the duplicate charge.",
    "The amount is $29.99 \u2014 can you process that?",
)

#: A session id for the escalation demo.
ESCALATION_SESSION_ID = "ticket-2026-0314-002"

#: Triage -> L1Billing -> L2Support in one turn, then a refund by L2Support's tool.
ESCALATION_CONVERSATION: tuple[str, ...] = (
    "Hi, I want to dispute a charge of $120 from last week \u2014 I never authorised it.",
    "Yes please, go ahead and refund the $120.",
    "Thanks! Will I still be charged for my subscription next month?",
)
