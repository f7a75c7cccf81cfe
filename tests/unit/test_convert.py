"""SDK-shaped Responses items <-> Chat Completions messages, and tool schemas."""

from __future__ import annotations

import json

from services.worker.convert import (
    agent_system_prompt,
    agent_tool_schemas,
    assistant_text_item,
    function_call_item,
    function_call_output_item,
    function_tool_schema,
    handoff_output,
    handoff_tool_schema,
    items_to_chat_messages,
    parse_handoff_output,
    user_message_item,
)
from services.worker.spec import AgentSpec, HandoffSpec, ToolSpec


def tool_msg(call_id: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def call(call_id: str, name: str, arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_item_builders_match_the_agents_sdk_shapes() -> None:
    assert user_message_item("hi") == {"role": "user", "content": "hi"}
    assert assistant_text_item("Hello!", "turn1-0") == {
        "id": "msg_turn1-0",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
    }
    assert assistant_text_item("x", "msg_abc")["id"] == "msg_abc"
    assert function_call_item("call_1", "route_to_billing", "{}") == {
        "type": "function_call",
        "call_id": "call_1",
        "name": "route_to_billing",
        "arguments": "{}",
    }
    assert function_call_output_item("call_1", "out") == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": "out",
    }


def test_handoff_output_is_what_the_sdk_records() -> None:
    assert handoff_output("L1Billing") == '{"assistant": "L1Billing"}'
    assert json.loads(handoff_output("L2Support")) == {"assistant": "L2Support"}
    assert parse_handoff_output(handoff_output("L1Billing")) == "L1Billing"
    for not_handoff in ["Refund RF-1 issued", '{"assistant": 3}', '{"a": "b"}', "{", None, 7]:
        assert parse_handoff_output(not_handoff) is None
    assert parse_handoff_output('{"assistant": "X", "extra": 1}') is None


def test_system_prompt_first_then_user_and_assistant_text() -> None:
    items = [
        user_message_item("Hi"),
        assistant_text_item("Hello, how can I help?", "t1"),
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "My "},
                {"type": "input_text", "text": "bill"},
            ],
        },
        {"type": "message", "role": "user", "content": "again"},
    ]
    assert items_to_chat_messages("Be nice.", items) == [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "My bill"},
        {"role": "user", "content": "again"},
    ]


def test_handoff_pair_becomes_tool_call_and_tool_message() -> None:
    # The seed's first turn: Triage hands off to L1Billing, which answers.
    items = [
        user_message_item("I was charged twice."),
        function_call_item("call_a", "route_to_billing", "{}"),
        function_call_output_item("call_a", handoff_output("L1Billing")),
        assistant_text_item("Let me look at those charges.", "t1-1"),
    ]
    assert items_to_chat_messages("sys", items)[1:] == [
        {"role": "user", "content": "I was charged twice."},
        {"role": "assistant", "content": None, "tool_calls": [call("call_a", "route_to_billing")]},
        tool_msg("call_a", '{"assistant": "L1Billing"}'),
        {"role": "assistant", "content": "Let me look at those charges."},
    ]


def test_consecutive_function_calls_become_one_assistant_message() -> None:
    items = [
        user_message_item("refund and file a bug"),
        assistant_text_item("On it.", "t1"),  # text right before the calls joins them
        function_call_item("c1", "issue_refund", '{"amount": 5, "reason": "x"}'),
        function_call_item("c2", "file_bug_report", '{"summary": "y"}'),
        function_call_output_item("c1", "Refund RF-1"),
        function_call_output_item("c2", "Bug BUG-2"),
        assistant_text_item("Both done.", "t2"),
    ]
    assert items_to_chat_messages("sys", items)[1:] == [
        {"role": "user", "content": "refund and file a bug"},
        {
            "role": "assistant",
            "content": "On it.",
            "tool_calls": [
                call("c1", "issue_refund", '{"amount": 5, "reason": "x"}'),
                call("c2", "file_bug_report", '{"summary": "y"}'),
            ],
        },
        tool_msg("c1", "Refund RF-1"),
        tool_msg("c2", "Bug BUG-2"),
        {"role": "assistant", "content": "Both done."},
    ]


