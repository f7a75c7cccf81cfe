"""Facts the offline rules model pulls out of user messages (see :mod:`.rules_model`).

Keyword classes, dollar amounts, dates, and the user's issue restated in the
second person ("I was charged twice" -> "you were charged twice"), so replies
can show what the agent saw earlier in the shared history.  Plain regular
expressions: deterministic, and no pretence of understanding.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

__all__ = [
    "BILLING",
    "DATE",
    "DISPUTE",
    "GREETING_ONLY",
    "TECHNICAL",
    "clip",
    "facts",
    "first_matching",
    "issue",
    "join_words",
    "last_amount",
    "second_person",
    "strip_greeting",
    "unique",
]

#: Message texts whose findings are kept (see ``_matches``).
_MEMO = 4096

BILLING = re.compile(
    r"\b(charge[sd]?|charging|refund(?:s|ed)?|invoices?|payments?|subscriptions?|billing|billed)\b",
    re.I,
)
TECHNICAL = re.compile(
    r"\b(errors?|bugs?|crash(?:es|ed|ing)?|log ?in|password|apps?|install(?:ed|ing)?|features?)\b",
    re.I,
)
DISPUTE = re.compile(r"\b(dispute[sd]?|disputing|chargebacks?|fraud(?:ulent)?)\b", re.I)
DATE = re.compile(
    r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.? \d{1,2}(?:st|nd|rd|th)?\b"
)
GREETING_ONLY = re.compile(
    r"^\s*(hi|hello|hey|good (?:morning|afternoon|evening))\b[\s!.,a-z]*$", re.I
)
_WHEN = re.compile(r"\b(?:last (?:week|month)|this (?:week|month)|yesterday|today)\b", re.I)
_AMOUNT = re.compile(
    r"\$\s?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{1,2}))?|\b(\d+(?:\.\d{1,2})?) ?(?:dollars|usd)\b", re.I
)
_GREETING_PREFIX = re.compile(
    r"^\s*(?:(?:hi|hello|hey|yes|yeah|ok|okay|so|well)\b[,!.]?\s*)+", re.I
)
_PRONOUNS = [
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"\bI was\b", "you were"),
        (r"\bI am\b", "you are"),
        (r"\bI'm\b", "you're"),
        (r"\bI've\b", "you've"),
        (r"\bI\b", "you"),
        (r"\bmy\b", "your"),
        (r"\bme\b", "you"),
        (r"\bmine\b", "yours"),
        (r"\bwe\b", "you"),
        (r"\bour\b", "your"),
    )
]


def last_amount(texts: list[str]) -> float | None:
    """The last dollar amount mentioned in ``texts`` (searched newest first)."""
    for text in reversed(texts):
        amount = _last_amount_in(text)
        if amount is not None:
            return amount
    return None


def facts(users: list[str]) -> str:
    """Amounts and dates the user gave, e.g. ``charges of $29.99 on March 1st and March 3rd``."""
    amounts = unique(a for u in users for a in _amounts_in(u))
    dates = unique(d for u in users for d in _dates_in(u)) or unique(d for u in users for d in _whens_in(u))
    if amounts and dates:
        return f"charges of {join_words(amounts)} on {join_words(dates)}"
    return join_words(amounts or dates) or "the charges on your statement"


def issue(users: list[str]) -> str:
    """The first message that states a problem, restated in the second person."""
    first = first_matching(users, BILLING, TECHNICAL, DISPUTE)
    return second_person(first) if first else "you contacted us"


def first_matching(users: list[str], *patterns: re.Pattern[str]) -> str:
    """The first message matching any pattern, else the first message, else ``""``."""
    return next((u for u in users if _matches(u, patterns)), users[0] if users else "")


# Each turn shows the rules the whole history again, so what they find in one message
# is kept per message text: the rules' cost then follows the new messages, not the window.
@functools.lru_cache(maxsize=_MEMO)
def _last_amount_in(text: str) -> float | None:
    found = list(_AMOUNT.finditer(text))
    if not found:
        return None
    m = found[-1]
    if m.group(3):
        return float(m.group(3))
    return float(m.group(1).replace(",", "") + "." + (m.group(2) or "0"))


@functools.lru_cache(maxsize=_MEMO)
def _amounts_in(text: str) -> tuple[str, ...]:
    return tuple(m.group(0).strip() for m in _AMOUNT.finditer(text))


@functools.lru_cache(maxsize=_MEMO)
def _dates_in(text: str) -> tuple[str, ...]:
    return tuple(DATE.findall(text))


@functools.lru_cache(maxsize=_MEMO)
def _whens_in(text: str) -> tuple[str, ...]:
    return tuple(_WHEN.findall(text))


@functools.lru_cache(maxsize=_MEMO)
def _matches(text: str, patterns: tuple[re.Pattern[str], ...]) -> bool:
    return any(p.search(text) for p in patterns)


def strip_greeting(text: str) -> str:
    """Drop a leading "Hi,", "Yes,", "OK" and the like."""
    return _GREETING_PREFIX.sub("", text).strip()


def second_person(text: str) -> str:
    """``"Hi, I was charged twice for my plan."`` -> ``"you were charged twice for your plan"``."""
    text = strip_greeting(text)
    for pattern, repl in _PRONOUNS:
        text = pattern.sub(repl, text)
    text = text.strip().rstrip(".!?").strip()
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]  # "The app crashes" reads "the app crashes" mid-sentence
    return text or "you got in touch"


def join_words(parts: list[str]) -> str:
    """``["a"]`` -> ``a``; ``["a", "b", "c"]`` -> ``a, b and c``; ``[]`` -> ``""``."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unique(values: Iterable[str]) -> list[str]:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))
