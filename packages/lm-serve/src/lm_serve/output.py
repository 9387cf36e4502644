"""Pieces of OpenAI response objects shared by the routes: deltas, messages, finish reasons, usage, ids."""

from __future__ import annotations

import time
import uuid
from typing import Any

from lm_serve.parsers import DeltaMessage, ParsedMessage, ToolCallDelta


def new_id(prefix: str, sep: str = "-") -> str:
    """A unique id: `chatcmpl-<hex>` (chat and completions spell it so), or with `sep="_"` `resp_<hex>` (Responses)."""
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def now() -> int:
    """The current time in whole seconds since the epoch (OpenAI's `created`)."""
    return int(time.time())


def merge_deltas(a: DeltaMessage, b: DeltaMessage) -> DeltaMessage:
    """`a` then `b` as one delta; consecutive pieces of one call become one entry, as in OpenAI's chunks."""
    calls: list[ToolCallDelta] = []
    for call in [*a.tool_calls, *b.tool_calls]:
        last = calls[-1] if calls else None
        if last is not None and last.index == call.index and call.id is None and call.name is None:
            calls[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + call.arguments)
        else:
            calls.append(call)
    return DeltaMessage(
        content=a.content + b.content, reasoning_content=a.reasoning_content + b.reasoning_content, tool_calls=calls
    )


def delta_is_empty(d: DeltaMessage) -> bool:
    """Whether the delta carries nothing (no text, reasoning or tool call)."""
    return not (d.content or d.reasoning_content or d.tool_calls)


def delta_json(d: DeltaMessage) -> dict[str, Any]:
    """A chat chunk's `delta` (without the role, which only the first chunk of a choice carries)."""
    out: dict[str, Any] = {}
    if d.reasoning_content:
        out["reasoning_content"] = d.reasoning_content
    if d.content:
        out["content"] = d.content
    if d.tool_calls:
        calls = []
        for call in d.tool_calls:
            item: dict[str, Any] = {"index": call.index}
            function: dict[str, Any] = {}
            if call.id is not None:
                item["id"] = call.id
                item["type"] = "function"
            if call.name is not None:
                function["name"] = call.name
            function["arguments"] = call.arguments
            item["function"] = function
            calls.append(item)
        out["tool_calls"] = calls
    return out


def message_json(parsed: ParsedMessage) -> dict[str, Any]:
    """A non-streamed chat `message`."""
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning_content is not None:
        message["reasoning_content"] = parsed.reasoning_content
    if parsed.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parsed.tool_calls
        ]
    return message


def finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    """OpenAI's finish reason: a natural stop that produced calls is "tool_calls"."""
    if reason == "stop" and has_tool_calls:
        return "tool_calls"
    return reason


def usage_json(num_prompt: int, num_completion: int) -> dict[str, int]:
    """OpenAI's `usage` object."""
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }
