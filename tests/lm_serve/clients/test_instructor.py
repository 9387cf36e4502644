"""instructor: a pydantic model extracted through a forced function call (its default mode), streamed and not."""

from __future__ import annotations

import pytest

instructor = pytest.importorskip("instructor")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(base_url, api_key):
    return instructor.from_openai(openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300))


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_create_returns_the_model(base_url, api_key, city_model, mode):
    raw = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    client = instructor.from_openai(raw, mode=getattr(instructor.Mode, mode))
    city, completion = client.chat.completions.create_with_completion(
        model="smol",
        messages=[{"role": "user", "content": "Name a city in France."}],
        response_model=city_model,
        temperature=0,
        max_tokens=80,
        max_retries=0,
    )
    assert isinstance(city, city_model)
    assert completion.choices[0].finish_reason in ("stop", "tool_calls")


def test_create_partial_streams_the_model(client, city_model):
    partials = list(
        client.chat.completions.create_partial(
            model="smol",
            messages=[{"role": "user", "content": "Name a city in France."}],
            response_model=city_model,
            temperature=0,
            max_tokens=80,
            max_retries=0,
        )
    )
    assert len(partials) > 1
    final = city_model.model_validate(partials[-1].model_dump())
    assert final.name and final.country
