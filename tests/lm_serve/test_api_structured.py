"""Tool calls and structured output through guided decoding (xgrammar in the engine), with the openai client.

The outputs are checked against the JSON schemas with jsonschema_rs, an independent validator.
"""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _validate(schema, instance):
    jsonschema_rs.validator_for(schema).validate(instance)


def test_named_tool_choice_returns_a_call_whose_arguments_fit_the_schema(client):
    reply = client.chat.completions.create(
        model="smol",
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _validate(WEATHER["function"]["parameters"], json.loads(call.function.arguments))


def test_named_tool_choice_streams_argument_deltas(client):
    stream = client.chat.completions.create(
        model="smol",
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    pieces, names, ids, finish = [], [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                pieces.append(call.function.arguments or "")
                if call.function.name:
                    names.append(call.function.name)
                if call.id:
                    ids.append(call.id)
            finish = choice.finish_reason or finish
    assert names == ["get_weather"] and len(ids) == 1 and finish == "tool_calls"
    _validate(WEATHER["function"]["parameters"], json.loads("".join(pieces)))


def test_required_tool_choice_returns_calls_of_the_given_tools(client):
    reply = client.chat.completions.create(
        model="smol",
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    _validate(schema[calls[0].function.name], json.loads(calls[0].function.arguments))
    assert reply.choices[0].finish_reason == "tool_calls"


def test_json_schema_response_format_parses_and_validates(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Invent a person and give their name and age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        temperature=0,
        max_tokens=60,
    )
    _validate(schema, json.loads(reply.choices[0].message.content))


def test_json_object_and_regex_formats(client):
    reply = client.chat.completions.create(
        model="smol", messages=MESSAGES, response_format={"type": "json_object"}, temperature=0, max_tokens=60
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    reply = client.chat.completions.create(
        model="smol",
        messages=MESSAGES,
        temperature=0,
        max_tokens=20,
        extra_body={"response_format": {"type": "regex", "regex": "(sunny|rainy|cloudy), [0-9]{1,2} degrees"}},
    )
    import re

    assert re.fullmatch(r"(sunny|rainy|cloudy), [0-9]{1,2} degrees", reply.choices[0].message.content)


def test_tool_choice_none_leaves_plain_content(client):
    reply = client.chat.completions.create(
        model="smol", messages=MESSAGES, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=8
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content
    plain = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == plain.choices[0].message.content


def _literal_regex(text: str) -> str:
    """A regex matching exactly `text` (only regex metacharacters escaped, as xgrammar's syntax expects)."""
    return "".join("\\" + c if c in "\\.^$*+?()[]{}|/" else c for c in text)


# What a Qwen3-style model writes: reasoning in <think> tags, then a Hermes tool call. Guided decoding makes the
# small default model write exactly this, so the parsers (--reasoning-parser qwen3 --tool-call-parser hermes on the
# shared server) are exercised end to end.
SCRIPTED = (
    "<think>\nThe user wants the weather.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
)


def test_auto_tool_choice_parses_calls_and_reasoning_streamed_or_not(client):
    kwargs = {
        "model": "smol",
        "messages": MESSAGES,
        "tools": [WEATHER],
        "temperature": 0,
        "max_tokens": 200,  # forced text may come out in short tokens
        "extra_body": {"response_format": {"type": "regex", "regex": _literal_regex(SCRIPTED)}},
    }
    reply = client.chat.completions.create(**kwargs)
    message = reply.choices[0].message
    assert message.content is None
    assert message.model_extra["reasoning_content"] == "The user wants the weather."
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].id.startswith("call_")

    content, reasoning, arguments, names = "", "", "", []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            for piece in choice.delta.tool_calls or []:
                arguments += piece.function.arguments or ""
                names += [piece.function.name] if piece.function.name else []
    assert content == "" and "<think>" not in reasoning
    assert reasoning == "The user wants the weather."
    assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris", "unit": "celsius"}


def test_reasoning_is_separate_from_content(client):
    scripted = "<think>2 and 2 make 4.</think>The answer is 4."
    reply = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        temperature=0,
        max_tokens=100,
        extra_body={"response_format": {"type": "regex", "regex": _literal_regex(scripted)}},
    )
    message = reply.choices[0].message
    assert message.content == "The answer is 4."
    assert message.model_extra["reasoning_content"] == "2 and 2 make 4."


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, ["no JSON value satisfies", "string", "integer"]),
        ({"type": "string", "enum": [7]}, ["no JSON value satisfies", "enum value 7"]),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "required": ["b"],
                "additionalProperties": False,
            },
            ["no JSON value satisfies", "'b'"],
        ),
        ({"type": "integer", "not": {"const": 3}}, ["keyword 'not'"]),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ["keyword 'uniqueItems'"]),
    ],
    ids=["allOf-types", "enum-type", "required-excluded", "not", "uniqueItems"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_unsatisfiable_or_unenforceable_schemas_are_400(client, schema, words, stream):
    with pytest.raises(openai.BadRequestError) as info:
        reply = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "Answer in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            max_tokens=16,
            stream=stream,
        )
        if stream:
            list(reply)
    assert info.value.status_code == 400
    error = info.value.body
    assert error["type"] == "invalid_request_error" and "response_format" in error["message"], error
    for word in words:
        assert word in error["message"], error


def test_a_tool_whose_parameters_cannot_be_satisfied_is_400(client):
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"enum": []}}}},
    }
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smol", messages=MESSAGES, tools=[tool], tool_choice="required", max_tokens=16
        )
    assert "enum is empty" in info.value.body["message"]
    # The server keeps serving guided requests.
    reply = client.chat.completions.create(
        model="smol", messages=MESSAGES, response_format={"type": "json_object"}, temperature=0, max_tokens=30
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
