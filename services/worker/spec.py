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

The TOML is decoded into msgspec Structs (``_SpecFile`` and the tables in it)
that refuse unknown keys, so a typo such as ``histroy_limit`` is not ignored,
and carry the field constraints; what spans fields (handoff targets exist, the
entry agent exists, names are unique, tools import) is checked after decoding.
Every problem is reported as a :class:`SpecError` whose message names the
file, the agent and the problem with its path (``$.agents[0].history_limit``),
so a bad deploy fails at startup with one clear line.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

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

# One rule for two kinds of name: Chat Completions function names (letters,
# digits, underscore, dash; at most 64), and agent names, which become NATS
# subject tokens and KV values and so must stay token-safe.
_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}\Z"
_TOOL_NAME = re.compile(_NAME_PATTERN)

_NAME_RULE = "a name of 1 to 64 letters, digits, '_' or '-'"

_NonEmpty = Annotated[str, Meta(min_length=1)]
_AgentName = Annotated[str, Meta(pattern=_NAME_PATTERN)]
_ToolName = Annotated[str, Meta(pattern=_NAME_PATTERN)]
_HistoryLimit = Annotated[int, Meta(ge=1, le=100_000)]  # a read's largest tail


# -- the file's shape: decoded from TOML, unknown keys refused ------------------


class _Defaults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: _NonEmpty = DEFAULT_MODEL
    history_limit: _HistoryLimit = DEFAULT_HISTORY_LIMIT


class _Handoff(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    target: _NonEmpty
    tool_name: _ToolName | UnsetType = UNSET  # transfer_to_<target>
    tool_description: _NonEmpty | UnsetType = UNSET


class _Tool(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    import_path: _NonEmpty
    name: _ToolName | UnsetType = UNSET  # the function's name
    description: str | UnsetType = UNSET  # the docstring's first line; may be empty


class _Agent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: _AgentName
    instructions: str
    model: _NonEmpty | UnsetType = UNSET
    history_limit: _HistoryLimit | UnsetType = UNSET
    handoffs: list[_Handoff] = []
    tools: list[_NonEmpty | _Tool] = []  # "package.module:function" or a table


class _SpecFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    entry: _NonEmpty
    defaults: _Defaults = msgspec.field(default_factory=_Defaults)
    agents: list[_Agent] = []


_AGENT_PATH = re.compile(r"`\$\.agents\[(\d+)\]")


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
    except UnicodeDecodeError as e:
        raise SpecError(source, None, f"not valid UTF-8 (byte {e.start} is {e.object[e.start]:#04x})") from e
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
    try:
        spec = msgspec.convert(doc, _SpecFile)
    except msgspec.ValidationError as e:
        # Name the rule, not its regex (agent and tool names share it).
        problem = str(e).replace(f"`str` matching regex {_NAME_PATTERN!r}", _NAME_RULE)
        raise SpecError(source, _agent_at(doc, problem), problem) from e
    return _build_system(spec, source)


def _agent_at(doc: dict[str, Any], message: str) -> str | None:
    """The name of the agent a validation error's path points into, if it has one."""
    m = _AGENT_PATH.search(message)
    agents = doc.get("agents")
    if m is None or not isinstance(agents, list) or int(m[1]) >= len(agents):
        return None
    table = agents[int(m[1])]
    name = table.get("name") if isinstance(table, dict) else None
    return name if isinstance(name, str) else None


def _build_system(spec: _SpecFile, source: str) -> SystemSpec:
    if not spec.agents:
        raise SpecError(source, None, "no agents defined: add at least one [[agents]] table")
    agents: dict[str, AgentSpec] = {}
    for index, raw in enumerate(spec.agents):
        agent = _build_agent(raw, index, source, spec.defaults)
        if agent.name in agents:
            raise SpecError(
                source, agent.name, f"duplicate agent name - at `$.agents[{index}].name`"
            )
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
    if spec.entry not in agents:
        raise SpecError(
            source, None, f"entry agent {spec.entry!r} is not defined (defined: {', '.join(agents)})"
        )
    return SystemSpec(entry=spec.entry, agents=agents)


def _build_agent(raw: _Agent, index: int, source: str, defaults: _Defaults) -> AgentSpec:
    name = raw.name
    instructions = raw.instructions.strip()
    if not instructions:
        raise SpecError(
            source, name, f"instructions must not be blank - at `$.agents[{index}].instructions`"
        )
    at = f"$.agents[{index}]"
    handoffs = tuple(
        _build_handoff(h, f"{at}.handoffs[{i}]", source, name) for i, h in enumerate(raw.handoffs)
    )
    tools = tuple(_build_tool(t, f"{at}.tools[{i}]", source, name) for i, t in enumerate(raw.tools))
    seen: set[str] = set()
    for tool_name in [h.tool_name for h in handoffs] + [t.name for t in tools]:
        if tool_name in seen:
            raise SpecError(source, name, f"duplicate tool name {tool_name!r} - at `{at}`")
        seen.add(tool_name)
    return AgentSpec(
        name=name,
        instructions=instructions,
        model=defaults.model if raw.model is UNSET else raw.model,
        history_limit=defaults.history_limit if raw.history_limit is UNSET else raw.history_limit,
        handoffs=handoffs,
        tools=tools,
    )


def _build_handoff(raw: _Handoff, path: str, source: str, agent: str) -> HandoffSpec:
    target = raw.target
    tool_name = f"transfer_to_{target.lower()}" if raw.tool_name is UNSET else raw.tool_name
    _check_tool_name(tool_name, f"{path}.tool_name", source, agent)
    description = (
        f"Handoff to the {target} agent to handle the request."
        if raw.tool_description is UNSET
        else raw.tool_description
    )
    return HandoffSpec(target=target, tool_name=tool_name, tool_description=description)


def _build_tool(raw: str | _Tool, path: str, source: str, agent: str) -> ToolSpec:
    if isinstance(raw, str):
        raw = _Tool(import_path=raw)
    import_path = raw.import_path
    try:
        fn = import_callable(import_path)
        default_name, default_description, schema = describe_callable(fn)
    except ToolSchemaError as e:
        raise SpecError(source, agent, f"tool {import_path!r}: {e} - at `{path}`") from e
    name = default_name if raw.name is UNSET else raw.name
    _check_tool_name(name, f"{path}.name", source, agent)
    return ToolSpec(
        import_path=import_path,
        name=name,
        description=default_description if raw.description is UNSET else raw.description,
        parameters_json_schema=schema,
        fn=fn,
    )


def _check_tool_name(name: str, path: str, source: str, agent: str) -> None:
    """A name the file did not spell out (derived from a target or a function) fits too."""
    if not _TOOL_NAME.match(name):
        raise SpecError(source, agent, f"tool name {name!r} is not {_NAME_RULE} - at `{path}`")
