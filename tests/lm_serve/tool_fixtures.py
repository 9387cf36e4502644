"""Tool definitions and a logit bias shared by the tool-choice tests and the real-client tests.

Imported as `tests.lm_serve.tool_fixtures`: under `--import-mode=importlib` pytest registers `tests` and
`tests.lm_serve` as packages of the rootdir before it imports a conftest or test module below them.
"""

from __future__ import annotations

from pathlib import Path

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


def ban_closing_bracket(model_dir: str | Path) -> dict[str, int]:
    """A logit_bias (-100) on every token of `model_dir`'s tokenizer whose text contains "]": a guided array of calls
    can then never close, so generation goes on writing calls until max_tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [i for token, i in tokenizer.get_vocab().items() if "]" in tokenizer.convert_tokens_to_string([token])]
    if not ids:
        raise ValueError(f"model_dir: the tokenizer of {model_dir} has no token containing ']'")
    return {str(i): -100 for i in ids}
