"""convlog's contract: wire messages, subjects, hash chain, config and client.

Everything other programs need to talk to convlog lives here; no service logic.
"""

from __future__ import annotations

__version__ = "0.1.0"
