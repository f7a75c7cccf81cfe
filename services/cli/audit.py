"""Signatures and signed heads in an audit replay (``convlog replay --verify
--keyring FILE``): every signed item is checked offline against the public
keyring, and a signed head proves the export is not missing its tail and
does not fork from what the log service signed."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from shared.chain import Problem
from shared.messages import Envelope
from shared.signing import Keyring, SignedHead

__all__ = ["HeadLine", "SignatureAudit", "decode_head_line", "encode_head_line"]


class HeadLine(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The last line of a JSONL export: ``{"signed_head": {...}}``."""

    signed_head: SignedHead


_head_decoder = msgspec.json.Decoder(HeadLine)


def encode_head_line(head: SignedHead) -> bytes:
    return msgspec.json.encode(HeadLine(signed_head=head))


def decode_head_line(line: bytes | str) -> SignedHead | None:
    """The signed head a line holds, or ``None`` when it is not a head line."""
    if b'"signed_head"' not in (line.encode() if isinstance(line, str) else line):
        return None
    try:
        return _head_decoder.decode(line).signed_head
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass
class SignatureAudit:
    """Per-envelope signature marks and the signed-head check.

    Args:
        keyring: the public keyring, or ``None`` (signatures are then not checked).
        keep: the orders a signed head may name, when they are known before the
            items (``None``: every item's hash is kept, for heads met after the items).
    """

    keyring: Keyring | None = None
    keep: frozenset[int] | None = None
    signed: int = 0
    unsigned: int = 0
    bad: int = 0
    heads: list[SignedHead] = field(default_factory=list)
    _checked: int = 0
    _hashes: dict[int, str] = field(default_factory=dict)  # order -> hash, where a head may name it

    @property
    def head(self) -> SignedHead | None:
        """The signed head covering the most items."""
        return max(self.heads, key=lambda h: h.item_order, default=None)

    def check(self, env: Envelope) -> tuple[str, str | None]:
        """(mark for the transcript, why the signature is bad or ``None``)."""
        self._checked += 1
        if self.keep is None or self._checked in self.keep:
            self._hashes[self._checked] = env.hash
        if env.sig is None and env.key_id is None:
            self.unsigned += 1
            return "unsigned", None
        if self.keyring is None:
            self.signed += 1
            return "signed, not checked", None
        reason = self.keyring.check_envelope(env)
        if reason is None:
            self.signed += 1
            return "signed", None
        self.bad += 1
        return "BAD SIGNATURE", reason

    def finish(self, session_id: str, count: int) -> Problem | None:
        """The signed heads' verdict on the whole export (the earliest problem), or ``None``."""
        problems = [p for h in self.heads if (p := self._check_head(h, session_id, count)) is not None]
        return min(problems, key=lambda p: p.item_order, default=None)

    def _check_head(self, h: SignedHead, session_id: str, count: int) -> Problem | None:
        if h.session_id != session_id:
            return Problem(1, f"the signed head is of session {h.session_id!r}")
        if h.item_order < 0:  # no log signs one; as an index it named an item from the end
            return Problem(1, f"signed head: item_order {h.item_order} is negative")
        if self.keyring is not None and (reason := self.keyring.check_head(h)) is not None:
            return Problem(min(max(h.item_order, 1), count + 1), f"signed head: {reason}")
        if h.item_order == 0:
            return None
        if count < h.item_order:
            return Problem(count + 1, f"truncated: the log service signed item_order {h.item_order} "
                           f"at {h.signed_at}, but the export ends at item_order {count}")
        if self._hashes.get(h.item_order) != h.hash:
            return Problem(h.item_order, f"forked: item_order {h.item_order} does not have the hash "
                           f"the log service signed at {h.signed_at}")
        return None

    def summary(self, count: int) -> str:
        if self.signed == self.unsigned == self.bad == 0 or self.unsigned == count:
            sig = "unsigned (no item carries a signature)"
        elif self.keyring is None:
            sig = f"{self.signed} signed (not checked: no --keyring), {self.unsigned} unsigned"
        else:
            sig = f"{self.signed} signatures valid, {self.unsigned} unsigned"
        if self.head is None:
            head = "no signed head (a removed tail would not show)"
        elif self.keyring is None:
            head = f"signed head at item_order {self.head.item_order} (not checked: no --keyring)"
        else:
            head = (f"signed head at item_order {self.head.item_order} ({self.head.signed_at}) "
                    "matches; later items, if any, are not covered")
        return f"{sig}; {head}"
