"""What the real-client tests share: the shared server's base URL and a logit_bias that keeps a call array open.

These tests run in the opt-in `clients` nox session, which installs the clients; elsewhere each file is skipped.
"""

from __future__ import annotations

import os

import pytest

from tests.lm_serve import tool_fixtures

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
    return tool_fixtures.ban_closing_bracket(default_model_dir)


@pytest.fixture(scope="session")
def question() -> str:
    """A question the weather tool answers."""
    return tool_fixtures.QUESTION


@pytest.fixture(scope="session")
def weather_tool() -> dict:
    """An OpenAI function tool with one short string parameter."""
    return tool_fixtures.WEATHER_TOOL


@pytest.fixture(scope="session")
def city_model():
    """A pydantic model for structured output: two short strings, so the default model finishes it quickly."""
    from pydantic import BaseModel, Field

    class City(BaseModel):
        """A city and the country it is in."""

        name: str = Field(max_length=20)
        country: str = Field(max_length=20)

    return City
