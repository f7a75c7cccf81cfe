"""Agent spec parsing: the deploy files load, every bad spec fails with a clear message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from services.worker.spec import (
    DEFAULT_HISTORY_LIMIT,
    AgentSpec,
    SpecError,
    load_spec,
    parse_spec,
)

REPO = Path(__file__).resolve().parents[2]

# A module of sample tools, written to tmp_path and put on sys.path per test.
SAMPLE_TOOLS = '''
from typing import Literal, Optional


def lookup(order_id: str, limit: int, ratio: float = 0.5, strict: bool = False) -> str:
    """Look up an order.

    Args:
        order_id: the order to look up.
        limit: how many rows at most.
    """
    return order_id


async def tag(labels: list[str], extra: dict[str, int], note: Optional[str] = None,
              level: Literal["low", "high"] = "low") -> str:
    """Tag something asynchronously."""
    return ",".join(labels)


def undocumented(x: int | None) -> str:
    return str(x)


def unannotated(x) -> str:
    return str(x)


def variadic(*args: str) -> str:
    return ""


def weird(x: set[int]) -> str:
    return ""


NOT_CALLABLE = 42
'''


@pytest.fixture
def sample_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "convlog_sample_tools.py").write_text(SAMPLE_TOOLS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "convlog_sample_tools"


def spec_text(body: str, entry: str = "A") -> str:
    return f'entry = "{entry}"\n' + textwrap.dedent(body)


def one_agent(extra: str = "", name: str = "A") -> str:
    return spec_text(
        f"""
        [[agents]]
        name = "{name}"
        instructions = "Do things."
        {extra}
        """,
        entry=name,
    )


def expect_error(text: str, *fragments: str, agent: str | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="bad.toml")
    err = info.value
    message = str(err)
    assert message.startswith("bad.toml: "), message
    if agent is not None:
        assert err.agent == agent
        assert f"agent {agent!r}" in message
    for fragment in fragments:
        assert fragment in message, message
    return err


# -- the deploy files -----------------------------------------------------------


def test_reference_system_loads_as_the_seed_describes() -> None:
    system = load_spec(REPO / "deploy" / "agents.toml")

    assert system.entry == "Triage"
    assert list(system.agents) == ["Triage", "L1Billing", "L1Technical", "L2Support"]
    for agent in system.agents.values():
        assert agent.model == "gpt-4o-mini"
        assert agent.history_limit == 50
    triage = system.agent("Triage")
    assert [(h.tool_name, h.target, h.tool_description) for h in triage.handoffs] == [
        ("route_to_billing", "L1Billing", "Route to billing support"),
        ("route_to_technical", "L1Technical", "Route to technical support"),
    ]
    assert triage.instructions.startswith("Greet the user and understand their issue.")
    for l1 in ("L1Billing", "L1Technical"):
        (handoff,) = system.agent(l1).handoffs
        assert (handoff.tool_name, handoff.target) == ("escalate_to_senior", "L2Support")
    assert "refund over $50" in system.agent("L1Billing").instructions

    l2 = system.agent("L2Support")
    assert l2.handoffs == ()
    assert [t.name for t in l2.tools] == ["issue_refund", "file_bug_report", "create_ticket"]
    refund = l2.tool_for("issue_refund")
    assert refund is not None
    assert refund.description == "Issue a refund to the customer's original payment method."
    schema = refund.parameters_json_schema
    assert schema["required"] == ["amount", "reason"]
    assert schema["properties"]["amount"]["type"] == "number"
    assert schema["properties"]["reason"]["type"] == "string"
    assert refund.fn(29.99, "duplicate charge").startswith("Refund RF-")


def test_greeter_system_loads() -> None:
    system = load_spec(REPO / "deploy" / "greeter.toml")
    assert system.entry == "Greeter"
    (handoff,) = system.agent("Greeter").handoffs
    assert (handoff.tool_name, handoff.target) == ("transfer_to_helper", "Helper")
    assert system.agent("Helper").handoffs == ()


@pytest.mark.parametrize("name", ["agents.toml", "greeter.toml"])
def test_packaged_copy_is_identical_to_deploy(name: str) -> None:
    deploy = (REPO / "deploy" / name).read_bytes()
    packaged = (REPO / "services" / "cli" / "data" / name).read_bytes()
    assert packaged == deploy, f"services/cli/data/{name} differs from deploy/{name}; copy it over"


def test_unknown_agent_lookup_lists_known_agents() -> None:
    system = load_spec(REPO / "deploy" / "agents.toml")
    with pytest.raises(KeyError, match="known: Triage, L1Billing"):
        system.agent("Nobody")


# -- defaults and tool schemas ----------------------------------------------------


def test_defaults_apply_and_agent_values_override() -> None:
    system = parse_spec(
        spec_text(
            """
            [defaults]
            model = "m-default"
            history_limit = 7

            [[agents]]
            name = "A"
            instructions = "a"

            [[agents.handoffs]]
            target = "B"

            [[agents]]
            name = "B"
            instructions = "b"
            model = "m-b"
            history_limit = 3
            """
        )
    )
    a, b = system.agent("A"), system.agent("B")
    assert (a.model, a.history_limit) == ("m-default", 7)
    assert (b.model, b.history_limit) == ("m-b", 3)
    (handoff,) = a.handoffs
    assert handoff.tool_name == "transfer_to_b"
    assert "B" in handoff.tool_description
    assert AgentSpec(name="X", instructions="x").history_limit == DEFAULT_HISTORY_LIMIT


def test_function_tool_schema_from_signature(sample_tools: str) -> None:
    # Tools may be given as import-path strings or as tables with overrides.
    tag_table = f'{{import_path = "{sample_tools}:tag", name = "tag_it", description = "Custom description"}}'
    system = parse_spec(
        one_agent(f'tools = ["{sample_tools}:lookup", "{sample_tools}:undocumented", {tag_table}]')
    )
    agent = system.agent("A")
    lookup, undocumented, tag = agent.tools

    assert lookup.name == "lookup"
    assert lookup.description == "Look up an order."
    assert lookup.parameters_json_schema == {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "description": "the order to look up."},
            "limit": {"type": "integer", "description": "how many rows at most."},
            "ratio": {"type": "number", "default": 0.5},
            "strict": {"type": "boolean", "default": False},
        },
        "required": ["order_id", "limit"],
        "additionalProperties": False,
    }
    assert undocumented.description == ""
    assert undocumented.parameters_json_schema["properties"]["x"] == {"type": ["integer", "null"]}

    assert (tag.name, tag.description) == ("tag_it", "Custom description")
    assert tag.import_path == f"{sample_tools}:tag"
    props = tag.parameters_json_schema["properties"]
    assert props["labels"] == {"type": "array", "items": {"type": "string"}}
    assert props["extra"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert props["note"] == {"type": ["string", "null"], "default": None}
    assert props["level"] == {"enum": ["low", "high"], "default": "low"}
    assert tag.parameters_json_schema["required"] == ["labels", "extra"]
    assert agent.tool_for("tag_it") is tag
    assert agent.tool_for("nope") is None


# -- every validation error names the file, the agent and the problem -----------


def test_unknown_handoff_target() -> None:
    expect_error(
        one_agent('[[agents.handoffs]]\ntarget = "Ghost"\ntool_name = "go"'),
        "handoff 'go' targets unknown agent 'Ghost'",
        "defined: A",
        agent="A",
    )


def test_duplicate_agent_names() -> None:
    text = spec_text(
        """
        [[agents]]
        name = "A"
        instructions = "one"

        [[agents]]
        name = "A"
        instructions = "two"
        """
    )
    expect_error(text, "duplicate agent name", agent="A")


def test_duplicate_tool_names_within_an_agent(sample_tools: str) -> None:
    expect_error(
        one_agent(f'tools = ["{sample_tools}:lookup", "{sample_tools}:lookup"]'),
        "duplicate tool name 'lookup'",
        agent="A",
    )


def test_handoff_and_tool_may_not_share_a_name(sample_tools: str) -> None:
    text = spec_text(
        f"""
        [[agents]]
        name = "A"
        instructions = "a"
        tools = ["{sample_tools}:lookup"]

        [[agents.handoffs]]
        target = "A"
        tool_name = "lookup"
        """
    )
    expect_error(text, "duplicate tool name 'lookup'", agent="A")


def test_same_tool_name_in_different_agents_is_fine() -> None:
    system = load_spec(REPO / "deploy" / "agents.toml")
    assert system.agent("L1Billing").handoffs[0].tool_name == "escalate_to_senior"
    assert system.agent("L1Technical").handoffs[0].tool_name == "escalate_to_senior"


def test_entry_agent_not_defined() -> None:
    text = one_agent().replace('entry = "A"', 'entry = "Nobody"')
    err = expect_error(text, "entry agent 'Nobody' is not defined", "defined: A")
    assert err.agent is None


def test_missing_entry() -> None:
    expect_error(one_agent().replace('entry = "A"', ""), "missing required field `entry`")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("services.worker.support_tools:no_such_fn", "has no attribute 'no_such_fn'"),
        ("services.worker.support_tools", "must look like 'package.module:function'"),
        ("services.worker.support_tools:", "must look like 'package.module:function'"),
    ],
)
def test_unimportable_tool_path(path: str, problem: str) -> None:
    expect_error(one_agent(f'tools = ["{path}"]'), f"tool {path!r}", problem, agent="A")


# A module whose import fails other than with ImportError (a relative path is a TypeError, a
# module with a syntax error or one that raises at its top level) came out of the spec loader
# as that exception: `convlog worker` printed a traceback and exited 1, not one line, exit 2.
@pytest.mark.parametrize(
    ("path", "problem"),
    [
        (".relative_tools:fn", "cannot import module '.relative_tools': TypeError"),
        ("convlog_broken_tools:fn", "cannot import module 'convlog_broken_tools': SyntaxError"),
        ("convlog_raising_tools:fn", "cannot import module 'convlog_raising_tools': RuntimeError: no config"),
    ],
)
def test_a_tool_module_that_fails_to_import_is_a_spec_error(
    path: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "convlog_broken_tools.py").write_text("def fn(:\n")
    (tmp_path / "convlog_raising_tools.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    expect_error(one_agent(f'tools = ["{path}"]'), f"tool {path!r}", problem, agent="A")


@pytest.mark.parametrize(
    ("fn", "problem"),
    [
        ("unannotated", "parameter 'x' has no type annotation"),
        ("variadic", "*args/**kwargs are not supported"),
        ("weird", "unsupported type annotation"),
        ("NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
    ],
)
def test_tool_signature_problems(sample_tools: str, fn: str, problem: str) -> None:
    expect_error(one_agent(f'tools = ["{sample_tools}:{fn}"]'), problem, agent="A")


# A callable inspect finds no signature for (a builtin type) raised ValueError out of the
# spec loader: a traceback and exit 1 from `convlog worker`, not one line.
@pytest.mark.parametrize("path", ["builtins:dict", "functools:partial"])
def test_a_tool_without_a_readable_signature_is_a_spec_error(path: str) -> None:
    expect_error(one_agent(f'tools = ["{path}"]'), f"tool {path!r}", "cannot read its parameters", agent="A")


@pytest.mark.parametrize("value", ["0", "-5", '"50"', "true", "1.5"])
def test_history_limit_must_be_a_positive_integer(value: str) -> None:
    err = expect_error(
        one_agent(f"history_limit = {value}"), "Expected `int`", "at `$.agents[0].history_limit`",
        agent="A",
    )
    if value in ("0", "-5"):
        assert "Expected `int` >= 1" in str(err)


def test_history_limit_in_defaults_is_checked_too() -> None:
    text = one_agent().replace('entry = "A"', 'entry = "A"\n[defaults]\nhistory_limit = 0\n')
    expect_error(text, "Expected `int` >= 1 - at `$.defaults.history_limit`")


@pytest.mark.parametrize(
    ("line", "problem"),
    [("", "missing required field `instructions` - at `$.agents[0]`"),
     ('instructions = "   "', "instructions must not be blank - at `$.agents[0].instructions`")],
)
def test_missing_instructions(line: str, problem: str) -> None:
    text = spec_text(f'[[agents]]\nname = "A"\n{line}\n')
    expect_error(text, problem, agent="A")


def test_unknown_keys_are_refused() -> None:
    expect_error(
        one_agent("histroy_limit = 5"), "unknown field `histroy_limit` - at `$.agents[0]`", agent="A"
    )
    err = expect_error("extra = 1\n" + one_agent(), "unknown field `extra`")
    assert err.agent is None


def test_no_agents() -> None:
    expect_error('entry = "A"\n', "no agents defined")


def test_bad_agent_name() -> None:
    expect_error(
        one_agent(name="has space"),
        "Expected a name of 1 to 64 letters, digits, '_' or '-' - at `$.agents[0].name`",
        agent="has space",
    )


def test_bad_tool_name() -> None:
    expect_error(
        one_agent('[[agents.handoffs]]\ntarget = "A"\ntool_name = "no spaces allowed"'),
        "Expected a name of 1 to 64 letters, digits, '_' or '-'",
        "at `$.agents[0].handoffs[0].tool_name`",
        agent="A",
    )


def test_invalid_toml() -> None:
    expect_error("entry = ", "not valid TOML")


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(one_agent('[[agents.handoffs]]\ntarget = "Ghost"'))
    with pytest.raises(
        SpecError, match=r"agents\.toml: agent 'A': handoff .* unknown agent 'Ghost'"
    ):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path / "missing.toml")


# -- the decoder names the path of every shape problem ------------------------------


@pytest.mark.parametrize(
    ("text", "fragment", "agent"),
    [
        ('defaults = 5\n' + one_agent(), "Expected `object`, got `int` - at `$.defaults`", None),
        (one_agent().replace('entry = "A"', 'entry = "A"\n[defaults]\nmodle = "m"\n'),
         "unknown field `modle` - at `$.defaults`", None),
        ('entry = "A"\nagents = 5\n', "Expected `array`, got `int` - at `$.agents`", None),
        ('entry = "A"\nagents = [5]\n', "Expected `object`, got `int` - at `$.agents[0]`", None),
        ('entry = 5\n' + one_agent().replace('entry = "A"', ""), "Expected `str`, got `int` - at `$.entry`", None),
        (one_agent('model = ""'), "Expected `str` of length >= 1 - at `$.agents[0].model`", "A"),
        (one_agent("handoffs = 5"), "Expected `array`, got `int` - at `$.agents[0].handoffs`", "A"),
        (one_agent('[[agents.handoffs]]\ntarget = "A"\nvia = "x"'),
         "unknown field `via` - at `$.agents[0].handoffs[0]`", "A"),
        (one_agent('[[agents.handoffs]]\ntool_name = "go"'),
         "missing required field `target` - at `$.agents[0].handoffs[0]`", "A"),
        (one_agent("tools = [5]"), "Expected `str | object`, got `int` - at `$.agents[0].tools[0]`", "A"),
        (one_agent('tools = [""]'), "at `$.agents[0].tools[0]`", "A"),
        (one_agent('tools = [{import_path = "m:f", desc = "x"}]'),
         "unknown field `desc` - at `$.agents[0].tools[0]`", "A"),
        (one_agent('tools = [{import_path = "services.worker.support_tools:issue_refund", description = 5}]'),
         "Expected `str`, got `int` - at `$.agents[0].tools[0].description`", "A"),
    ],
)
def test_shape_problems_name_their_path(text: str, fragment: str, agent: str | None) -> None:
    err = expect_error(text, fragment, agent=agent)
    assert err.agent == agent


def test_a_derived_tool_name_is_checked_too() -> None:
    # The target's name is fine, but transfer_to_<target> is over 64 characters.
    long = "B" * 60
    text = spec_text(
        f"""
        [[agents]]
        name = "A"
        instructions = "a"
        [[agents.handoffs]]
        target = "{long}"

        [[agents]]
        name = "{long}"
        instructions = "b"
        """
    )
    expect_error(text, f"tool name 'transfer_to_{long.lower()}' is not a name of 1 to 64",
                 "at `$.agents[0].handoffs[0].tool_name`", agent="A")


def test_load_spec_names_the_file_and_the_path(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(one_agent("history_limit = 0"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"{path}: agent 'A': Expected `int` >= 1 - at `$.agents[0].history_limit`"
    )
