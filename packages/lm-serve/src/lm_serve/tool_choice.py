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
from typing import TYPE_CHECKING, Any

from lm_serve.errors import APIError
from lm_serve.parsers import DeltaMessage, ParsedMessage, ToolCall, ToolCallDelta, accumulate
from lm_serve.parsers.base import OutputParser
from lm_serve.parsers.json_scan import JsonScanner
from lm_serve.parsers.markers import skip_whitespace

if TYPE_CHECKING:
    from lm_serve.state import ServerState

NONE, AUTO, NAMED, REQUIRED = "none", "auto", "named", "required"
# Where RequiredCallsStream is in the array: "[" expected, a call or "]", a call, "," or "]", inside a call object,
# after the "]", and output that is not an array of calls.
_ARRAY_OPEN, _ARRAY_FIRST, _ARRAY_NEXT, _AFTER_CALL, _ELEMENT, _ARRAY_CLOSED, _NOT_CALLS = range(7)


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id (`call_<24 hex>`)."""
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
        """The next piece of the call's arguments (the first piece opens the call with its id and name)."""
        if not text and self._started:
            return DeltaMessage()
        if not self._started:
            self._started = True
            self._id = self.id_factory()
            return DeltaMessage(tool_calls=[ToolCallDelta(0, id=self._id, name=self.name, arguments=text)])
        return DeltaMessage(tool_calls=[ToolCallDelta(0, arguments=text)])

    def finish(self) -> DeltaMessage:
        """End of generation: a call that got no output still opens (with empty arguments)."""
        # A call with no output at all still exists (its arguments are empty).
        return self.feed("") if not self._started else DeltaMessage()

    def parse(self, text: str) -> ParsedMessage:
        """The whole output as the one call's arguments."""
        return ParsedMessage(None, None, [ToolCall(self.id_factory(), self.name, text)])


class RequiredCallsStream:
    """The output is a JSON array of `{"name", "arguments"}` objects; each call goes out whole once its object closes.

    Guided decoding makes the text such an array, so only its end can be missing (max_tokens or a stop string cut
    it): the calls whose objects closed are returned and an unfinished one is dropped, never sent as content.
    Text that the array grammar excludes (a broken grammar) comes back as content from the first element that is not
    a call on (whitespace after the array is dropped), so that it is visible rather than lost.
    """

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        self.id_factory = id_factory
        self._buf = ""
        self._state = _ARRAY_OPEN
        self._scanner = JsonScanner()  # the element being read (a new one per element)
        self._element: list[str] = []  # its text so far
        self._num_calls = 0
        self._is_finished = False

    def feed(self, text: str) -> DeltaMessage:
        """Takes the next piece of output; returns the calls whose objects closed in it."""
        if self._is_finished:
            raise RuntimeError("RequiredCallsStream.feed() after finish()")
        self._buf += text
        calls: list[ToolCallDelta] = []
        content = ""
        while self._buf and self._state != _NOT_CALLS:
            if self._state == _ELEMENT:
                call = self._step_element()
                if call is not None:
                    calls.append(call)
                continue
            self._buf = self._buf[skip_whitespace(self._buf) :]
            if not self._buf:
                break
            ch = self._buf[0]
            if self._state == _ARRAY_OPEN and ch == "[":
                self._state = _ARRAY_FIRST
            elif self._state in (_ARRAY_FIRST, _ARRAY_NEXT) and ch == "{":
                self._state, self._scanner, self._element = _ELEMENT, JsonScanner(), []
                continue
            elif self._state == _AFTER_CALL and ch == ",":
                self._state = _ARRAY_NEXT
            elif self._state in (_AFTER_CALL, _ARRAY_FIRST) and ch == "]":
                self._state = _ARRAY_CLOSED
            else:
                self._state = _NOT_CALLS
                continue
            self._buf = self._buf[1:]
        if self._state == _NOT_CALLS:
            content, self._element, self._buf = "".join(self._element) + self._buf, [], ""
        return DeltaMessage(content=content, tool_calls=calls)

    def _step_element(self) -> ToolCallDelta | None:
        """Feeds the buffer to the element's scanner; the call, once its object has closed and is a call."""
        n = self._scanner.feed(self._buf)
        self._element.append(self._buf[:n])
        self._buf = self._buf[n:]
        if self._scanner.is_invalid:
            self._state = _NOT_CALLS
            return None
        if not self._scanner.is_done:
            return None
        item = json.loads("".join(self._element))
        name, arguments = item.get("name"), item.get("arguments")
        if set(item) != {"name", "arguments"} or not isinstance(name, str) or not isinstance(arguments, dict):
            self._state = _NOT_CALLS
            return None
        self._state, self._element = _AFTER_CALL, []
        index, self._num_calls = self._num_calls, self._num_calls + 1
        return ToolCallDelta(index, self.id_factory(), name, json.dumps(arguments, ensure_ascii=False))

    def finish(self) -> DeltaMessage:
        """End of generation: an unfinished call is dropped (the finish reason says the output was cut)."""
        self._is_finished = True
        self._element, self._buf = [], ""
        return DeltaMessage()

    def parse(self, text: str) -> ParsedMessage:
        """The whole output at once (exactly `feed(text)` + `finish()`, joined)."""
        return accumulate([self.feed(text), self.finish()])


# What turns one sequence's text into deltas: `feed(text)`, `finish()` and `parse(whole_text)`.
MessageStream = NamedCallStream | RequiredCallsStream | OutputParser


def make_message_stream(
    plan: ToolPlan, state: ServerState, prompt_text: str, chat_template_kwargs: dict[str, Any] | None
) -> MessageStream:
    """The object that turns one sequence's text into content, reasoning and tool-call deltas."""
    if plan.mode == NAMED and plan.function_name is not None:
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
