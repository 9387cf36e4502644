"""The parser names `--reasoning-parser` and `--tool-call-parser` accept, and `make_output_parser`."""

from __future__ import annotations

from lm_serve.parsers.base import IdFactory, OutputParser
from lm_serve.parsers.hermes import HermesToolParser
from lm_serve.parsers.internlm2 import InternLM2ToolParser
from lm_serve.parsers.llama3 import Llama3JsonToolParser
from lm_serve.parsers.mistral import MistralToolParser
from lm_serve.parsers.reasoning import DeepSeekR1ReasoningParser, ThinkReasoningParser

# Names are matched after lower-casing and turning "_" into "-", so `deepseek_r1` and `llama3_json` work too
# (the names LMDeploy and vLLM users already type).
REASONING_PARSERS: dict[str, type] = {
    "deepseek-r1": DeepSeekR1ReasoningParser,
    "qwen-qwq": DeepSeekR1ReasoningParser,
    "qwen3": ThinkReasoningParser,
    "think": ThinkReasoningParser,
}
TOOL_PARSERS: dict[str, type] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,
    "qwen2.5": HermesToolParser,
    "qwen2d5": HermesToolParser,
    "qwen3": HermesToolParser,
    "llama3": Llama3JsonToolParser,
    "llama3-json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "internlm2": InternLM2ToolParser,
    "internlm": InternLM2ToolParser,
}


def normalize_parser_name(name: str) -> str:
    """The registry key for a user-typed parser name."""
    return name.strip().lower().replace("_", "-")


def _lookup(table: dict[str, type], name: str, field: str) -> type:
    if not isinstance(name, str) or normalize_parser_name(name) not in table:
        raise ValueError(f"{field}: unknown parser {name!r}; known: {', '.join(sorted(table))}")
    return table[normalize_parser_name(name)]


def make_output_parser(
    reasoning_parser: str | None = None,
    tool_parser: str | None = None,
    tools: list[dict] | None = None,
    prompt_text: str | None = None,
    chat_template_kwargs: dict | None = None,
    id_factory: IdFactory | None = None,
) -> OutputParser:
    """Builds the parser of one generated sequence.

    Tool calls are looked for only when the request has tools (a non-empty list) and a `tool_parser` is named;
    otherwise all text that is not reasoning is content. `prompt_text` (the rendered prompt) and
    `chat_template_kwargs` tell the reasoning parser whether the output starts inside the reasoning.
    `id_factory` makes call ids (default: `call_` + random hex; 9 letters and digits for `mistral`).
    Unknown names raise ValueError listing the known ones.
    """
    reasoning_cls = _lookup(REASONING_PARSERS, reasoning_parser, "reasoning_parser") if reasoning_parser else None
    tool_cls = _lookup(TOOL_PARSERS, tool_parser, "tool_parser") if tool_parser else None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"tools must be a list of tool objects (dicts), got {type(tools).__name__}")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise ValueError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
    if id_factory is not None and not callable(id_factory):
        raise ValueError("id_factory must be callable")
    reasoning = reasoning_cls(prompt_text, chat_template_kwargs) if reasoning_cls else None
    tool = tool_cls(tools, id_factory) if tool_cls and tools else None
    return OutputParser(reasoning, tool)
