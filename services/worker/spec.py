"""Agent specs: an agents TOML file parsed into frozen, validated dataclasses.

A spec file declares the session's default entry agent and every agent of the
system::

    entry = "Triage"

    [defaults]                      # optional
    model = "gpt-4o-mini"
    history_limit = 50

    [[agents]]
    name = "Triage"
    instructions = "Greet the user and understand their issue. ..."
    model = "gpt-4o-mini"           # optional, falls back to [defaults]
    history_limit = 50              # optional, falls back to [defaults], then 50

    [[agents.handoffs]]
    target = "L1Billing"
    tool_name = "route_to_billing"                 # optional: transfer_to_<target>
    tool_description = "Route to billing support"  # optional

    [[agents.tools]]                # or: tools = ["package.module:function", ...]
    import_path = "services.worker.support_tools:issue_refund"
    name = "issue_refund"           # optional: the function's name
    description = "..."             # optional: the docstring's first line

Every problem is reported as a :class:`SpecError` whose message names the file,
the agent and the problem, so a bad deploy fails at startup with one clear line.
Unknown keys are refused: a typo such as ``histroy_limit`` must not be ignored.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .toolschema import ToolSchemaError, describe_callable, import_callable

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "DEFAULT_MODEL",
    "AgentSpec",
    "HandoffSpec",
    "SpecError",
    "SystemSpec",
    "ToolSpec",
    "load_spec",
    "parse_spec",
]

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_HISTORY_LIMIT = 50

# Chat Completions function names: letters, digits, underscore, dash; at most 64.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Agent names become NATS subject tokens and KV values: keep them token-safe.
_AGENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_TOP_KEYS = {"entry", "defaults", "agents"}
_DEFAULT_KEYS = {"model", "history_limit"}
_AGENT_KEYS = {"name", "instructions", "model", "history_limit", "handoffs", "tools"}
_HANDOFF_KEYS = {"target", "tool_name", "tool_description"}
_TOOL_KEYS = {"import_path", "name", "description"}


class SpecError(ValueError):
    """An agents spec is malformed.

    Attributes:
        source: the file (or ``<string>``) the spec came from.
        agent: the agent the problem belongs to, or ``None`` for file-level problems.
        problem: the problem, without the location prefix.
    """

    def __init__(self, source: str, agent: str | None, problem: str) -> None:
        where = f"{source}: agent {agent!r}: " if agent is not None else f"{source}: "
        super().__init__(where + problem)
        self.source = source
        self.agent = agent
        self.problem = problem


@dataclass(frozen=True, slots=True)
class HandoffSpec:
    """A handoff offered to the model as a tool with no parameters.

    Attributes:
        target: the agent that continues the turn when the tool is called.
        tool_name: the function name the model calls (``route_to_billing``).
        tool_description: the description shown to the model.
    """

    target: str
    tool_name: str
    tool_description: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function tool: an importable Python callable, sync or async.

    Attributes:
        import_path: ``package.module:function``.
        name: the function name the model calls.
        description: the description shown to the model.
        parameters_json_schema: JSON schema (``type: object``) of the keyword arguments.
        fn: the callable itself; call it with the decoded JSON arguments as keywords.
    """

    import_path: str
    name: str
    description: str
    parameters_json_schema: dict[str, Any]
    fn: Any


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One agent of the system.

    Attributes:
        name: unique agent name, also the ``agent`` field of the items it writes.
        instructions: the agent's system prompt.
        model: the model name sent to the Chat Completions endpoint.
        history_limit: at most this many visible items are sent per model call.
        handoffs: handoffs this agent may perform, in spec order.
        tools: function tools this agent may call, in spec order.
    """

    name: str
    instructions: str
    model: str = DEFAULT_MODEL
    history_limit: int = DEFAULT_HISTORY_LIMIT
    handoffs: tuple[HandoffSpec, ...] = ()
    tools: tuple[ToolSpec, ...] = ()

    def handoff_for(self, tool_name: str) -> HandoffSpec | None:
        """Return the handoff whose tool is ``tool_name``, or ``None``."""
        return next((h for h in self.handoffs if h.tool_name == tool_name), None)

    def tool_for(self, tool_name: str) -> ToolSpec | None:
        """Return the function tool named ``tool_name``, or ``None``."""
        return next((t for t in self.tools if t.name == tool_name), None)


@dataclass(frozen=True, slots=True)
class SystemSpec:
    """A whole agent system.

    Attributes:
        entry: the default entry agent of a new session.
        agents: every agent by name, in spec order.
    """

    entry: str
    agents: dict[str, AgentSpec]

    def agent(self, name: str) -> AgentSpec:
        """Return the agent called ``name``.

        Raises:
            KeyError: no such agent; the message lists the known ones.
        """
        try:
            return self.agents[name]
        except KeyError:
            raise KeyError(f"unknown agent {name!r}; known: {', '.join(self.agents)}") from None


def load_spec(path: str | os.PathLike[str]) -> SystemSpec:
    """Read, parse and validate an agents TOML file.

    Raises:
        SpecError: the file is missing, not TOML, or breaks a rule; the message
            names the file, the agent and the problem.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(source, None, f"cannot read spec file: {e.strerror or e}") from e
    return parse_spec(text, source=source)


