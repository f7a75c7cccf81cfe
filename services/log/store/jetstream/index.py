"""What one log-service instance remembers about a session: a cache only.

Every field can be rebuilt from the stream, and is checked against it:
appends carry ``Nats-Expected-Last-Subject-Sequence`` of the head this cache
holds, so a head another instance moved on is refused by the server and then
reloaded.  Reads load the head fresh and extend the index up to it.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg

from shared.chain import GENESIS_HASH
from shared.errors import UnavailableError

__all__ = ["Meta", "SessionIndex", "meta_of"]


class Meta(msgspec.Struct, frozen=True):
    """The fields of a stored envelope the store needs (``data`` left raw)."""

    item_order: int
    kind: str
    hash: str
    created_at: str
    data: msgspec.Raw = msgspec.Raw(b"{}")


class _Target(msgspec.Struct):
    target: int


_meta = msgspec.json.Decoder(Meta)
_target = msgspec.json.Decoder(_Target)


def meta_of(msg: Msg) -> Meta:
    try:
        return _meta.decode(msg.data)
    except msgspec.DecodeError as e:
        raise UnavailableError(f"the log stream holds an unreadable envelope on {msg.subject}") from e


def seq_of(msg: Msg) -> int:
    return int((msg.headers or {})["Nats-Sequence"])


_KIND_CODE = {"item": 0, "retract": 1, "clear": 2}
KIND_NAME = {v: k for k, v in _KIND_CODE.items()}


@dataclass(slots=True)
class SessionIndex:
    """A session's head and (a prefix of) its order -> stream sequence index.

    ``seqs[o - 1]`` is the stream sequence of item ``o`` and ``kinds[o - 1]``
    its kind, for ``o`` in ``1 .. indexed``; ``hidden`` maps retracted orders
    to the order of their first retract and ``last_clear`` is the last clear
    among them.  The index may reach past the head a read took (another read
    or a commit extended it meanwhile): what it says is read as of that head,
    as the SQLite store reads (a later retract or clear hides nothing yet).
    """

    last_order: int = 0
    last_hash: str = GENESIS_HASH
    last_seq: int = 0
    updated_at: str = ""
    seqs: array = field(default_factory=lambda: array("q"))
    kinds: bytearray = field(default_factory=bytearray)
    hidden: dict[int, int] = field(default_factory=dict)
    last_clear: int = 0
    #: order -> stream sequence of single envelopes beyond ``indexed`` (where
    #: a page of a forward read ended), so the next page needs no index.
    marks: dict[int, int] = field(default_factory=dict)

    @property
    def indexed(self) -> int:
        return len(self.seqs)

    def set_head(self, meta: Meta, seq: int) -> None:
        """Move the head forward to a stored envelope (never backward)."""
        if meta.item_order >= self.last_order:
            self.last_order, self.last_hash, self.last_seq = meta.item_order, meta.hash, seq
            self.updated_at = meta.created_at

    def add(self, meta: Meta, seq: int) -> None:
        """Index the next envelope (it must be order ``indexed + 1``).

        Raises:
            UnavailableError: the stream breaks contiguity (it was altered).
        """
        if meta.item_order <= self.indexed:
            return  # indexed already (a read and a commit raced to add it)
        if meta.item_order != self.indexed + 1:
            raise UnavailableError(
                f"the log stream is not contiguous: found item_order {meta.item_order} "
                f"after {self.indexed}"
            )
        self.seqs.append(seq)
        self.kinds.append(_KIND_CODE.get(meta.kind, 0))
        if meta.kind == "retract":
            self.hidden.setdefault(_target.decode(meta.data).target, meta.item_order)
        elif meta.kind == "clear":
            self.last_clear = meta.item_order
        self.set_head(meta, seq)

    def kind(self, order: int) -> str | None:
        if 1 <= order <= self.indexed:
            return KIND_NAME[self.kinds[order - 1]]
        return None

    def _clear_as_of(self, upto: int) -> int:
        """The last clear at or before order ``upto`` (0: none)."""
        if self.last_clear <= upto:
            return self.last_clear
        o, kinds = upto, self.kinds
        while o > 0 and kinds[o - 1] != _KIND_CODE["clear"]:
            o -= 1
        return o

    def visible_orders(self, after: int, upto: int) -> list[int]:
        """Orders of items in ``(after, upto]`` visible as of ``upto`` (needs the index up to ``upto``)."""
        start = max(after, self._clear_as_of(upto))
        kinds, hidden = self.kinds, self.hidden
        return [
            o for o in range(start + 1, upto + 1)
            if kinds[o - 1] == 0 and ((h := hidden.get(o)) is None or h > upto)
        ]

    def visible_tail(self, n: int, upto: int) -> list[int]:
        """The last ``n`` orders visible as of ``upto``, oldest first."""
        out: list[int] = []
        kinds, hidden = self.kinds, self.hidden
        o, clear = upto, self._clear_as_of(upto)
        while o > clear and len(out) < n:
            if kinds[o - 1] == 0 and ((h := hidden.get(o)) is None or h > upto):
                out.append(o)
            o -= 1
        out.reverse()
        return out
