"""Streaming output parsers: reasoning (`<think>`) and tool calls (Hermes/Qwen, Llama 3, Mistral, InternLM2).

Pure Python (no third-party imports). One `OutputParser` per generated sequence, from `make_output_parser`;
`feed` / `finish` for a stream, `parse` for a whole text, with identical results. See docs/parsers.md.
"""

from lm_serve.parsers.base import (
    DeltaMessage,
    OutputParser,
    ParsedMessage,
    ReasoningParser,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    accumulate,
)
from lm_serve.parsers.registry import REASONING_PARSERS, TOOL_PARSERS, make_output_parser, normalize_parser_name

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "DeltaMessage",
    "OutputParser",
    "ParsedMessage",
    "ReasoningParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "accumulate",
    "make_output_parser",
    "normalize_parser_name",
]
