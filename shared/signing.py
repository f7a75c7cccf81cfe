"""Who wrote it: Ed25519 keys, signed items and signed session heads.

Keys are NATS nkeys (``nkeys`` package; Ed25519 underneath): a private key is
an nkey *seed* (``SU...``) in a file of its own, mode 0600; its public key
(``U...``, 56 characters, with a checksum) is the **key id**.  A *keyring* is
one public JSON file binding each key id to what it may sign::

    {"convlog_keyring": 1, "keys": [
      {"key_id": "UA...", "role": "agent", "agent": "Triage", "created_at": "..."},
      {"key_id": "UB...", "role": "gateway", "agent": "user", "created_at": "..."},
      {"key_id": "UC...", "role": "log", "agent": "convlog-log", "created_at": "..."}]}

Roles: an ``agent`` key signs items of its own agent (and ``system`` notes its
worker writes); the ``gateway`` key signs user messages (``agent: "user"``,
only through ``convlog.in``); the ``log`` key signs session heads.  A rotated
key keeps its entry with ``retired_at``: items it signed before then still
verify, nothing it signs later is accepted.

What is signed (``sig`` = base64url, no padding, of the Ed25519 signature; only
the one spelling :func:`shared.merkle.b64` writes is accepted):

* an item: ``b"convlog-item-v1\\n" + JCS({"session_id", "item_id", "agent",
  "kind", "data"})`` -- the content bound to its session and id, so a captured
  request cannot be replayed to another session, nor with an edited item;
* a head: ``b"convlog-head-v1\\n" + JCS({"session_id", "item_order", "hash",
  "signed_at"})``;
* items appended together (one request, or the appends one client makes in the
  same event-loop turn) under **one** signature: each item's leaf is
  ``SHA-256(0x00 + its signing input)``, a node ``SHA-256(0x01 + left +
  right)`` (an odd node moves up as it is), and the signature covers
  ``b"convlog-batch-v1\\n" + root`` (32 bytes).  Such an item's ``sig`` is
  ``<signature>.<path>``: the path is base64url of, leaf to root, one byte
  (0: the sibling is on the right, 1: on the left) and the sibling's 32 bytes.
  Each envelope still verifies on its own, offline; one signature and one
  verification serve the whole batch (a verified root is remembered; the
  tree and path hashing: :mod:`shared.merkle`);
* the ``to`` of a user message (the entry agent it asks for, routing metadata
  outside the log): ``b"convlog-route-v1\\n" + JCS({"session_id", "item_id",
  "to"})``, by the key that signs the message.

Everything here is pure computation except :meth:`Signer.load` and
:meth:`Keyring.load`, which read one file.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys

from .chain import canonical, needs_reference, sorted_encoder
from .config import ConfigError, Settings
from .merkle import SignedRoots, b64, leaf, root_of_text, tree, unb64
from .messages import AppendItem, Envelope, SignedHead

_log = logging.getLogger("convlog.signing")

__all__ = [
    "GATEWAY",
    "LOG",
    "KeyEntry",
    "KeyFile",
    "Keyring",
    "KeyringError",
    "check_key_files",
    "LiveKeyring",
    "SignedHead",
    "Signer",
    "VerifiedItems",
    "head_signing_input",
    "file_stamp",
    "item_signing_input",
    "rfc3339_instant",
    "route_signing_input",
    "sign_batch",
    "sign_head",
    "sign_item",
    "verify_item",
    "verify_head",
    "verify_signature",
    "writes_as",
]

ITEM_DOMAIN = b"convlog-item-v1\n"
ROUTE_DOMAIN = b"convlog-route-v1\n"
BATCH_DOMAIN = b"convlog-batch-v1\n"
#: Most items under one batch signature (a path of at most 8 steps).
MAX_BATCH = 256
HEAD_DOMAIN = b"convlog-head-v1\n"
KEYRING_VERSION = 1
Role = Literal["agent", "gateway", "log"]
GATEWAY = "gateway"
LOG = "log"
#: The author a gateway key may sign for, and the one a log key stands for.
USER_AGENT = "user"
LOG_AGENT = "convlog-log"
#: Worker notes (a failed turn) are written as ``system`` by the agent's worker.
SYSTEM_AGENT = "system"


def writes_as(agent: str, author: str) -> bool:
    """Whether ``author`` is one ``agent`` (its key, its worker) writes as: the agent
    itself, or ``system`` (its worker's notes).  An item under ``agent``'s turn id
    written as anyone else was not written by that agent."""
    return author in (agent, SYSTEM_AGENT)


_TURN_AGENT = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_TURN_ROLE = re.compile(r"^(?:msg|reply|fail|call\d{1,3}|out\d{1,3})\Z")


def turn_id_agent(item_id: str) -> str | None:
    """The agent a turn-derived id ``<turn>.<agent>.<step>.<role>`` names, or ``None``.

    The same shape as ``services.worker.turn_ids`` (a test keeps the two in
    step).  A signed item under such an id must be signed by that agent's key,
    so nobody can pre-empt another agent's reply by writing its predictable id.
    """
    parts = item_id.rsplit(".", 3)
    if len(parts) != 4:
        return None
    turn, agent, step, role = parts
    if not turn or not _TURN_AGENT.match(agent) or not step.isdigit() or not _TURN_ROLE.match(role):
        return None
    return agent


class KeyringError(ConfigError):
    """A key or keyring file is missing, unreadable or malformed (names the file)."""


@functools.lru_cache(maxsize=4096)
def _instant(text: str) -> datetime | None:
    """An RFC 3339 time with its offset (``...Z`` or ``...+01:00``), or ``None``;
    exactly what the web console's ``instant`` takes (``signing.js``), to the
    microsecond (a longer fraction is cut there)."""
    if not _RFC3339.match(text):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # e.g. the 30th of February
        return None


#: (an offset's minutes 00-59, as RFC 3339 and the console have them: fromisoformat
#: read "+01:60" as +02:00, a time the console refuses)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:[0-5]\d)\Z")

#: An RFC 3339 time with its offset as an aware datetime, or ``None`` (see ``_instant``).
rfc3339_instant = _instant


def _after(at: str, retired_at: str) -> bool:
    """Whether the time ``at`` is later than ``retired_at`` (as instants: the texts may
    differ in their fraction of a second or offset); an ``at`` that is no time is."""
    t, r = _instant(at), _instant(retired_at)
    try:
        return t is None or r is None or t > r
    except OverflowError:  # year 1 with an offset east of UTC
        return True


@functools.lru_cache(maxsize=4096)
def _verify_key(key_id: str) -> nacl.signing.VerifyKey | None:
    """The Ed25519 public key an nkey public key (``U...``) encodes, or ``None``."""
    try:
        raw = base64.b32decode(key_id + "=" * (-len(key_id) % 8))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        return None
    if nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        return None
    return nacl.signing.VerifyKey(raw[1:33])


def verify_signature(key_id: str, message: bytes, sig: str) -> bool:
    """True when ``sig`` is ``key_id``'s valid signature of ``message``."""
    vk = _verify_key(key_id)
    if vk is None:
        return False
    try:
        vk.verify(message, unb64(sig))
    except (nacl.exceptions.BadSignatureError, ValueError, binascii.Error, TypeError):
        return False
    return True


#: Batch roots checked lately: one Ed25519 verification per batch.
_roots = SignedRoots(lambda key_id, root, sig: verify_signature(key_id, BATCH_DOMAIN + root, sig))


def verify_item(key_id: str, message: bytes, sig: str) -> bool:
    """True when ``sig`` (a plain or a batch signature) signs the item ``message`` by ``key_id``."""
    base, dot, path = sig.partition(".")
    if not dot:
        return verify_signature(key_id, message, sig)
    root = root_of_text(message, path)
    return root is not None and _roots.check(key_id, root, base)


class VerifiedItems:
    """Item signatures that verified lately (oldest forgotten first), for a reader that
    checks the same items again and again -- a worker with a keyring checks its whole
    history window on every read of a turn, one Ed25519 verification (~45 µs) an item.

    An entry is the key id, the signature and the SHA-256 of the signed bytes, so the
    same signature over changed content is verified afresh (and fails).  Only the
    signature's own check is remembered: what the keyring says of the key (its agent,
    its retirement) is asked every time, so a rotation takes effect at once.
    """

    def __init__(self, kept: int = 4096) -> None:
        self._kept = kept
        self._ok: dict[tuple[str, str, bytes], None] = {}

    def verify(self, key_id: str, message: bytes, sig: str) -> bool:
        """As :func:`verify_item`."""
        key = (key_id, sig, hashlib.sha256(message).digest())
        if key in self._ok:
            return True
        if not verify_item(key_id, message, sig):
            return False
        if len(self._ok) >= self._kept:
            del self._ok[next(iter(self._ok))]
        self._ok[key] = None
        return True


class _ItemSigned(msgspec.Struct):
    """The signed object of an item, fields in RFC 8785 order (as ``chain._Hashed``)."""

    agent: str
    data: Mapping[str, Any]
    item_id: str
    kind: str
    session_id: str


def item_signing_input(session_id: str, item_id: str, agent: str, kind: str, data: Mapping[str, Any]) -> bytes:
    """The bytes an item's signature covers (see the module docstring)."""
    if type(data) is dict and not needs_reference(data):  # the usual case, without a dict to sort
        return ITEM_DOMAIN + sorted_encoder.encode(_ItemSigned(agent, data, item_id, kind, session_id))
    return ITEM_DOMAIN + canonical(
        {"agent": agent, "data": data, "item_id": item_id, "kind": kind, "session_id": session_id}
    )


def route_signing_input(session_id: str, item_id: str, to: str) -> bytes:
    """The bytes a user message's ``to_sig`` covers: its ``to``, bound to its session and id."""
    return ROUTE_DOMAIN + canonical({"item_id": item_id, "session_id": session_id, "to": to})


def head_signing_input(session_id: str, item_order: int, hash: str, signed_at: str) -> bytes:
    """The bytes a signed head's signature covers."""
    return HEAD_DOMAIN + canonical(
        {"hash": hash, "item_order": item_order, "session_id": session_id, "signed_at": signed_at}
    )


class Signer:
    """A private key: signs items and heads.

    Attributes:
        key_id: the public key (``U...``), written next to each signature.
    """

    def __init__(self, seed: bytes | str) -> None:
        seed_b = seed.encode() if isinstance(seed, str) else bytes(seed)
        try:
            self._kp = nkeys.from_seed(bytearray(seed_b.strip()))
            self.key_id: str = self._kp.public_key.decode()
        except (nkeys.NkeysError, binascii.Error, ValueError, TypeError) as e:
            raise KeyringError(f"not an nkey user seed: {type(e).__name__}") from None
        if not self.key_id.startswith("U"):
            raise KeyringError("not an nkey user seed (its public key must start with U)")

    @classmethod
    def generate(cls) -> tuple[Signer, bytes]:
        """A fresh key and its seed (write the seed with :func:`write_private`)."""
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        return cls(seed), bytes(seed)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Signer:
        """Read a seed file (``CONVLOG_SIGNING_KEY``).

        Raises:
            KeyringError: the file cannot be read or holds no user seed.
        """
        try:
            text = Path(path).read_bytes()
        except OSError as e:
            raise KeyringError(f"cannot read signing key {path}: {e.strerror or e}") from None
        try:
            return cls(text)
        except KeyringError as e:
            raise KeyringError(f"signing key {path}: {e}") from None

    def sign(self, message: bytes) -> str:
        return b64(self._kp.sign(message))

    def current(self) -> Signer:
        """The key that signs now: this one (a :class:`KeyFile` may change); take
        ``sign`` and ``key_id`` of what it returns, with no call of it in between."""
        return self

    def renewed(self, key_id: str | None) -> bool:
        """Whether another key than ``key_id`` signs from now on (a :class:`KeyFile` looks
        at its file at once): asked when the log service refused a signature of ``key_id``."""
        return False

    def refused(self) -> str | None:
        """Why the key that signs now may not sign, or ``None``: a :class:`KeyFile` whose
        keyring no longer takes its key (retired, and no successor in the file yet)."""
        return None

    def sign_items(self, session_id: str, items: Iterable[AppendItem]) -> list[AppendItem]:
        """Each item with its ``sig`` and ``key_id`` (every item needs an ``item_id``);
        several items share one batch signature (:func:`sign_batch`)."""
        batch = [(session_id, it) for it in items]
        out: list[AppendItem] = []
        for i in range(0, len(batch), MAX_BATCH):
            out += sign_batch(self, batch[i : i + MAX_BATCH])
        return out


def sign_item(signer: Signer, session_id: str, item: AppendItem) -> AppendItem:
    """``item`` signed by ``signer`` for ``session_id``."""
    if item.item_id is None:
        raise ValueError("an item must have its item_id before it is signed")
    signer = signer.current()
    msg = item_signing_input(session_id, item.item_id, item.agent, item.kind, item.data)
    return msgspec.structs.replace(item, sig=signer.sign(msg), key_id=signer.key_id)


def sign_batch(signer: Signer, items: list[tuple[str, AppendItem]]) -> list[AppendItem]:
    """Each ``(session_id, item)`` signed by ``signer``: one item alone as by
    :func:`sign_item`, several under one batch signature (at most :data:`MAX_BATCH`)."""
    if len(items) == 1:
        return [sign_item(signer, *items[0])]
    if len(items) > MAX_BATCH:
        raise ValueError(f"{len(items)} items in one batch signature, over {MAX_BATCH}")
    messages = []
    for sid, it in items:
        if it.item_id is None:
            raise ValueError("an item must have its item_id before it is signed")
        messages.append(item_signing_input(sid, it.item_id, it.agent, it.kind, it.data))
    root, paths = tree([leaf(m) for m in messages])
    signer = signer.current()
    sig = signer.sign(BATCH_DOMAIN + root)
    return [msgspec.structs.replace(it, sig=f"{sig}.{b64(path)}", key_id=signer.key_id)
            for (_, it), path in zip(items, paths, strict=True)]


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """What tells a file changed (inode, mtime, size); zeros when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class KeyFile(Signer):
    """A signing key that follows its file (``CONVLOG_SIGNING_KEY``): ``convlog keys
    rotate`` writes the new seed to the same path, and the key signs from then on,
    looked at once a second at most (:meth:`current`), so a rotation needs no
    restart.  A file that cannot be read as a key is logged once and the key read
    before kept.

    Args:
        path: the seed file.
        accept: why a key (its id) may not sign, or ``None``: the log service
            takes only the keyring's live log key.  While the key in use is not
            accepted, or the file holds a key not taken yet, the file is read
            again at each look even if unchanged (the keyring may arrive after
            the key file).
        every: seconds between looks at the file.

    Raises:
        KeyringError: the file is unusable at the start.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 accept: Callable[[str], str | None] | None = None, every: float = 1.0) -> None:
        self.path = Path(path)
        self._stamp = file_stamp(self.path)
        first = Signer.load(self.path)
        self._kp, self.key_id = first._kp, first.key_id
        self._accept = accept
        self._every = every
        self._looked = time.monotonic()
        self._said: str | None = None
        self._pending = False  # the file changed, and its key does not sign yet: look again

    def current(self) -> Signer:
        now = time.monotonic()
        if now - self._looked < self._every:
            return self
        self._looked = now
        stamp = file_stamp(self.path)
        refused = self._accept is not None and self._accept(self.key_id) is not None
        if stamp == self._stamp and not refused and not self._pending:
            return self
        self._stamp = stamp
        self._pending = True  # until the file's key signs, or is the one in use
        try:
            new = Signer.load(self.path)
        except KeyringError as e:
            self._say(f"{e}; signing with {self.key_id[:12]}... still")
            return self
        why = self._accept(new.key_id) if self._accept is not None else None
        if why is not None:
            self._say(f"{self.path} holds {new.key_id[:12]}..., which may not sign: {why}")
            return self
        self._pending = False
        if new.key_id == self.key_id:
            return self
        _log.warning("signing key %s: %s... replaced by %s...", self.path, self.key_id[:12], new.key_id[:12])
        self._kp, self.key_id, self._said = new._kp, new.key_id, None
        return self

    def renewed(self, key_id: str | None) -> bool:
        self._looked = float("-inf")  # look now, not within the second
        return self.current().key_id != key_id

    def refused(self) -> str | None:
        key_id = self.current().key_id
        return self._accept(key_id) if self._accept is not None else None

    def _say(self, why: str) -> None:
        if why != self._said:  # once per cause
            self._said = why
            _log.error("signing key %s: %s", self.path, why)


