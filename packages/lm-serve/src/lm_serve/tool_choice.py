"""`tool_choice` -> what the prompt shows and what guided decoding enforces, and turning guided output into calls.

- "none": the tools are not rendered into the prompt and no call is recognised;
- "auto": the tools are rendered and the `--tool-call-parser` finds calls in the text;
- a named function: the output is constrained to that function's parameters schema and becomes one call;
- "required": the output is constrained to a JSON array of `{"name", "arguments"}` (one item unless
  `parallel_tool_calls`), which becomes the calls.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lm_serve.errors import APIError
from lm_serve.parsers import DeltaMessage, ParsedMessage, ToolCall, ToolCallDelta

NONE, AUTO, NAMED, REQUIRED = "none", "auto", "named", "required"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """How one request handles tools."""

    mode: str  # none | auto | named | required
    tools: list[dict[str, Any]] | None  # OpenAI tool dicts to render into the prompt (None: no tools)
    response_format: dict[str, Any] | None  # the guided-decoding constraint it needs, if any
    function_name: str | None = None  # the named function


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    parallel_tool_calls: bool,
    response_format: dict[str, Any] | None,
) -> ToolPlan:
    """Check `tools`/`tool_choice` and derive the plan (`tool_choice` is a string or `{"function": {"name"}}`)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError("tool_choice is only allowed when tools are given", param="tool_choice")
        return ToolPlan(NONE, None, response_format)
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if len(functions) != len(tools):
        raise APIError("tools: function names must be unique", param="tools")
    choice = tool_choice if tool_choice is not None else AUTO
    if choice == NONE:
        return ToolPlan(NONE, None, response_format)
    if choice == AUTO:
        return ToolPlan(AUTO, tools, response_format)
    if response_format is not None:
        raise APIError(
            "response_format cannot be combined with tool_choice 'required' or a named function "
            "(both constrain the output)",
            param="response_format",
        )
    if choice == REQUIRED:
        schema = _calls_array_schema(functions, parallel_tool_calls)
        return ToolPlan(
            REQUIRED, tools, {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": schema}}
        )
    name = choice["function"]["name"]
    if name not in functions:
        known = ", ".join(functions)
        message = f"tool_choice names function {name!r}, which is not among the tools ({known})"
        raise APIError(message, param="tool_choice")
    schema = _parameters_schema(functions[name])
    return ToolPlan(NAMED, tools, {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}, name)


def _parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    # A function without parameters takes an empty object.
    return function.get("parameters") or {"type": "object", "properties": {}}


def _calls_array_schema(functions: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    items = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "arguments": _parameters_schema(fn)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, fn in functions.items()
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": items[0] if len(items) == 1 else {"anyOf": items},
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


class NamedCallStream:
    """The whole output is the arguments of one call to `name`: streamed as argument deltas of call 0."""

    def __init__(self, name: str, id_factory: Callable[[], str] = new_call_id) -> None:
        self.name = name
        self.id_factory = id_factory
        self._started = False
        self._id: str | None = None

    def feed(self, text: str) -> DeltaMessage:
        if not text and self._started:
            return DeltaMessage()
        if not self._started:
            self._started = True
            self._id = self.id_factory()
            return DeltaMessage(tool_calls=[ToolCallDelta(0, id=self._id, name=self.name, arguments=text)])
        return DeltaMessage(tool_calls=[ToolCallDelta(0, arguments=text)])

    def finish(self) -> DeltaMessage:
        # A call with no output at all still exists (its arguments are empty).
        return self.feed("") if not self._started else DeltaMessage()

    def parse(self, text: str) -> ParsedMessage:
        return ParsedMessage(None, None, [ToolCall(self.id_factory(), self.name, text)])


class RequiredCallsStream:
    """The output is a JSON array of calls; it is held until the end, then released as whole calls.

    Output that is not such an array (cut short by max_tokens) is returned as content, not dropped.
    """

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        self.id_factory = id_factory
        self._text: list[str] = []

    def feed(self, text: str) -> DeltaMessage:
        self._text.append(text)
        return DeltaMessage()

    def finish(self) -> DeltaMessage:
        parsed = self.parse("".join(self._text))
        if parsed.content is not None:
            return DeltaMessage(content=parsed.content)
        deltas = [
            ToolCallDelta(i, id=c.id, name=c.name, arguments=c.arguments) for i, c in enumerate(parsed.tool_calls)
        ]
        return DeltaMessage(tool_calls=deltas)

    def parse(self, text: str) -> ParsedMessage:
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        valid = isinstance(items, list) and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict)
            for c in items
        )
        if not valid or not items:
            return ParsedMessage(text, None, [])
        calls = [ToolCall(self.id_factory(), c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in items]
        return ParsedMessage(None, None, calls)


def make_message_stream(plan: ToolPlan, state: Any, prompt_text: str, chat_template_kwargs: dict | None):
    """The object that turns one sequence's text into content, reasoning and tool-call deltas."""
    if plan.mode == NAMED:
        return NamedCallStream(plan.function_name)
    if plan.mode == REQUIRED:
        return RequiredCallsStream()
    from lm_serve.parsers import make_output_parser

    try:
        return make_output_parser(
            reasoning_parser=state.reasoning_parser,
            tool_parser=state.tool_parser if plan.mode == AUTO else None,
            tools=plan.tools if plan.mode == AUTO else None,
            prompt_text=prompt_text,
            chat_template_kwargs=chat_template_kwargs,
        )
    except ValueError as exc:
        raise APIError(str(exc)) from None