def test_output_written_after_a_concurrent_user_message_stays_paired() -> None:
    # A user message committed between a call and its output (concurrent writers):
    # Chat Completions needs the tool message right after the call.
    items = [
        user_message_item("charged twice"),
        function_call_item("c1", "route_to_billing", ""),
        user_message_item("hello?"),
        function_call_output_item("c1", handoff_output("L1Billing")),
    ]
    assert items_to_chat_messages("sys", items)[1:] == [
        {"role": "user", "content": "charged twice"},
        {"role": "assistant", "content": None, "tool_calls": [call("c1", "route_to_billing")]},
        tool_msg("c1", '{"assistant": "L1Billing"}'),
        {"role": "user", "content": "hello?"},
    ]


def test_unpaired_calls_and_outputs_are_left_out() -> None:
    # The history window (history_limit) can cut a pair in half; a call may not
    # have its output yet.  Either would make the request invalid.
    items = [
        function_call_output_item(
            "gone", handoff_output("L1Billing")
        ),  # its call is out of the window
        user_message_item("hi"),
        assistant_text_item("Checking.", "t"),
        function_call_item("pending", "issue_refund", "{}"),  # no output yet
        {"type": "reasoning", "id": "rs_1", "summary": []},  # no Chat Completions form
    ]
    assert items_to_chat_messages("sys", items) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Checking."},
    ]


def test_non_string_outputs_are_serialised() -> None:
    items = [
        function_call_item("c", "t", "{}"),
        function_call_output_item("c", "x") | {"output": [{"type": "input_text", "text": "parts"}]},
        function_call_item("d", "t", "{}"),
        {"type": "function_call_output", "call_id": "d", "output": {"ok": True}},
    ]
    messages = items_to_chat_messages("sys", items)
    assert messages[2] == tool_msg("c", "parts")
    # Sequential calls (separate model responses) stay separate assistant messages.
    assert [m["role"] for m in messages] == ["system", "assistant", "tool", "assistant", "tool"]
    assert messages[4] == tool_msg("d", '{"ok": true}')


def test_tool_schemas() -> None:
    handoff = HandoffSpec(
        target="L2Support", tool_name="escalate_to_senior", tool_description="Escalate"
    )
    schema = {
        "type": "object",
        "properties": {"summary": {"type": "string"}},
        "required": ["summary"],
    }
    tool = ToolSpec(
        import_path="m:f",
        name="file_bug_report",
        description="File a bug.",
        parameters_json_schema=schema,
        fn=lambda summary: summary,
    )
    assert handoff_tool_schema(handoff) == {
        "type": "function",
        "function": {
            "name": "escalate_to_senior",
            "description": "Escalate",
            "parameters": {
                "type": "object",
                "properties": {},
                "required": [],
                "additionalProperties": False,
            },
        },
    }
    assert function_tool_schema(tool) == {
        "type": "function",
        "function": {"name": "file_bug_report", "description": "File a bug.", "parameters": schema},
    }
    agent = AgentSpec(name="L1", instructions="i", handoffs=(handoff,), tools=(tool,))
    assert [t["function"]["name"] for t in agent_tool_schemas(agent)] == [
        "escalate_to_senior",
        "file_bug_report",
    ]


def test_system_prompt_names_the_agent() -> None:
    prompt = agent_system_prompt(AgentSpec(name="L1Billing", instructions="Handle billing."))
    assert prompt.startswith("You are L1Billing, ")
    assert prompt.endswith("\n\nHandle billing.")


def test_a_call_id_a_server_reused_in_a_later_response_pairs_each_call_with_its_own_output() -> None:
    # Some servers name every tool call "call_0". Two responses' calls under one id were
    # one call to the next model (the later call and its output left out), and a call
    # whose earlier namesake was cut from the window got that namesake's output.
    items = [
        user_message_item("refund 1"),
        function_call_item("call_0", "refund", '{"n": 1}'),
        function_call_output_item("call_0", "refunded 1"),
        user_message_item("refund 2"),
        function_call_item("call_0", "refund", '{"n": 2}'),
        function_call_output_item("call_0", "refunded 2"),
    ]
    assert items_to_chat_messages("sys", items)[1:] == [
        {"role": "user", "content": "refund 1"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_0", "refund", '{"n": 1}')]},
        tool_msg("call_0", "refunded 1"),
        {"role": "user", "content": "refund 2"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_0", "refund", '{"n": 2}')]},
        tool_msg("call_0", "refunded 2"),
    ]
    # The window starts after the first call: its output pairs with nothing.
    assert items_to_chat_messages("sys", items[2:])[1:] == [
        {"role": "user", "content": "refund 2"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_0", "refund", '{"n": 2}')]},
        tool_msg("call_0", "refunded 2"),
    ]
