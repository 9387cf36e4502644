"""The Responses API with the official openai client: text, streaming events, function tools, input items."""

from __future__ import annotations

import json

import jsonschema_rs

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_text_response_equals_the_chat_answer(client):
    response = client.responses.create(
        model="smol", input="Name a fruit.", instructions="Answer briefly.", temperature=0, max_output_tokens=12
    )
    chat = client.chat.completions.create(
        model="smol",
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."}],
        temperature=0,
        max_tokens=12,
    )
    assert response.object == "response" and response.model == "smol"
    assert response.output_text == chat.choices[0].message.content
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens


def test_streamed_events_build_the_same_response(client):
    # A stop string (our extension) ends the answer early, so the response completes rather than running out.
    kwargs = {
        "model": "smol",
        "input": "Say hello to Ada.",
        "temperature": 0,
        "max_output_tokens": 48,
        "extra_body": {"stop": [".", "!", "\n"]},
    }
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed" and whole.status == "completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    # The client's own accumulator agrees (it checks the item/part bookkeeping of every event).
    with client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    assert final.output_text == whole.output_text


def test_named_function_tool_gives_a_function_call_item(client):
    kwargs = {
        "model": "smol",
        "input": "What is the weather in Rome?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "temperature": 0,
        "max_output_tokens": 40,
    }
    response = client.responses.create(**kwargs)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema_rs.validator_for(WEATHER["parameters"]).validate(json.loads(calls[0].arguments))
    events = list(client.responses.create(stream=True, **kwargs))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert arguments == done.arguments
    jsonschema_rs.validator_for(WEATHER["parameters"]).validate(json.loads(arguments))


def test_function_call_outputs_continue_a_conversation(client):
    response = client.responses.create(
        model="smol",
        input=[
            {"role": "user", "content": "What is the weather in Rome?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 25 degrees."},
        ],
        tools=[WEATHER],
        temperature=0,
        max_output_tokens=10,
    )
    assert response.output_text


def _literal_regex(text: str) -> str:
    return "".join("\\" + c if c in "\\.^$*+?()[]{}|/" else c for c in text)


def test_reasoning_and_a_parsed_call_become_their_own_items_streamed_or_not(client):
    # Guided decoding (our regex extension of text.format) makes the model write Qwen3-style reasoning and a Hermes
    # tool call; the shared server parses both (--reasoning-parser qwen3 --tool-call-parser hermes).
    scripted = (
        "<think>I need the weather.</think>"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    kwargs = {
        "model": "smol",
        "input": "What is the weather in Rome?",
        "tools": [WEATHER],
        "temperature": 0,
        "max_output_tokens": 120,
        "text": {"format": {"type": "regex", "regex": _literal_regex(scripted)}},
    }
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        streamed = stream.get_final_response()
    for response in (whole, streamed):
        kinds = [item.type for item in response.output]
        assert kinds == ["reasoning", "function_call"], kinds
        assert response.output[0].content[0].text == "I need the weather."
        call = response.output[1]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Rome"}
        assert response.output_text == ""
