"""What ``ConvlogSession`` takes from the OpenAI Agents SDK, imported only when used.

The install hint, ``SessionSettings`` coercion, the agent-tracking ``RunHooks``,
and the small helpers the adapter's mutations share (finish a started
append despite cancellation, plain item dicts, the canonical bytes a retry is
recognised by).  Nothing here imports ``agents`` at module import.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from .codec import check_json, unencodable

__all__ = [
    "INSTALL_HINT", "canonical", "coerce_settings", "compaction_snapshot_type", "finish", "hooks_class", "plain",
    "require_agents_sdk", "run_key", "settle",
]

INSTALL_HINT = "pip install 'convlog[agents]'"
"""The command that installs the optional OpenAI Agents SDK dependency."""

_T = TypeVar("_T")


def require_agents_sdk() -> Any:
    """Import and return ``agents`` or raise an ``ImportError`` naming the install command."""
    try:
        import agents
    except ImportError as e:
        raise ImportError(
            "ConvlogSession needs the OpenAI Agents SDK (the `openai-agents` package); "
            f"install it with: {INSTALL_HINT}"
        ) from e
    return agents


def compaction_snapshot_type() -> Any:
    """The SDK's ``_CompactionSnapshot`` (a private name of openai-agents <0.25, the one
    place convlog takes it), or ``None`` when this SDK has none: the session then offers
    no snapshot and the SDK reads the history through ``get_items`` (its unchecked
    replacement, as for a store without the hook)."""
    try:
        from agents.memory.session import _CompactionSnapshot
    except ImportError:
        return None
    return _CompactionSnapshot


def coerce_settings(value: Any) -> Any:
    """``SessionSettings`` from ``None`` (the default), a mapping, or an instance."""
    agents = require_agents_sdk()
    try:
        from agents.memory import SessionSettings
    except ImportError as e:  # SessionSettings arrived in openai-agents 0.8
        raise ImportError(
            "ConvlogSession needs openai-agents>=0.8 (SessionSettings); found "
            f"{getattr(agents, '__version__', 'an older version')}: pip install -U 'convlog[agents]'"
        ) from e

    if value is None:
        return SessionSettings()
    if isinstance(value, SessionSettings):
        return value
    try:
        from agents.memory.session_settings import coerce_session_settings
    except ImportError:  # older SDKs: plain keyword construction
        if isinstance(value, Mapping):
            return SessionSettings(**value)
        raise TypeError(
            f"session_settings must be SessionSettings or a dict, not {value!r}"
        ) from None
    return coerce_session_settings(value)


def tracked(method: Any) -> Any:
    """Count a mutation as in flight on its session (``_busy``) until it ends,
    so ``close()`` waits for it before it lets the connection go."""

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        done = asyncio.get_running_loop().create_future()
        self._busy.add(done)
        try:
            return await method(self, *args, **kwargs)
        finally:
            self._busy.discard(done)
            done.set_result(None)

    return wrapper


async def finish(awaitable: Awaitable[_T]) -> _T:
    """Await a mutation to its outcome even if the caller is cancelled, then re-raise.

    A cancelled caller must not leave an append whose outcome nobody knows; the
    append finishes (or fails) first and the cancellation is raised after.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as e:
            cancelled = cancelled or e
    if cancelled is not None:
        failure = None if task.cancelled() else task.exception()  # retrieved, and chained
        raise cancelled from failure
    return task.result()


async def settle(fut: asyncio.Future[_T]) -> _T:
    """Await a future someone else resolves, to its outcome even if the caller is
    cancelled, then re-raise the cancellation (:func:`finish` without a task:
    the work already runs elsewhere, here the append queue's sender)."""
    cancelled: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError as e:
            if fut.cancelled():
                raise
            cancelled = cancelled or e
        except BaseException:
            break  # the future's own failure: raised below (or behind the cancellation)
    if cancelled is not None:
        failure = None if fut.cancelled() else fut.exception()  # retrieved, and chained
        raise cancelled from failure
    return fut.result()


def plain(item: Any) -> dict[str, Any]:
    """The JSON object the SDK means by an input item (dicts pass through)."""
    if isinstance(item, Mapping):
        return dict(item)
    dump = getattr(item, "model_dump", None)
    if callable(dump):
        return dump(exclude_unset=True, mode="json")
    raise TypeError(
        f"a session item must be a dict (a Responses input item), not {type(item).__name__}"
    )


def canonical(items: Sequence[Mapping[str, Any]]) -> bytes:
    """The items as JSON with sorted keys: equal content, equal bytes (the retry fingerprint).

    Raises:
        BadRequestError: an item holds text with a lone surrogate or an object
            key that is not a string, or nests past msgspec's limit, named as
            the append would name it (``$.items[0].data.content``).
    """
    try:
        return msgspec.json.encode(list(items), order="sorted", enc_hook=str)
    except (TypeError, UnicodeEncodeError, RecursionError) as e:  # RecursionError: ~1000 levels deep
        for i, item in enumerate(items):
            check_json(item, f"$.items[{i}].data")  # raises for the nesting, as an append would
        raise unencodable({"items": [{"data": i} for i in items]}, "$", e) from e


def run_key(context: Any) -> Any:
    """The object that identifies one Runner run across hooks and session calls.

    The SDK builds a fresh hook context for ``on_agent_start`` but hands it the
    run's own ``usage`` object, and passes the run's wrapper (same ``usage``)
    to the session, so ``usage`` is the shared identity.
    """
    usage = getattr(context, "usage", None)
    return usage if usage is not None else context


_HOOKS_CLASS: type | None = None


def hooks_class() -> type:
    """Build (once) the ``RunHooks`` subclass; the SDK is imported only here."""
    global _HOOKS_CLASS
    if _HOOKS_CLASS is not None:
        return _HOOKS_CLASS
    agents = require_agents_sdk()

    class AgentTrackingHooks(agents.RunHooks):  # type: ignore[misc,name-defined]
        """Tell a :class:`ConvlogSession` which agent each run is executing."""

        def __init__(self, session: Any) -> None:  # a ConvlogSession
            self.session = session

        async def on_agent_start(self, context: Any, agent: Any) -> None:
            self.session.set_current_agent(agent.name, context=context)

        async def on_llm_start(self, context: Any, agent: Any, *args: Any, **kwargs: Any) -> None:
            self.session.set_current_agent(agent.name, context=context)

        async def on_tool_start(self, context: Any, agent: Any, *args: Any, **kwargs: Any) -> None:
            # A resumed run (an approved tool after an interruption) runs the tool
            # and saves its output before any agent or LLM start of that run.
            self.session.set_current_agent(agent.name, context=context)

    _HOOKS_CLASS = AgentTrackingHooks
    return AgentTrackingHooks