def check_key_files(settings: Settings, *, named: Callable[[str], str]) -> None:
    """Read the signing key and the keyring ``settings`` name, at start-up: a file that is
    there but holds no key (or no keyring) was found only once NATS answered (``convlog
    log`` had started its nats-server, a worker waited out --start-wait and exited 3
    blaming NATS).

    Args:
        named: how a message names a setting (its flag, or its ``CONVLOG_*`` variable).

    Raises:
        ConfigError: one line naming the setting and the file.
    """
    for name, load in (("signing_key", Signer.load), ("keyring", Keyring.load)):
        path = getattr(settings, name)
        if path is None:
            continue
        try:
            load(path)
        except KeyringError as e:
            raise ConfigError(f"{named(name)}: {e}") from None


def write_private(path: Path, seed: bytes) -> None:
    """Write a seed file readable by its owner only (mode 0600), never overwriting."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(seed + b"\n")


def sign_head(signer: Signer, session_id: str, item_order: int, hash: str, signed_at: str) -> SignedHead:
    signer = signer.current()
    msg = head_signing_input(session_id, item_order, hash, signed_at)
    return SignedHead(
        session_id=session_id, item_order=item_order, hash=hash, signed_at=signed_at,
        key_id=signer.key_id, sig=signer.sign(msg),
    )


class KeyEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    key_id: str
    role: Role
    agent: str
    created_at: str
    retired_at: str | None = None


class _KeyringFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    convlog_keyring: int
    keys: list[KeyEntry]


#: The author each role's key stands for: what ``keys init`` writes, and what the checks
#: and ``keys rotate`` (which finds a role's live keys by it) rely on.
_ROLE_AUTHOR = {GATEWAY: USER_AGENT, LOG: LOG_AGENT}


def _role_mismatch(e: KeyEntry) -> str | None:
    """Why an entry's ``agent`` does not fit its ``role``, or ``None``.  An agent key named
    ``user`` signed user items the log service stored from the append subject (and every
    verifier then refused); a gateway or log key under another name was missed by ``keys
    rotate``, which added a successor and left that key live."""
    author = _ROLE_AUTHOR.get(e.role)
    if author is not None:
        return None if e.agent == author else f"a {e.role} key's agent is {author!r}, not {e.agent!r}"
    if e.agent in (USER_AGENT, SYSTEM_AGENT, LOG_AGENT):
        return (f"an agent key may not be named {e.agent!r} (the author of the gateway, of "
                "workers' notes or of the log service)")
    return None


class Keyring:
    """The public keys and what each may sign.

    Args:
        entries: the keyring's entries (a key id appears once).
    """

    def __init__(self, entries: Iterable[KeyEntry] = ()) -> None:
        self.entries: list[KeyEntry] = list(entries)
        self._by_id: dict[str, KeyEntry] = {}
        for e in self.entries:
            if _verify_key(e.key_id) is None:
                raise KeyringError(f"key id {e.key_id[:60]!r} is not an nkey user public key")
            if e.key_id in self._by_id:
                raise KeyringError(f"key id {e.key_id} appears twice")
            if (why := _role_mismatch(e)) is not None:
                raise KeyringError(f"key id {e.key_id}: {why}")
            if e.role == "agent" and not _TURN_AGENT.match(e.agent):
                # The spec's agent name pattern: the name goes unescaped into the NATS
                # subjects and comments of nats-users.conf (services/cli/nats_users.py),
                # where "a.>" or a quote and a newline would give the key wider rights.
                raise KeyringError(f"key id {e.key_id}: agent {e.agent[:70]!r} is not a name of 1 to "
                                   "64 letters, digits, '_' or '-' (as in the agents spec)")
            if _instant(e.created_at) is None:  # what `keys init`/`rotate` write; a hand edit's typo is said
                raise KeyringError(f"key id {e.key_id}: created_at {e.created_at[:40]!r} is not an "
                                   "RFC 3339 time with its offset (e.g. 2026-03-14T09:30:00Z)")
            if e.retired_at is not None and _instant(e.retired_at) is None:
                raise KeyringError(f"key id {e.key_id}: retired_at {e.retired_at[:40]!r} is not an "
                                   "RFC 3339 time with its offset (e.g. 2026-03-14T09:30:00Z)")
            self._by_id[e.key_id] = e

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a keyring file (``CONVLOG_KEYRING``).

        Raises:
            KeyringError: unreadable, not a keyring, or a bad entry; names the file.
        """
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise KeyringError(f"cannot read keyring {path}: {e.strerror or e}") from None
        try:
            doc = msgspec.json.decode(raw, type=_KeyringFile)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise KeyringError(f"keyring {path} is malformed: {e}") from None
        if doc.convlog_keyring != KEYRING_VERSION:
            raise KeyringError(f"keyring {path} has version {doc.convlog_keyring}, expected 1")
        try:
            return cls(doc.keys)
        except KeyringError as e:
            raise KeyringError(f"keyring {path}: {e}") from None

    def dumps(self) -> bytes:
        doc = _KeyringFile(convlog_keyring=KEYRING_VERSION, keys=self.entries)
        return msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n"

    def get(self, key_id: str) -> KeyEntry | None:
        return self._by_id.get(key_id)

    def of_role(self, role: str, agent: str | None = None) -> list[KeyEntry]:
        return [e for e in self.entries if e.role == role and (agent is None or e.agent == agent)]

    # -- what a key may sign ----------------------------------------------
    def refusal(
        self, key_id: str, agent: str, *, via_inbound: bool, at: str | None = None,
        item_id: str | None = None,
    ) -> str | None:
        """Why ``key_id`` may not sign an item authored by ``agent``, or ``None``.

        Args:
            via_inbound: the item enters through ``convlog.in`` (user messages).
            at: the item's ``created_at`` (offline checks); ``None`` means now,
                when a retired key may sign nothing.
            item_id: the item's id; a turn-derived id binds it to its agent's key.
        """
        e = self._by_id.get(key_id)
        if e is None:
            return f"key {key_id[:12]}... is not in the keyring"
        if e.retired_at is not None and (at is None or _after(at, e.retired_at)):
            return f"key {key_id[:12]}... of {e.agent!r} was retired at {e.retired_at}"
        if e.role == "agent":
            if not writes_as(e.agent, agent) or via_inbound:
                return f"key {key_id[:12]}... belongs to agent {e.agent!r}, not {agent!r}"
            if item_id is not None and (owner := turn_id_agent(item_id)) not in (None, e.agent):
                return f"item_id {item_id!r} belongs to a turn of {owner!r}, not of {e.agent!r}"
            return None
        if e.role == GATEWAY:
            if item_id is not None and (owner := turn_id_agent(item_id)) is not None:
                return f"item_id {item_id!r} belongs to a turn of {owner!r}, not to the gateway"
            if agent == USER_AGENT and via_inbound:
                return None
            return "the gateway key signs only user messages on the inbound subject"
        return "the log service's key signs session heads, not items"

    def log_key_refusal(self, key_id: str) -> str | None:
        """Why ``key_id`` is not this keyring's live log service key (the one that signs
        heads), or ``None``."""
        e = self.get(key_id)
        return None if e is not None and e.role == LOG and not e.retired_at else "not the keyring's live log service key"

    def check_envelope(self, env: Envelope, verified: VerifiedItems | None = None) -> str | None:
        """Offline: why a signed envelope does not verify, or ``None`` (unsigned -> ``None``).
        ``verified``: signatures checked before, not verified again."""
        if env.sig is None and env.key_id is None:
            return None
        if env.sig is None or env.key_id is None:
            return "carries only one of sig and key_id"
        via_inbound = env.agent == USER_AGENT
        reason = self.refusal(env.key_id, env.agent, via_inbound=via_inbound, at=env.created_at,
                              item_id=env.item_id)
        if reason is not None:
            return reason
        msg = item_signing_input(env.session_id, env.item_id, env.agent, env.kind, env.data)
        if not (verified.verify if verified is not None else verify_item)(env.key_id, msg, env.sig):
            return f"signature by {env.key_id[:12]}... does not match the item"
        return None

    def check_head(self, head: SignedHead) -> str | None:
        """Why a signed head does not verify under this keyring, or ``None``."""
        e = self._by_id.get(head.key_id)
        if e is None or e.role != LOG:
            return f"head signed by {head.key_id[:12]}..., not a log service key of the keyring"
        if e.retired_at is not None and _after(head.signed_at, e.retired_at):
            return f"head signed at {head.signed_at} by a key retired at {e.retired_at}"
        if not verify_head(head):
            return "the head's signature does not match it"
        return None


