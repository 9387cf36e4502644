"""`tool_choice` "required" with parallel calls, and forced calls cut by max_tokens, with the official openai client.

To make the model write more calls than `max_tokens` holds, whatever it would choose, the tests forbid every token
that contains "]" (`logit_bias` -100): the guided array can then never close. The generated text itself, read back
from the logprobs' tokens and split into JSON objects with `json.JSONDecoder.raw_decode`, is the reference for which
calls were complete when the output was cut.
"""

from __future__ import annotations

import json

import jsonschema_rs
import pytest

from tests.lm_serve import tool_fixtures

WEATHER = tool_fixtures.WEATHER_TOOL
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
MESSAGES = [{"role": "user", "content": tool_fixtures.QUESTION}]


@pytest.fixture(scope="module")
def no_closing_bracket(default_model_dir) -> dict[str, int]:
    """A logit_bias that forbids every token whose text contains "]"."""
    return tool_fixtures.ban_closing_bracket(default_model_dir)


def _complete_objects(text: str) -> list[dict]:
    """The JSON objects of the array `text` starts that are complete (the reference for the returned calls)."""
    assert text.startswith("[")
    decoder, objects, pos = json.JSONDecoder(), [], 1
    while True:
        while pos < len(text) and text[pos] in " \t\n\r,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return objects
        objects.append(item)


def _check_calls(calls: list[tuple[str, str, str]], generated: str) -> None:
    """`calls` ((id, name, arguments) each) are exactly the complete calls of `generated`, schema-valid."""
    expected = _complete_objects(generated)
    assert [(name, json.loads(arguments)) for _, name, arguments in calls] == [
        (item["name"], item["arguments"]) for item in expected
    ]
    for call_id, name, arguments in calls:
        assert call_id.startswith("call_")
        jsonschema_rs.validator_for(SCHEMAS[name]).validate(json.loads(arguments))
    assert len({call_id for call_id, _, _ in calls}) == len(calls)


def _request(**extra):
    return {
        "model": "smol",
        "messages": MESSAGES,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "temperature": 0,
        **extra,
    }


def test_required_cut_by_max_tokens_returns_the_complete_calls(client, no_closing_bracket):
    reply = client.chat.completions.create(**_request(max_tokens=70, logprobs=True, logit_bias=no_closing_bracket))
    choice = reply.choices[0]
    generated = "".join(t.token for t in choice.logprobs.content)
    assert not generated.rstrip().endswith("]")  # the array is cut
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 70
    assert choice.message.content is None
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert len(calls) >= 2  # parallel calls
    _check_calls(calls, generated)


def test_required_cut_by_max_tokens_streams_each_call_when_its_object_closes(client, no_closing_bracket):
    stream = client.chat.completions.create(
        **_request(max_tokens=70, logprobs=True, logit_bias=no_closing_bracket, stream=True)
    )
    tokens, content, finish = [], "", None
    calls: dict[int, list[str]] = {}
    opened_after_tokens = []  # how many tokens had been generated when each call's first chunk came
    for chunk in stream:
        (choice,) = chunk.choices
        tokens += [t.token for t in (choice.logprobs.content if choice.logprobs else None) or []]
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            if piece.id is not None:
                # OpenAI's shape: the first chunk of a call has its id and name, its arguments come after.
                assert piece.index == len(calls) and piece.function.name and piece.function.arguments == ""
                calls[piece.index] = [piece.id, piece.function.name, ""]
                opened_after_tokens.append(len(tokens))
            else:
                assert piece.function.name is None
                calls[piece.index][2] += piece.function.arguments
        finish = choice.finish_reason or finish
    generated = "".join(tokens)
    assert finish == "length" and content == ""
    assert len(calls) >= 2
    _check_calls([tuple(calls[i]) for i in sorted(calls)], generated)
    # Each call is sent once its object has closed, long before generation ends.
    for i, num_tokens in enumerate(opened_after_tokens):
        assert len(_complete_objects("".join(tokens[:num_tokens]))) == i + 1
    assert opened_after_tokens[0] < len(tokens) // 2


def test_required_with_parallel_calls_returns_calls_when_the_array_closes(client):
    reply = client.chat.completions.create(**_request(max_tokens=200, logprobs=True))
    choice = reply.choices[0]
    generated = "".join(t.token for t in choice.logprobs.content)
    assert generated.rstrip().endswith("]")
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls
    _check_calls(calls, generated)

    stream = client.chat.completions.create(**_request(max_tokens=200, stream=True))
    streamed: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        for piece in chunk.choices[0].delta.tool_calls or []:
            streamed.setdefault(piece.index, [piece.id, piece.function.name, ""])[2] += piece.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(n, json.loads(a)) for _, n, a in streamed.values()] == [(n, json.loads(a)) for _, n, a in calls]


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_cut_by_max_tokens_keeps_the_truncated_arguments(client, stream):
    request = {
        "model": "smol",
        "messages": MESSAGES,
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "temperature": 0,
        "max_tokens": 4,
    }
    full = client.chat.completions.create(**{**request, "max_tokens": 60})
    (whole,) = full.choices[0].message.tool_calls
    if stream:
        name, arguments, finish = None, "", None
        for chunk in client.chat.completions.create(**request, stream=True):
            for piece in chunk.choices[0].delta.tool_calls or []:
                assert piece.index == 0
                name = name or piece.function.name
                arguments += piece.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    else:
        choice = client.chat.completions.create(**request).choices[0]
        assert choice.message.content is None
        ((name, arguments),) = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        finish = choice.finish_reason
    # As OpenAI: the call comes with the arguments written so far (not JSON yet) and finish_reason "length".
    assert finish == "length" and name == "get_time"
    assert arguments and whole.function.arguments.startswith(arguments) and arguments != whole.function.arguments


@pytest.mark.parametrize(
    ("text", "expected_calls", "expected_content"),
    [
        ('[{"name": "get_time", "arguments": {"timezone": "a]}\\"{"}}]', [("get_time", {"timezone": 'a]}"{'})], None),
        # cut inside the second call: the first is returned, the unfinished one is dropped
        ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "argu', 1, None),
        ('[{"name": "get_weather", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "x"}}]', 2, None),
        ("[", [], None),
        # what the array grammar excludes comes back as content from the first element that is not a call
        ('[{"name": "get_time", "arguments": {}}, {"nam": 1}]', [("get_time", {})], '{"nam": 1}]'),
        ("Sure!", [], "Sure!"),
    ],
)
def test_required_calls_stream_is_independent_of_chunking(text, expected_calls, expected_content):
    import random

    from lm_serve.parsers import accumulate
    from lm_serve.tool_choice import RequiredCallsStream

    whole = RequiredCallsStream(lambda: "call_x").parse(text)
    assert whole.content == expected_content
    calls = [(c.name, json.loads(c.arguments)) for c in whole.tool_calls]
    assert len(calls) == expected_calls if isinstance(expected_calls, int) else calls == expected_calls
    if expected_content is None:
        assert calls == [(o["name"], o["arguments"]) for o in _complete_objects(text)]
    rng = random.Random(len(text))
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        stream = RequiredCallsStream(lambda: "call_x")
        deltas = [stream.feed(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert accumulate([*deltas, stream.finish()]) == whole
