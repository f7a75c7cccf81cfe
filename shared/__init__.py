"""convlog's contract: wire messages, subjects, hash chain, config and client.

Everything other programs need to talk to convlog lives here; no service logic.
``ConvlogSession`` (the OpenAI Agents SDK adapter) is exported lazily, so
``import shared`` never imports the optional ``agents`` package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ConvlogSession", "__version__"]

if TYPE_CHECKING:  # pragma: no cover - types only
    from .agents_session import ConvlogSession


def __getattr__(name: str) -> Any:
    if name == "ConvlogSession":
        from .agents_session import ConvlogSession

        globals()[name] = ConvlogSession
        return ConvlogSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
