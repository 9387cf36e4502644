"""InternLM2 / InternLM2.5 tool calls: the plugin action of their chat format.

The model writes its call after any text, as an action addressed to the plugin executor::

    Let me look that up.<|action_start|><|plugin|>
    {"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|>

`parameters` (InternLM's key) and `arguments` are both read. Other actions (`<|action_start|><|interpreter|>`,
code for the interpreter) are not function calls and stay content. The action tags are special tokens: the
server must detokenize with `skip_special_tokens=False` for them to reach the parser.
"""

from __future__ import annotations

from lm_serve.parsers.hermes import TaggedJsonToolParser


class InternLM2ToolParser(TaggedJsonToolParser):
    """InternLM2: `<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`."""

    tag = "<|action_start|><|plugin|>"
    close_tag = "<|action_end|>"
