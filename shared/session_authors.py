"""Who wrote an item: the authors ``ConvlogSession`` records for the SDK's items.

Every envelope records an ``agent``.  Items with ``role`` ``user`` are
written as ``"user"``; ``system``/``developer`` messages as ``"system"``;
everything else as the *current agent*.  The SDK's session calls carry no
agent (the ``wrapper`` keyword passes the run's ``RunContextWrapper``, which
holds the user's context and usage, not the agent), so the current agent
comes from :meth:`AuthorTracking.hooks`: pass ``hooks=session.hooks()`` to
``Runner.run`` and the session learns each agent as it starts, per run (runs
are told apart by the ``wrapper`` the Runner passes).  A call without a
wrapper (a session wrapping this one, such as the SDK's
``OpenAIResponsesCompactionSession``, passes none) gets the agent the hooks
named last.  Without hooks the author is the ``agent`` given to the session
(default ``"assistant"``).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .agents_sdk import hooks_class, run_key

if TYPE_CHECKING:  # pragma: no cover - types only
    from agents import RunHooks

__all__ = ["AuthorTracking"]


class AuthorTracking:
    """The author bookkeeping of a session (mixed into ``ConvlogSession``)."""

    default_agent: str

    def __init__(self, default_agent: str) -> None:
        self.default_agent = default_agent
        self._current_agent: str | None = None
        self._run_agents: dict[int, str] = {}
        self._last_run_agent: str | None = None  # for calls that carry no wrapper
        self._hooks: Any = None

    def hooks(self) -> RunHooks[Any]:
        """``RunHooks`` that tell this session which agent is running.

        Pass them to ``Runner.run(..., hooks=session.hooks())``.  The current
        agent is set on ``on_agent_start`` (and again on ``on_llm_start`` and
        ``on_tool_start``: a run resumed after an approval runs the approved
        tool and saves its output before any agent starts), per run.  It deliberately does *not* switch on ``on_handoff``: the SDK fires
        that hook before it saves the handoff's ``function_call`` and
        ``function_call_output``, which belong to the agent handing off (as the
        SDK's own ``HandoffOutputItem`` says); the target becomes current when
        it starts.

        Raises:
            ImportError: the Agents SDK is missing.
        """
        if self._hooks is None:
            self._hooks = hooks_class()(self)
        return self._hooks

    def set_current_agent(self, agent: str, *, context: Any = None) -> None:
        """Record ``agent`` as the author of the next non-user items.

        Args:
            agent: the agent's name.
            context: the run's ``RunContextWrapper`` (or a hook context of the
                same run): the name then applies to that run only.  Without it
                the name applies to every call that has no run-specific name.
        """
        if context is None:
            self._current_agent = agent
            self._last_run_agent = None
            return
        key_obj = run_key(context)
        key = id(key_obj)
        if key not in self._run_agents:
            try:  # forget the run when the SDK drops it
                weakref.finalize(key_obj, self._run_agents.pop, key, None)
            except TypeError:
                self._current_agent = agent
                return
        self._run_agents[key] = agent
        self._last_run_agent = agent

    def _agent_for(self, wrapper: Any) -> str:
        if wrapper is not None:
            name = self._run_agents.get(id(run_key(wrapper)))
            if name:
                return name
        elif self._last_run_agent is not None:  # e.g. through OpenAIResponsesCompactionSession
            return self._last_run_agent
        return self._current_agent or self.default_agent

    @staticmethod
    def _author(data: Mapping[str, Any], agent: str) -> str:
        role = data.get("role")
        if role == "user":
            return "user"
        if role in ("system", "developer"):
            return "system"
        return agent
