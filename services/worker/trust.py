"""A worker acts only on what the log holds, signed by whom it claims.

Anyone allowed to publish on ``convlog.items.<sid>`` (a loose NATS
configuration, a stolen credential) could feed workers a forged envelope.  So
before a worker plays a part for an envelope (a user message, a handoff to
it), it reads that order back from the log service and refuses the envelope
unless the log holds exactly it (same hash: the log wins); with a keyring it
also checks the signature, and with ``require_signatures`` refuses unsigned
ones.  A refused envelope never reaches a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.client import LogClient
from shared.config import ConfigError, Settings
from shared.messages import Envelope
from shared.signing import Keyring, KeyringError

__all__ = ["EnvelopeGate"]


@dataclass
class EnvelopeGate:
    """Args:
    client: reads the log.
    keyring: checks signatures when set.
    require: refuse unsigned envelopes.
    """

    client: LogClient
    keyring: Keyring | None = None
    require: bool = False

    @classmethod
    def from_settings(cls, client: LogClient, settings: Settings) -> EnvelopeGate:
        """Raises: ConfigError: the keyring cannot be read, or is required and missing."""
        if settings.require_signatures and settings.keyring is None:
            raise ConfigError("CONVLOG_REQUIRE_SIGNATURES needs CONVLOG_KEYRING (the public keyring file)")
        try:
            keyring = Keyring.load(settings.keyring) if settings.keyring else None
        except KeyringError as e:
            raise ConfigError(f"CONVLOG_KEYRING: {e}") from None
        return cls(client, keyring, settings.require_signatures)

    def signature_refusal(self, env: Envelope) -> str | None:
        """Why ``env`` (as the log holds it) must not be acted on for its signature, or ``None``."""
        if self.keyring is not None and (reason := self.keyring.check_envelope(env)) is not None:
            return f"bad signature: {reason}"
        if self.require and env.sig is None:
            return "unsigned, and signatures are required"
        return None

    async def refusal(self, env: Envelope) -> str | None:
        """Why the worker must not act on ``env``, or ``None``.

        Raises:
            ConvlogError: the log could not be read (the caller retries later).
        """
        if (why := self.signature_refusal(env)) is not None:
            return why
        page = await self.client.read(env.session_id, after=env.item_order - 1, limit=1, raw=True)
        held = page.items[0] if page.items else None
        if held is None or held.item_order != env.item_order or held.hash != env.hash:
            return (f"the log does not hold this envelope at item_order {env.item_order} "
                    "(forged or altered on the items subject)")
        return None