def parse_spec(text: str, *, source: str = "<string>") -> SystemSpec:
    """Parse and validate agents TOML given as text.

    Args:
        text: the TOML document.
        source: how to name the document in error messages.

    Raises:
        SpecError: as for :func:`load_spec`.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(source, None, f"not valid TOML: {e}") from e
    return _build_system(doc, source)


def _build_system(doc: Mapping[str, Any], source: str) -> SystemSpec:
    _refuse_unknown(doc, _TOP_KEYS, source, None, "top level")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SpecError(source, None, "[defaults] must be a table")
    _refuse_unknown(defaults, _DEFAULT_KEYS, source, None, "[defaults]")
    default_model = _string(defaults.get("model", DEFAULT_MODEL), source, None, "defaults.model")
    default_limit = _history_limit(
        defaults.get("history_limit", DEFAULT_HISTORY_LIMIT), source, None
    )

    raw_agents = doc.get("agents")
    if not isinstance(raw_agents, list) or not raw_agents:
        raise SpecError(source, None, "no agents defined: add at least one [[agents]] table")
    agents: dict[str, AgentSpec] = {}
    for index, raw in enumerate(raw_agents):
        agent = _build_agent(raw, index, source, default_model, default_limit)
        if agent.name in agents:
            raise SpecError(source, agent.name, "duplicate agent name")
        agents[agent.name] = agent

    for agent in agents.values():
        for handoff in agent.handoffs:
            if handoff.target not in agents:
                raise SpecError(
                    source,
                    agent.name,
                    f"handoff {handoff.tool_name!r} targets unknown agent {handoff.target!r}"
                    f" (defined: {', '.join(agents)})",
                )

    if "entry" not in doc:
        raise SpecError(source, None, "missing 'entry' (the default entry agent)")
    entry = _string(doc["entry"], source, None, "entry")
    if entry not in agents:
        raise SpecError(
            source, None, f"entry agent {entry!r} is not defined (defined: {', '.join(agents)})"
        )
    return SystemSpec(entry=entry, agents=agents)


def _build_agent(
    raw: Any, index: int, source: str, default_model: str, default_limit: int
) -> AgentSpec:
    if not isinstance(raw, dict):
        raise SpecError(source, None, f"agents[{index}] must be a table")
    if "name" not in raw:
        raise SpecError(source, None, f"agents[{index}] has no 'name'")
    name = _string(raw["name"], source, None, f"agents[{index}].name")
    if not _AGENT_NAME.match(name):
        raise SpecError(source, name, "agent names must match [A-Za-z0-9_-]{1,64}")
    _refuse_unknown(raw, _AGENT_KEYS, source, name, "agent table")

    instructions = raw.get("instructions")
    if instructions is None or (isinstance(instructions, str) and not instructions.strip()):
        raise SpecError(source, name, "missing instructions")
    instructions = _string(instructions, source, name, "instructions").strip()
    model = _string(raw.get("model", default_model), source, name, "model")
    history_limit = _history_limit(raw.get("history_limit", default_limit), source, name)

    handoffs = tuple(
        _build_handoff(h, i, source, name)
        for i, h in enumerate(_list(raw, "handoffs", source, name))
    )
    tools = tuple(
        _build_tool(t, i, source, name) for i, t in enumerate(_list(raw, "tools", source, name))
    )
    seen: set[str] = set()
    for tool_name in [h.tool_name for h in handoffs] + [t.name for t in tools]:
        if tool_name in seen:
            raise SpecError(source, name, f"duplicate tool name {tool_name!r}")
        seen.add(tool_name)
    return AgentSpec(
        name=name,
        instructions=instructions,
        model=model,
        history_limit=history_limit,
        handoffs=handoffs,
        tools=tools,
    )


def _build_handoff(raw: Any, index: int, source: str, agent: str) -> HandoffSpec:
    if not isinstance(raw, dict):
        raise SpecError(source, agent, f"handoffs[{index}] must be a table")
    _refuse_unknown(raw, _HANDOFF_KEYS, source, agent, f"handoffs[{index}]")
    if "target" not in raw:
        raise SpecError(source, agent, f"handoffs[{index}] has no 'target'")
    target = _string(raw["target"], source, agent, f"handoffs[{index}].target")
    tool_name = _string(
        raw.get("tool_name", f"transfer_to_{target.lower()}"),
        source,
        agent,
        f"handoffs[{index}].tool_name",
    )
    _check_tool_name(tool_name, source, agent)
    description = _string(
        raw.get("tool_description", f"Handoff to the {target} agent to handle the request."),
        source,
        agent,
        f"handoffs[{index}].tool_description",
    )
    return HandoffSpec(target=target, tool_name=tool_name, tool_description=description)


def _build_tool(raw: Any, index: int, source: str, agent: str) -> ToolSpec:
    if isinstance(raw, str):
        raw = {"import_path": raw}
    if not isinstance(raw, dict):
        raise SpecError(source, agent, f"tools[{index}] must be a string or a table")
    _refuse_unknown(raw, _TOOL_KEYS, source, agent, f"tools[{index}]")
    if "import_path" not in raw:
        raise SpecError(source, agent, f"tools[{index}] has no 'import_path'")
    import_path = _string(raw["import_path"], source, agent, f"tools[{index}].import_path")
    try:
        fn = import_callable(import_path)
        default_name, default_description, schema = describe_callable(fn)
    except ToolSchemaError as e:
        raise SpecError(source, agent, f"tool {import_path!r}: {e}") from e
    name = _string(raw.get("name", default_name), source, agent, f"tools[{index}].name")
    _check_tool_name(name, source, agent)
    description = raw.get("description", default_description)
    if not isinstance(description, str):  # may be empty: an undocumented function
        raise SpecError(source, agent, f"tools[{index}].description must be a string")
    return ToolSpec(
        import_path=import_path,
        name=name,
        description=description,
        parameters_json_schema=schema,
        fn=fn,
    )


def _refuse_unknown(
    table: Mapping[str, Any], allowed: set[str], source: str, agent: str | None, where: str
) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(
            source,
            agent,
            f"unknown key(s) {', '.join(unknown)} in {where} (allowed: {', '.join(sorted(allowed))})",
        )


def _string(value: Any, source: str, agent: str | None, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(source, agent, f"{field} must be a non-empty string, got {value!r}")
    return value


def _list(raw: Mapping[str, Any], key: str, source: str, agent: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise SpecError(source, agent, f"{key} must be an array")
    return value


def _history_limit(value: Any, source: str, agent: str | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(source, agent, f"history_limit must be an integer >= 1, got {value!r}")
    return value


def _check_tool_name(name: str, source: str, agent: str) -> None:
    if not _TOOL_NAME.match(name):
        raise SpecError(source, agent, f"tool name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
