"""A worker acts only on what the log holds, signed by whom it claims.

Anyone allowed to publish on ``convlog.items.<sid>`` (a loose NATS
configuration, a stolen credential) could feed workers a forged envelope.  So
before a worker plays a part for an envelope (a user message, a handoff to
it), it reads that order back from the log service and refuses the envelope
unless the log holds exactly it (same hash: the log wins); with a keyring it
also checks the signature, and with ``require_signatures`` refuses unsigned
ones.  A refused envelope never reaches a model.

Turn-derived ids (``<turn>.<Agent>.<step>.<role>``) are predictable, so the
log service binds them to ``<Agent>``'s key when items are signed.  Under a
looser configuration (signatures not required) someone could still write an
item under an agent's id first -- a reply that would end the turn, or text the
model would take as the agent's own.  :meth:`EnvelopeGate.forged` tells such
an item from the agent's own: its author is another agent, or its signature
is not one of that agent's keys (with a keyring), or it is unsigned where this
worker's own items are always signed by its key.
The turn logs it loudly, skips it (the turn is not done; its step number is
taken) and keeps it out of every model input; one under the id of a committed
call's output (the output can then never be stored) ends the turn with a
``system`` item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.client import LogClient
from shared.config import ConfigError, Settings
from shared.messages import Envelope
from shared.signing import (
    Keyring,
    KeyringError,
    LiveKeyring,
    VerifiedItems,
    turn_id_agent,
    writes_as,
)

__all__ = ["EnvelopeGate"]


@dataclass
class EnvelopeGate:
    """Args:
    client: the worker's client (its signer's key is the worker's own).
    keyring: checks signatures when set.
    require: refuse unsigned envelopes.
    agent: the worker's agent, and own_key its signing key id (``None``: it does not sign).
    """

    client: LogClient
    keyring: Keyring | None = None
    require: bool = False
    agent: str | None = None
    own_key: str | None = None
    #: signatures verified already: a turn checks its whole window on every read
    verified: VerifiedItems = field(default_factory=VerifiedItems, repr=False)

    @classmethod
    def from_settings(cls, client: LogClient, settings: Settings, agent: str | None = None) -> EnvelopeGate:
        """Raises: ConfigError: the keyring cannot be read, or is required and missing."""
        if settings.require_signatures and settings.keyring is None:
            raise ConfigError("CONVLOG_REQUIRE_SIGNATURES needs CONVLOG_KEYRING (the public keyring file)")
        try:
            keyring = LiveKeyring(settings.keyring) if settings.keyring else None  # follows rotations
        except KeyringError as e:
            raise ConfigError(f"CONVLOG_KEYRING: {e}") from None
        own = client.signer.key_id if client.signer is not None else None
        return cls(client, keyring, settings.require_signatures, agent, own)

    def signature_refusal(self, env: Envelope) -> str | None:
        """Why ``env`` (as the log holds it) must not be acted on for its signature, or ``None``."""
        if self.keyring is not None and (reason := self.keyring.check_envelope(env, self.verified)) is not None:
            return f"bad signature: {reason}"
        if self.require and env.sig is None:
            return "unsigned, and signatures are required"
        return None

    def forged(self, env: Envelope) -> str | None:
        """Why an item under a turn-derived id was not written by the agent the id
        names, or ``None`` (not a turn id, genuine, or nothing to tell it by)."""
        owner = turn_id_agent(env.item_id)
        if owner is None:
            return None
        if not writes_as(owner, env.agent):
            return f"written as {env.agent!r} under {owner!r}'s turn id"
        mine = owner == self.agent and self.own_key is not None  # our items carry our signature
        if env.sig is None or env.key_id is None:
            return f"unsigned under {owner!r}'s turn id" if self.require or mine else None
        if self.keyring is not None:
            reason = self.keyring.check_envelope(env, self.verified)
            return f"bad signature: {reason}" if reason is not None else None
        # Without a keyring a signature is taken as the log service checked it (it refuses
        # a signature it cannot check, and binds turn ids to their agent's key).
        return None
