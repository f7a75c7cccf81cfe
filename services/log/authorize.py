"""Who may write what: the log service's signature check, before any commit.

Every signed item is checked against the keyring (its key may sign for that
author, and the signature covers this session, this ``item_id`` and this
content); any failure refuses the whole request with ``forbidden`` and nothing
of it is written.  With ``require_signatures`` unsigned items are refused too,
and so is any ``agent: "user"`` item on the append subject: user items enter
only through ``convlog.in`` (signed by the user gateway's key).  Without a
keyring and without ``require_signatures`` the service runs unsigned, as
before; a signature it cannot check is refused, never stored unchecked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from shared.chain import GENESIS_HASH
from shared.config import ConfigError, Settings
from shared.errors import ForbiddenError
from shared.messages import AppendItem, AppendRequest, SignedHead
from shared.signing import (
    USER_AGENT,
    KeyFile,
    Keyring,
    KeyringError,
    LiveKeyring,
    Signer,
    item_signing_input,
    route_signing_input,
    sign_head,
    verify_item,
    verify_signature,
)

from .store.base import LogStore
from .store.ordering import now_rfc3339

_Last = msgspec.json.Decoder(type=dict)
__all__ = ["Authorizer", "authorizer_from", "head_signer_from", "signed_head"]


@dataclass(frozen=True)
class Authorizer:
    """Args:
    keyring: the public keyring, or ``None`` (then no signature can be checked).
    require: refuse unsigned items and user items on the append subject.
    """

    keyring: Keyring | None = None
    require: bool = False

    def check_append(self, sid: str, req: AppendRequest) -> None:
        """Every rule and every signature. Raises: ForbiddenError naming the item and the reason."""
        if self.precheck(sid, req):
            self.verify_signatures(sid, req)

    def precheck(self, sid: str, req: AppendRequest) -> bool:
        """The rules without the cryptography (cheap, on the event loop).

        Returns:
            Whether some item carries a signature that :meth:`verify_signatures`
            must still check.

        Raises:
            ForbiddenError: naming the item and the reason.
        """
        signed = False
        for i, it in enumerate(req.items):
            if self.require and it.agent == USER_AGENT:
                raise ForbiddenError(
                    f"item {i}: agent 'user' items enter only through the inbound subject "
                    "(convlog.in), not the append subject"
                )
            signed = self._rules(i, it, via_inbound=False) or signed
        return signed

    def verify_signatures(self, sid: str, req: AppendRequest) -> None:
        """The cryptography alone, after :meth:`precheck` (thread-safe: it
        releases the GIL while libsodium works). Raises: ForbiddenError."""
        for i, it in enumerate(req.items):
            self._verify(sid, i, it)

    def check_user(self, sid: str, item: AppendItem) -> None:
        """A user message, as the item it becomes. Raises: ForbiddenError."""
        if self._rules(0, item, via_inbound=True):
            self._verify(sid, 0, item)

    def check_route(self, sid: str, item: AppendItem, to: str | None, to_sig: str | None) -> None:
        """The ``to`` of a user message (after :meth:`check_user`): a signed message
        must sign its ``to`` too (``to_sig``, same key), so an edited ``to`` is refused.

        Raises:
            ForbiddenError: naming what is wrong.
        """
        if to is None:
            if to_sig is not None:
                raise ForbiddenError("to_sig without a to")
            return
        if item.sig is None or item.key_id is None or item.item_id is None:
            if to_sig is not None:
                raise ForbiddenError("to_sig on an unsigned message")
            return  # unsigned and allowed (check_user refuses it when signatures are required)
        if to_sig is None:
            raise ForbiddenError("a signed message with a to must sign it too (to_sig)")
        if not verify_signature(item.key_id, route_signing_input(sid, item.item_id, to), to_sig):
            raise ForbiddenError("to_sig does not match this session, item_id and to")

    def _rules(self, i: int, it: AppendItem, *, via_inbound: bool) -> bool:
        if it.sig is None and it.key_id is None:
            if self.require:
                raise ForbiddenError(f"item {i}: unsigned, and this log service requires signatures")
            return False
        if it.sig is None or it.key_id is None:
            raise ForbiddenError(f"item {i}: a signed item needs both sig and key_id")
        if self.keyring is None:
            raise ForbiddenError(
                f"item {i}: signed, but this log service has no keyring (CONVLOG_KEYRING) to check it"
            )
        if it.item_id is None:
            raise ForbiddenError(f"item {i}: a signed item needs the item_id it was signed with")
        reason = self.keyring.refusal(it.key_id, it.agent, via_inbound=via_inbound, item_id=it.item_id)
        if reason is not None:
            raise ForbiddenError(f"item {i}: {reason}")
        return True

    @staticmethod
    def _verify(sid: str, i: int, it: AppendItem) -> None:
        if it.sig is None or it.key_id is None or it.item_id is None:
            return
        msg = item_signing_input(sid, it.item_id, it.agent, it.kind, it.data)
        if not verify_item(it.key_id, msg, it.sig):
            raise ForbiddenError(
                f"item {i}: the signature does not match this session, item_id and content"
            )


def _variable(name: str) -> str:
    return f"CONVLOG_{name.upper()}"


def authorizer_from(settings: Settings, *, named: Callable[[str], str] = _variable) -> Authorizer:
    """The service's checks from ``keyring``/``require_signatures`` (with
    neither, unsigned items pass and signed ones are refused: nobody can check them).

    Args:
        named: how a message names a setting (``convlog log`` passes its flag
            when the command line gave it; by default its ``CONVLOG_*`` variable).

    Raises:
        ConfigError: signatures are required but no keyring is set, or the
            keyring file is unusable (naming the setting and the file).
    """
    if settings.require_signatures and settings.keyring is None:
        ways = "CONVLOG_KEYRING" if named is _variable else "--keyring or CONVLOG_KEYRING"
        raise ConfigError(f"{named('require_signatures')} needs a keyring ({ways}, the public keyring file)")
    if settings.keyring is None:
        return Authorizer()
    try:
        keyring = LiveKeyring(settings.keyring)  # a rotation takes effect without a restart
    except KeyringError as e:
        raise ConfigError(f"{named('keyring')}: {e}") from None
    return Authorizer(keyring, settings.require_signatures)


def head_signer_from(settings: Settings, keyring: Keyring | None) -> Signer | None:
    """The log service's own key (``CONVLOG_SIGNING_KEY``), which signs heads: a
    :class:`~shared.signing.KeyFile`, so ``convlog keys rotate log`` needs no
    restart (with a keyring, only the keyring's live log key takes over: heads
    signed by a retired key would not verify).

    Raises:
        ConfigError: unreadable, or not the keyring's live ``log`` key.
    """
    if settings.signing_key is None:
        return None

    try:
        signer = KeyFile(settings.signing_key, accept=keyring.log_key_refusal if keyring is not None else None)
    except KeyringError as e:
        raise ConfigError(f"CONVLOG_SIGNING_KEY: {e}") from None
    if keyring is not None and keyring.log_key_refusal(signer.key_id) is not None:
        raise ConfigError(
            f"CONVLOG_SIGNING_KEY {settings.signing_key} is not the live log service key of "
            f"{settings.keyring}"
        )
    return signer


async def signed_head(store: LogStore, signer: Signer, sid: str) -> SignedHead:
    """The session's head as of now, signed: its last order and hash (works on any store)."""
    page = await store.tail(sid, 1, visible=False)
    order, hash_ = 0, GENESIS_HASH
    if page.items:
        last = _Last.decode(page.items[-1])
        order, hash_ = int(last["item_order"]), str(last["hash"])
    return sign_head(signer, sid, order, hash_, now_rfc3339())
