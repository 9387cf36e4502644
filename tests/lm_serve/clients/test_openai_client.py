"""The official openai client's helpers: `tool_choice="required"` (streamed through `chat.completions.stream`),
structured output with `chat.completions.parse` and a pydantic model, and pydantic function tools."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(base_url, api_key):
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)


def test_required_cut_by_max_tokens_returns_calls_not_text(client, question, weather_tool, no_closing_bracket):
    request = {
        "model": "smol",
        "messages": [{"role": "user", "content": question}],
        "tools": [weather_tool],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 60,
        "logit_bias": no_closing_bracket,
    }
    choice = client.chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)

    streamed: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for piece in chunk.choices[0].delta.tool_calls or []:
            streamed.setdefault(piece.index, [piece.function.name, ""])[1] += piece.function.arguments or ""
        assert not chunk.choices[0].delta.content
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    assert [tuple(streamed[i]) for i in sorted(streamed)] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


def test_required_through_the_stream_helper(client, question, weather_tool):
    # The helper assembles the calls from the deltas and fails on chunks that do not fit OpenAI's shape.
    request = {
        "model": "smol",
        "messages": [{"role": "user", "content": question}],
        "tools": [weather_tool],
        "tool_choice": "required",
        "temperature": 0,
        "max_completion_tokens": 200,
    }
    with client.chat.completions.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and not final.message.content
    assert final.message.tool_calls
    for call in final.message.tool_calls:
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    assert [e.type for e in events].count("tool_calls.function.arguments.done") == len(final.message.tool_calls)
    assert not any(e.delta for e in events if e.type == "content.delta")


def test_parse_with_a_pydantic_response_format(client, city_model):
    completion = client.chat.completions.parse(
        model="smol",
        messages=[{"role": "user", "content": "Name a city in France."}],
        response_format=city_model,
        temperature=0,
        max_tokens=80,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, city_model)
    assert city_model.model_validate_json(message.content) == message.parsed


def test_parse_with_a_strict_pydantic_function_tool(client, city_model):
    tool = openai.pydantic_function_tool(city_model, name="record_city")
    completion = client.chat.completions.parse(
        model="smol",
        messages=[{"role": "user", "content": "Record a city in France."}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "record_city"}},
        temperature=0,
        max_tokens=80,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "record_city" and isinstance(call.function.parsed_arguments, city_model)
