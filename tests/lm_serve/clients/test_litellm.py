"""LiteLLM through its `openai/` provider with `api_base`: streamed text and tool calls."""

from __future__ import annotations

import json

import pytest

litellm = pytest.importorskip("litellm")


@pytest.fixture(scope="module")
def complete(base_url, api_key):
    def call(**kwargs):
        return litellm.completion(model="openai/smol", api_base=base_url, api_key=api_key, temperature=0, **kwargs)

    return call


def test_stream_gives_the_same_text_as_a_whole_completion(complete):
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    chunks = list(complete(messages=messages, max_tokens=24, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = complete(messages=messages, max_tokens=24)
    assert text and text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_required_tool_calls_streamed_and_not(complete, question, weather_tool, no_closing_bracket):
    request = {
        "messages": [{"role": "user", "content": question}],
        "tools": [weather_tool],
        "tool_choice": "required",
        "max_tokens": 60,
        "logit_bias": no_closing_bracket,
    }
    whole = complete(**request)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls and all(name == "get_weather" for name, _ in calls)

    chunks = list(complete(**request, stream=True))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=request["messages"])
    streamed = [(c.function.name, json.loads(c.function.arguments)) for c in rebuilt.choices[0].message.tool_calls]
    assert streamed == calls