class LiveKeyring(Keyring):
    """A keyring file that running processes follow: read again when it changes
    (looked at, at most, every ``every`` seconds, when a key is asked for), so a
    ``convlog keys rotate`` takes effect without a restart -- the retired key's new
    signatures refused, the new key's accepted.  A file that cannot be read as a
    keyring is logged and the keys read before are kept.

    Raises:
        KeyringError: the file is unusable at the start.
    """

    def __init__(self, path: str | os.PathLike[str], *, every: float = 1.0) -> None:
        self.path = Path(path)
        self.every = every
        self._stamp = self._stat()
        super().__init__(Keyring.load(self.path).entries)
        self._checked = time.monotonic()
        self._bad: tuple[int, int, int] | None = None  # the stamp of a file last found unusable

    def _stat(self) -> tuple[int, int, int]:
        return file_stamp(self.path)

    def _fresh(self, key_id: str | None = None) -> None:
        """Read the file again if it changed: looked at once every ``every`` seconds, and at
        once for a ``key_id`` not known yet (a rotation's new key, signing already)."""
        now = time.monotonic()
        if now - self._checked < self.every and (key_id is None or key_id in self._by_id):
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp or stamp == self._bad:  # unchanged, or the same unusable file
            return
        try:
            ring = Keyring.load(self.path)
        except KeyringError as e:
            if stamp != self._bad:  # said once per version of the file
                self._bad = stamp
                _log.error("keyring %s changed but cannot be used (%s); keeping the keys read before", self.path, e)
            return
        self._stamp, self.entries, self._by_id = stamp, ring.entries, ring._by_id
        _log.warning("keyring %s read again: %d keys (%d retired)", self.path, len(ring.entries),
                     sum(1 for e in ring.entries if e.retired_at is not None))

    def get(self, key_id: str) -> KeyEntry | None:
        self._fresh(key_id)
        return super().get(key_id)

    def of_role(self, role: str, agent: str | None = None) -> list[KeyEntry]:
        self._fresh()
        return super().of_role(role, agent)

    def refusal(
        self, key_id: str, agent: str, *, via_inbound: bool, at: str | None = None,
        item_id: str | None = None,
    ) -> str | None:
        self._fresh(key_id)
        return super().refusal(key_id, agent, via_inbound=via_inbound, at=at, item_id=item_id)

    def check_head(self, head: SignedHead) -> str | None:
        self._fresh(head.key_id)
        return super().check_head(head)


def verify_head(head: SignedHead) -> bool:
    """The signature of a head under its own key id (binding checked by :class:`Keyring`)."""
    msg = head_signing_input(head.session_id, head.item_order, head.hash, head.signed_at)
    return verify_signature(head.key_id, msg, head.sig)
