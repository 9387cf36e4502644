"""OpenAI-style message validation: normalized copies, and errors that name the index and field."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from lm_core.errors import LMDeployError
from lm_core.messages import ROLES, InvalidMessagesError, ToolCallArguments, parse_tool_arguments, validate_messages

CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1,  "b": [2, "é"]}'}}


def test_roles():
    assert ROLES == ("system", "user", "assistant", "tool", "developer")


def test_plain_conversation_is_copied_with_none_values_dropped():
    messages = [
        {"role": "system", "content": "Be brief.", "name": None},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello", "tool_calls": None, "refusal": None},
        {"role": "developer", "content": "Use French."},
    ]
    before = copy.deepcopy(messages)
    out = validate_messages(messages)
    assert out == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello"},
        {"role": "developer", "content": "Use French."},
    ]
    out[1]["content"] = "changed"
    assert messages == before


def test_unknown_keys_and_content_parts_are_kept():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image], "metadata": {"k": 1}}]
    out = validate_messages(messages)
    assert out == messages
    assert out[0]["content"][1] is not image  # a copy


def test_tool_calls_are_normalized():
    messages = [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    out = validate_messages(messages)
    assistant = out[1]
    assert assistant["content"] == ""  # templates handle "" where None or a missing key breaks some
    arguments = assistant["tool_calls"][0]["function"]["arguments"]
    assert isinstance(arguments, ToolCallArguments)
    assert arguments == {"a": 1, "b": [2, "é"]}
    assert str(arguments) == '{"a": 1,  "b": [2, "é"]}'  # the client's own text, as sent
    assert "call: " + arguments == 'call: {"a": 1,  "b": [2, "é"]}'
    assert arguments + "!" == '{"a": 1,  "b": [2, "é"]}!'
    assert json.dumps(arguments) == '{"a": 1, "b": [2, "\\u00e9"]}'
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == CALL["function"]["arguments"]  # input untouched


def test_tool_call_defaults_and_dict_arguments():
    call = {"function": {"name": "add", "arguments": {"a": 1}}}
    out = validate_messages([{"role": "assistant", "tool_calls": [call]}])
    assert out[0]["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    assert str(out[0]["tool_calls"][0]["function"]["arguments"]) == '{"a": 1}'
    assert out[0]["content"] == ""


def test_empty_tool_calls_are_dropped():
    out = validate_messages(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho", "tool_calls": []}]
    )
    assert out[1] == {"role": "assistant", "content": "Ho"}


def test_reasoning_only_assistant_message():
    out = validate_messages([{"role": "assistant", "reasoning_content": "hm"}])
    assert out == [{"role": "assistant", "reasoning_content": "hm", "content": ""}]


def test_tool_call_arguments_survive_pickle_and_copy():
    arguments = parse_tool_arguments('{"x":  1}')
    for clone in (pickle.loads(pickle.dumps(arguments)), copy.deepcopy(arguments), copy.copy(arguments)):
        assert isinstance(clone, ToolCallArguments)
        assert clone == {"x": 1}
        assert str(clone) == '{"x":  1}'


def test_tool_results_may_follow_each_other():
    calls = [CALL, {**CALL, "id": "call_2"}]
    messages = [
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {"role": "tool", "tool_call_id": "call_2", "content": "4"},
        {"role": "tool", "content": "no id is fine too"},
    ]
    assert len(validate_messages(messages)) == 4


ASSISTANT_CALL = {"role": "assistant", "tool_calls": [CALL]}


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "messages: expected a list of message dicts, got str"),
        ({"role": "user"}, "messages: expected a list of message dicts, got dict"),
        (None, "messages: expected a list of message dicts, got None"),
        ([], "messages: empty; pass at least one message"),
        ([["user", "hi"]], "messages[0]: expected a dict with 'role' and 'content', got list"),
        ([{"content": "hi"}], "messages[0].role: missing"),
        ([{"role": 1, "content": "hi"}], "messages[0].role: expected a string, got int"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "robot", "content": "c"}],
            "messages[2].role: 'robot' is not one of system, user, assistant, tool, developer",
        ),
        ([{"role": "user"}], "messages[0].content: missing"),
        ([{"role": "user", "content": None}], "messages[0].content: missing"),
        ([{"role": "assistant"}], "messages[0].content: missing (an assistant message needs content or tool_calls)"),
        (
            [{"role": "user", "content": 3}],
            "messages[0].content: expected a string or a list of content parts, got int",
        ),
        ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]: expected a content part dict"),
        ([{"role": "user", "content": [{"text": "hi"}]}], "messages[0].content[0].type: missing"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text: missing"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            "messages[0].content[0].text: expected a string, got int",
        ),
        ([{"role": "user", "content": "hi", "name": 7}], "messages[0].name: expected a string, got int"),
        (
            [{"role": "user", "content": "hi", "tool_calls": [CALL]}],
            "messages[0].tool_calls: only assistant messages make tool calls, not user messages",
        ),
        (
            [{"role": "assistant", "tool_calls": CALL}],
            "messages[0].tool_calls: expected a list of tool calls, got dict",
        ),
        ([{"role": "assistant", "tool_calls": ["add"]}], "messages[0].tool_calls[0]: expected a dict like"),
        (
            [{"role": "assistant", "tool_calls": [{**CALL, "type": "retrieval"}]}],
            "messages[0].tool_calls[0].type: 'retrieval' is not supported; only 'function' tool calls are",
        ),
        ([{"role": "assistant", "tool_calls": [{"id": "x"}]}], "messages[0].tool_calls[0].function: missing"),
        (
            [{"role": "assistant", "tool_calls": [{"function": "add"}]}],
            "messages[0].tool_calls[0].function: expected a dict with 'name' and 'arguments', got str",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
            "messages[0].tool_calls[0].function.name: missing",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": "{}"}}]}],
            "messages[0].tool_calls[0].function.name: empty",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "add"}}]}],
            "messages[0].tool_calls[0].function.arguments: missing",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{a: 1}"}}]}],
            "messages[0].tool_calls[0].function.arguments: not valid JSON (Expecting property name",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "[1, 2]"}}]}],
            "messages[0].tool_calls[0].function.arguments: expected a JSON object, got JSON list",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": 12}}]}],
            "messages[0].tool_calls[0].function.arguments: expected a JSON object string or a dict, got int",
        ),
        (
            [{"role": "assistant", "tool_calls": [{**CALL, "id": 5}]}],
            "messages[0].tool_calls[0].id: expected a string, got int",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "content": "3"}],
            "messages[1]: a tool message must follow an assistant message with tool_calls",
        ),
        ([{"role": "tool", "content": "3"}], "messages[0]: a tool message must follow an assistant message"),
        (
            [ASSISTANT_CALL, {"role": "tool", "tool_call_id": "call_9", "content": "3"}],
            "messages[1].tool_call_id: 'call_9' matches no tool call of messages[0] (call_1)",
        ),
        (
            [ASSISTANT_CALL, {"role": "tool", "tool_call_id": 9, "content": "3"}],
            "messages[1].tool_call_id: expected a string, got int",
        ),
        ([ASSISTANT_CALL, {"role": "tool"}], "messages[1].content: missing"),
        (
            [{"role": "assistant", "content": "x", "reasoning_content": ["a"]}],
            "messages[0].reasoning_content: expected a string, got list",
        ),
    ],
)
def test_invalid_messages_name_the_problem(messages, problem):
    with pytest.raises(InvalidMessagesError) as info:
        validate_messages(messages)
    assert str(info.value).startswith(problem)


def test_error_type_is_a_value_error_for_users():
    assert issubclass(InvalidMessagesError, ValueError)
    assert issubclass(InvalidMessagesError, LMDeployError)


def test_validating_twice_changes_nothing():
    # Callers may validate first and then render, which validates again.
    messages = (
        {"role": "user", "content": [{"type": "text", "text": "1+2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    )
    once = validate_messages(messages)
    twice = validate_messages(once)
    assert twice == once
    assert str(twice[1]["tool_calls"][0]["function"]["arguments"]) == CALL["function"]["arguments"]
