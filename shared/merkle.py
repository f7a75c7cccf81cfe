"""Batch signatures' Merkle trees (the hashing half of :mod:`shared.signing`).

Items signed together share one signature over the root of a tree of their
signing inputs: a leaf is ``SHA-256(0x00 + input)``, a node ``SHA-256(0x01 +
left + right)``, an odd node moves up as it is.  An item's path is, leaf to
root, one byte per step (0: the sibling is on the right, 1: on the left) and
the sibling's 32 bytes.  Pure hashing: what signs the root is
:mod:`shared.signing`'s.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import threading
from collections.abc import Callable

__all__ = ["SignedRoots", "b64", "leaf", "root_of", "root_of_text", "tree", "unb64"]

#: Most steps in a path (a batch of up to 65,536 items).
MAX_STEPS = 16

_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: Unpadded base64url in its one spelling: the last character of a text of 4k+2
#: (4k+3) characters carries 4 (2) unused low bits, which are zeros; no 4k+1 length.
_LAST = {0: None, 2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}
_sha256 = hashlib.sha256


def b64(raw: bytes) -> str:
    """base64url without padding."""
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """``base64.urlsafe_b64decode`` of unpadded ``text``, without its layers of calls
    (the same bytes, the same errors: ValueError/binascii.Error).  Only the
    base64url alphabet, no padding (as the web console's ``unb64url``): the
    decoder would skip other characters, and whatever follows a padding.  And
    only the text :func:`b64` writes: the decoder ignores the unused low bits of
    the last character, so a signature could be respelled in 16 texts."""
    last = _LAST.get(len(text) % 4, ())
    if not _B64URL.fullmatch(text) or last is not None and text[-1] not in last:
        raise ValueError("not unpadded base64url")
    return binascii.a2b_base64(text.encode("ascii").translate(_FROM_URLSAFE) + b"=" * (-len(text) % 4))


def leaf(message: bytes) -> bytes:
    return _sha256(b"\x00" + message).digest()


def tree(leaves: list[bytes]) -> tuple[bytes, list[bytes]]:
    """The root of ``leaves`` and each leaf's path (raw bytes, leaf to root)."""
    levels = [leaves]
    while len(levels[-1]) > 1:
        level = levels[-1]
        nxt = [_sha256(b"\x01" + level[j] + level[j + 1]).digest() for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])  # an odd node moves up as it is
        levels.append(nxt)
    # Top down: a node's path is its own step (side byte, sibling) and then its
    # parent's path; the odd last node of a level has no step there.
    paths = [b""]
    for level in reversed(levels[:-1]):
        n = len(level)
        paths = [
            (b"\x01" + level[i - 1] if i & 1 else b"\x00" + level[i + 1]) + paths[i >> 1] if (i ^ 1) < n
            else paths[i >> 1]
            for i in range(n)
        ]
    return levels[-1][0], paths


#: Inner nodes hashed lately, by their whole hashed input: a batch's items come
#: one by one and share their upper nodes (25 items, 5 steps each: 27 distinct
#: nodes of 125), so most steps of a path are a lookup.  A plain memo of SHA-256
#: (the full input is the key), so a path still checks exactly as without it.
_nodes: dict[bytes, bytes] = {}
_NODES_KEPT = 16384


def root_of(message: bytes, path: bytes) -> bytes | None:
    """The root ``path`` (raw bytes) leads to from ``message``'s leaf, or ``None``
    when the path is malformed."""
    return _fold(_sha256(b"\x00" + message).digest(), path)


#: (leaf, path text) -> the root that path leads to from that leaf: a memo of
#: :func:`root_of_text` by its exact input, filled ahead.  Folding one item's
#: path also tells its first step's sibling's: the same steps above, and below
#: them this item's own leaf on the other side.  So the sibling's (leaf, path
#: text) is entered with the root when the item is checked, and the sibling,
#: arriving next (a batch's items come in order), costs one hash and one
#: lookup instead of decoding and folding its path.  Each entry is a fact of
#: the fold itself (the text is the base64url of the bytes folded), so a check
#: stays exactly what it was; only the work moves.
_ahead: dict[tuple[bytes, str], bytes] = {}
_AHEAD_KEPT = 4096  # a batch needs its entries only until its next item; ~400 bytes each
_FLIP = (b"\x01", b"\x00")  # side byte of the sibling's step, by this item's side byte


def root_of_text(message: bytes, path: str) -> bytes | None:
    """:func:`root_of` of a path as its text (base64url, no padding), or ``None``
    when the text or the path is malformed."""
    h = _sha256(b"\x00" + message).digest()
    root = _ahead.get((h, path))
    if root is not None:
        return root
    try:
        raw = unb64(path)
    except (ValueError, binascii.Error):
        return None
    root = _fold(h, raw)
    if root is not None and raw and raw[0] < 2:
        if len(_ahead) >= _AHEAD_KEPT:
            _ahead.clear()
        _ahead[(raw[1:33], b64(_FLIP[raw[0]] + h + raw[33:]))] = root
    return root


def _fold(h: bytes, path: bytes) -> bytes | None:
    """The root ``path`` leads to from the leaf hash ``h`` (None: malformed)."""
    n = len(path)
    if n % 33 or n > 33 * MAX_STEPS:
        return None
    if len(_nodes) > _NODES_KEPT:
        _nodes.clear()
    for k in range(0, n, 33):
        side = path[k]
        if side == 0:
            node = b"\x01" + h + path[k + 1 : k + 33]
        elif side == 1:
            node = b"\x01" + path[k + 1 : k + 33] + h
        else:
            return None
        known = _nodes.get(node)
        if known is None:
            known = _nodes[node] = _sha256(node).digest()
        h = known
    return h


class SignedRoots:
    """Batch roots whose signature was checked (oldest forgotten first), so a
    batch costs one verification, even when its items are checked at once on
    several threads: the first verifies, the others wait for its answer.

    Args:
        verify: ``(key_id, root, sig) -> bool``, the signature check itself.
    """

    def __init__(self, verify: Callable[[str, bytes, str], bool], *, kept: int = 8192) -> None:
        self._verify = verify
        self._kept = kept
        self._known: dict[tuple[str, bytes, str], bool] = {}
        self._pending: dict[tuple[str, bytes, str], threading.Event] = {}
        self._lock = threading.Lock()

    def check(self, key_id: str, root: bytes, sig: str) -> bool:
        key = (key_id, root, sig)
        known = self._known.get(key)
        if known is not None:
            return known
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                return known
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = threading.Event()
        if pending is not None:
            pending.wait(5)
            known = self._known.get(key)
            # Not there: its check is still running after 5 s, or the answer was forgotten
            # already (many roots since): check it here rather than refuse a good one.
            return known if known is not None else self._verify(key_id, root, sig)
        ok = False
        try:
            ok = self._verify(key_id, root, sig)
        finally:  # also when the check raised (it then counts as failed): nobody waits for good
            with self._lock:
                self._known[key] = ok
                if len(self._known) > self._kept:
                    del self._known[next(iter(self._known))]
                self._pending.pop(key).set()
        return ok
