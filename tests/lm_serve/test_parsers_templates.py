"""Round trip through the models' own chat templates: the assistant turn a real template renders for tool calls
(and reasoning) is the text the model was trained to write, so parsing it must give back the same calls.

The templates are the real ones kept in tests/lm_core/fixtures/chat_templates, rendered by lm_core (checked
against transformers there). The rendered turn is what the model would generate after the prompt, minus its
end-of-turn token, which the engine stops on.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lm_core.chat_template import load_chat_template
from lm_serve.parsers import make_output_parser

FIXTURES = Path(__file__).parents[1] / "lm_core" / "fixtures" / "chat_templates"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City."}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Web search.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "Query."}}},
    },
}
ARGUMENTS = [
    {"city": "Zürich"},
    {"query": 'braces } and <tool_call> and "quotes"', "filters": {"year": [2024, 2025], "exact": True}},
]
USER = {"role": "user", "content": "Weather in Zürich, and search something."}


def assistant_turn(num_calls: int, content: str | None, reasoning: str | None = None) -> dict:
    calls = [
        {
            "id": f"call{i}abcd",  # 9 characters: Mistral's template insists
            "type": "function",
            "function": {"name": ["get_weather", "search"][i], "arguments": ARGUMENTS[i]},
        }
        for i in range(num_calls)
    ]
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def generated_text(fixture: str, assistant: dict, end_of_turn: str, **kwargs) -> tuple[str, str]:
    """(prompt, the assistant's output) as the real template renders them."""
    template = load_chat_template(FIXTURES / f"{fixture}.json")
    prompt = template.render([USER], tools=[WEATHER, SEARCH], add_generation_prompt=True, **kwargs)
    full = template.render([USER, assistant], tools=[WEATHER, SEARCH], add_generation_prompt=False, **kwargs)
    assert full.startswith(prompt) and full.endswith(end_of_turn)
    return prompt, full[len(prompt) : len(full) - len(end_of_turn)]


# (fixture, tool parser, reasoning parser, end-of-turn token, number of calls, content, reasoning)
ROUND_TRIPS = [
    ("qwen2.5-7b-instruct", "qwen2.5", None, "<|im_end|>\n", 1, None, None),
    ("qwen2.5-7b-instruct", "qwen2.5", None, "<|im_end|>\n", 2, "Checking both.", None),
    ("qwen3-0.6b", "qwen3", "qwen3", "<|im_end|>\n", 2, None, "Two tools are needed."),
    ("qwen3-0.6b", "qwen3", "qwen3", "<|im_end|>\n", 1, "Let me look.", "The user wants weather."),
    ("hermes-3-llama-3.1-8b-tool-use", "hermes", None, "<|im_end|>\n", 2, "", None),
    ("llama-3.3-70b-instruct", "llama3", None, "<|eot_id|>", 1, None, None),
    ("mistral-nemo-instruct-2407", "mistral", None, "</s>", 1, None, None),
    ("mistral-nemo-instruct-2407", "mistral", None, "</s>", 2, None, None),
]


@pytest.mark.parametrize(
    ("fixture", "tool_parser", "reasoning_parser", "end_of_turn", "num_calls", "content", "reasoning"),
    [pytest.param(*case, id=f"{case[0]}-{case[4]}calls") for case in ROUND_TRIPS],
)
def test_template_rendered_calls_parse_back(
    fixture, tool_parser, reasoning_parser, end_of_turn, num_calls, content, reasoning
):
    assistant = assistant_turn(num_calls, content, reasoning)
    prompt, text = generated_text(fixture, assistant, end_of_turn)
    for arguments_as_string in (False, True):  # OpenAI clients send arguments back as JSON strings
        if arguments_as_string:
            assistant = copy.deepcopy(assistant)
            for call in assistant["tool_calls"]:
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
            prompt, text = generated_text(fixture, assistant, end_of_turn)
        parser = make_output_parser(
            reasoning_parser=reasoning_parser, tool_parser=tool_parser, tools=[WEATHER, SEARCH], prompt_text=prompt
        )
        parsed = parser.parse(text)
        assert parsed.content == (content or None), text
        assert parsed.reasoning_content == reasoning, text
        assert [call.name for call in parsed.tool_calls] == ["get_weather", "search"][:num_calls], text
        assert [json.loads(call.arguments) for call in parsed.tool_calls] == ARGUMENTS[:num_calls], text


def test_qwen3_thinking_off_prompt_makes_everything_content():
    """With enable_thinking=False Qwen3's template closes the think block in the prompt: no reasoning to find."""
    template = load_chat_template(FIXTURES / "qwen3-0.6b.json")
    prompt = template.render([USER], enable_thinking=False)
    parser = make_output_parser(reasoning_parser="qwen3", prompt_text=prompt)
    assert parser.parse("It is 4 degrees. </think> stays.").content == "It is 4 degrees. </think> stays."
