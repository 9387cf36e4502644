"""LangChain's ChatOpenAI: `bind_tools(..., tool_choice="any")` (tool_choice "required" with parallel calls),
`with_structured_output` (JSON schema and function calling) and `.stream`."""

from __future__ import annotations

import pytest

langchain_openai = pytest.importorskip("langchain_openai")


@pytest.fixture(scope="module")
def chat(base_url, api_key):
    """A factory of ChatOpenAI models on the shared server (greedy unless told otherwise)."""

    def make(**kwargs):
        kwargs.setdefault("temperature", 0)
        return langchain_openai.ChatOpenAI(
            base_url=base_url, api_key=api_key, model="smol", max_retries=0, timeout=300, **kwargs
        )

    return make


@pytest.fixture(scope="module")
def weather():
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"sunny in {city}"

    return get_weather


def test_bind_tools_any_gets_tool_calls_never_text(chat, weather, question):
    message = chat(max_tokens=200).bind_tools([weather], tool_choice="any").invoke(question)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.content == "" and not message.invalid_tool_calls
    assert message.tool_calls and all(c["name"] == "get_weather" for c in message.tool_calls)
    assert all(isinstance(c["args"]["city"], str) for c in message.tool_calls)


def test_bind_tools_any_cut_by_max_tokens_gets_the_complete_calls(chat, weather, question, no_closing_bracket):
    model = chat(max_tokens=60, logit_bias={int(k): v for k, v in no_closing_bracket.items()})
    message = model.bind_tools([weather], tool_choice="any").invoke(question)
    assert message.response_metadata["finish_reason"] == "length"
    assert message.content == "" and not message.invalid_tool_calls
    assert message.tool_calls and all(c["name"] == "get_weather" for c in message.tool_calls)

    chunks = list(model.bind_tools([weather], tool_choice="any").stream(question))
    merged = sum(chunks[1:], chunks[0])
    assert merged.content == "" and not merged.invalid_tool_calls
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in message.tool_calls]
    assert merged.response_metadata["finish_reason"] == "length"


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat, city_model, method):
    model = chat(max_tokens=80).with_structured_output(city_model, method=method)
    city = model.invoke("Name a city in France.")
    assert isinstance(city, city_model)


def test_stream_gives_the_same_text_as_invoke(chat):
    model = chat(max_tokens=24)
    chunks = list(model.stream("Write one sentence about the sea."))
    merged = sum(chunks[1:], chunks[0])
    assert len([c for c in chunks if c.content]) > 1  # it really streamed
    whole = model.invoke("Write one sentence about the sea.")
    assert merged.content == whole.content and merged.content
    assert merged.response_metadata["finish_reason"] == whole.response_metadata["finish_reason"]
