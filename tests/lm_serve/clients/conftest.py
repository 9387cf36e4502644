"""What the real-client tests share: the shared server's base URL and a logit_bias that keeps a call array open.

These tests run in the opt-in `clients` nox session, which installs the clients; elsewhere each file is skipped.
"""

from __future__ import annotations

import os

import pytest

# LiteLLM fetches its model price list from GitHub at import unless told to use the copy it ships.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="session")
def base_url(api_server) -> str:
    """The shared server's OpenAI base URL (`.../v1`)."""
    return f"{api_server.url}/v1"


@pytest.fixture(scope="session")
def no_closing_bracket(default_model_dir) -> dict[str, int]:
    """A logit_bias that forbids every token whose text contains "]": a guided array of calls can then never close,
    so generation goes on writing calls until max_tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = [i for token, i in tokenizer.get_vocab().items() if "]" in tokenizer.convert_tokens_to_string([token])]
    assert ids
    return {str(i): -100 for i in ids}


QUESTION = "What is the weather in Paris?"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="session")
def question() -> str:
    """A question the weather tool answers."""
    return QUESTION


@pytest.fixture(scope="session")
def weather_tool() -> dict:
    """An OpenAI function tool with one short string parameter."""
    return WEATHER_TOOL


@pytest.fixture(scope="session")
def city_model():
    """A pydantic model for structured output: two short strings, so the default model finishes it quickly."""
    from pydantic import BaseModel, Field

    class City(BaseModel):
        """A city and the country it is in."""

        name: str = Field(max_length=20)
        country: str = Field(max_length=20)

    return City
