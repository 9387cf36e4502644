"""OpenAI-style chat messages: checking them and bringing them into the form chat templates expect.

A message is a dict::

    {"role": "system" | "user" | "assistant" | "tool" | "developer",
     "content": str | list[part] | None,
     # optional:
     "tool_calls": [{"id": str, "type": "function", "function": {"name": str, "arguments": str | dict}}],
     "tool_call_id": str, "name": str, "reasoning_content": str}

`validate_messages` returns normalized copies, with these rules:

* Keys whose value is None are dropped (OpenAI clients send ``"content": None`` next to tool calls; templates test
  whether a key is defined, and many would print "None").
* ``content`` stays as given: a string, or a list of parts such as ``{"type": "text", "text": ...}`` or
  ``{"type": "image_url", ...}``. Parts other than text are kept as they are for the vision packages. Whether a list
  of text-only parts is joined into one string is decided at rendering time, per template (see
  `lm_core.chat_template.ChatTemplate.render`), because some templates iterate over the parts.
* ``tool_calls[].function.arguments`` becomes a `ToolCallArguments`: a dict (Hugging Face templates expect the
  arguments as a mapping and apply ``tojson`` to them), which prints as its JSON text and joins with strings as that
  text, so templates that build the call by string concatenation (DeepSeek's) work too. A JSON string is parsed, and
  its exact text is kept for printing.
* An empty ``tool_calls`` list is dropped, like None.
* An assistant message without content (tool calls only, or reasoning only) gets ``"content": ""``. Templates test
  for "no text" in different ways (``is none``, ``is defined``, truthiness, string operations); an empty string
  passes all of them except ``is none``, while a missing key breaks e.g. Qwen3's and DeepSeek-V3.1's templates and
  None breaks Qwen3's and Command-R's.
* Other keys are kept as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, cast

from lm_core.errors import LMDeployError

Message = dict

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool", "developer")


class InvalidMessagesError(LMDeployError, ValueError):
    """A message list that is not a valid OpenAI-style conversation; the message names the index and field."""


class ToolCallArguments(dict[str, Any]):
    """A tool call's arguments: a dict that prints, and concatenates with strings, as its JSON text."""

    def __init__(self, arguments: Mapping[str, Any] | None = None, text: str | None = None) -> None:
        """`arguments` as a dict whose text is `text` (None: their JSON)."""
        super().__init__(arguments or {})
        # Underscore name: the template sandbox refuses it, so `arguments.text` still finds an argument called "text".
        self._text = json.dumps(self, ensure_ascii=False) if text is None else text

    def __str__(self) -> str:
        return self._text

    def __add__(self, other: object) -> Any:
        return self._text + other if isinstance(other, str) else NotImplemented

    def __radd__(self, other: object) -> Any:
        return other + self._text if isinstance(other, str) else NotImplemented

    def __reduce__(self) -> tuple[type[ToolCallArguments], tuple[dict[str, Any], str]]:
        return (type(self), (dict(self), self._text))


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _fail(where: str, problem: str) -> NoReturn:
    raise InvalidMessagesError(f"{where}: {problem}")


def _copy(value: Any) -> Any:
    # Copies the containers so later edits (ours or the caller's) do not leak through; leaves leaves (images...) alone.
    if isinstance(value, ToolCallArguments):
        return ToolCallArguments(value, str(value))
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in cast(Mapping[Any, Any], value).items()}
    if isinstance(value, list | tuple):
        return [_copy(item) for item in cast(Sequence[Any], value)]
    return value


def _check_str(where: str, value: Any) -> str:
    if not isinstance(value, str):
        _fail(where, f"expected a string, got {_type_name(value)}")
    return value


def _check_content(where: str, content: Any) -> str | list[Any]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list | tuple):
        _fail(where, f"expected a string or a list of content parts, got {_type_name(content)}")
    parts: list[Any] = []
    part: Any
    for j, part in enumerate(cast(Sequence[Any], content)):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            _fail(at, f"expected a content part dict like {{'type': 'text', 'text': ...}}, got {_type_name(part)}")
        if "type" not in part:
            _fail(f"{at}.type", "missing")
        _check_str(f"{at}.type", part["type"])
        if part["type"] == "text":
            if "text" not in part:
                _fail(f"{at}.text", "missing")
            _check_str(f"{at}.text", part["text"])
        parts.append(_copy(part))
    return parts


def parse_tool_arguments(arguments: Any, where: str = "arguments") -> ToolCallArguments:
    """Tool call arguments (a JSON object string or a mapping) as `ToolCallArguments`."""
    if isinstance(arguments, ToolCallArguments):
        return ToolCallArguments(_copy(dict(arguments)), str(arguments))
    if isinstance(arguments, Mapping):
        return ToolCallArguments(_copy(arguments))
    if not isinstance(arguments, str):
        _fail(where, f"expected a JSON object string or a dict, got {_type_name(arguments)}")
    try:
        parsed: Any = json.loads(arguments)
    except json.JSONDecodeError as e:
        _fail(where, f"not valid JSON ({e})")
    if not isinstance(parsed, dict):
        _fail(where, f"expected a JSON object, got JSON {_type_name(parsed)}")
    return ToolCallArguments(cast(dict[str, Any], parsed), arguments)


def _check_tool_calls(where: str, tool_calls: Any) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list | tuple):
        _fail(where, f"expected a list of tool calls, got {_type_name(tool_calls)}")
    checked: list[dict[str, Any]] = []
    given: Any
    for j, given in enumerate(cast(Sequence[Any], tool_calls)):
        at = f"{where}[{j}]"
        if not isinstance(given, Mapping):
            _fail(at, f"expected a dict like {{'type': 'function', 'function': {{...}}}}, got {_type_name(given)}")
        call: dict[str, Any] = {
            key: value for key, value in cast(Mapping[str, Any], given).items() if value is not None
        }
        if call.setdefault("type", "function") != "function":
            _fail(f"{at}.type", f"{call['type']!r} is not supported; only 'function' tool calls are")
        if "id" in call:
            _check_str(f"{at}.id", call["id"])
        given_function: Any = call.get("function")
        if given_function is None:
            _fail(f"{at}.function", "missing")
        if not isinstance(given_function, Mapping):
            _fail(f"{at}.function", f"expected a dict with 'name' and 'arguments', got {_type_name(given_function)}")
        function: dict[str, Any] = {
            key: _copy(value) for key, value in cast(Mapping[str, Any], given_function).items() if value is not None
        }
        if "name" not in function:
            _fail(f"{at}.function.name", "missing")
        if not _check_str(f"{at}.function.name", function["name"]):
            _fail(f"{at}.function.name", "empty")
        if "arguments" not in function:
            _fail(f"{at}.function.arguments", "missing")
        function["arguments"] = parse_tool_arguments(function["arguments"], f"{at}.function.arguments")
        checked.append({**{key: _copy(value) for key, value in call.items()}, "function": function})
    return checked


def _check_tool_message(where: str, index: int, message: dict[str, Any], previous: list[dict[str, Any]]) -> None:
    # OpenAI's rule: tool results answer the assistant message with tool calls that precedes them.
    k = index - 1
    while k >= 0 and previous[k]["role"] == "tool":
        k -= 1
    caller = previous[k] if k >= 0 else None
    if caller is None or caller["role"] != "assistant" or not caller.get("tool_calls"):
        _fail(where, "a tool message must follow an assistant message with tool_calls (or other tool messages)")
    call_id = message.get("tool_call_id")
    calls: list[dict[str, Any]] = caller["tool_calls"]
    ids: list[str] = [call["id"] for call in calls if "id" in call]
    if call_id is not None and ids and call_id not in ids:
        _fail(f"{where}.tool_call_id", f"{call_id!r} matches no tool call of messages[{k}] ({', '.join(ids)})")


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checks an OpenAI-style message list; returns normalized copies (see the module docstring for the rules).

    Raises `InvalidMessagesError` (a ValueError) naming the index and field, e.g.
    "messages[2].role: 'robot' is not one of system, user, assistant, tool, developer".
    """
    given = cast(object, messages)
    if isinstance(given, str | bytes | Mapping) or not isinstance(given, Sequence):
        _fail("messages", f"expected a list of message dicts, got {_type_name(messages)}")
    if not messages:
        _fail("messages", "empty; pass at least one message")
    checked: list[dict[str, Any]] = []
    item: object
    for i, item in enumerate(cast(Sequence[object], messages)):
        where = f"messages[{i}]"
        if not isinstance(item, Mapping):
            _fail(where, f"expected a dict with 'role' and 'content', got {_type_name(item)}")
        message: dict[str, Any] = {
            key: value for key, value in cast(Mapping[str, Any], item).items() if value is not None
        }
        if "role" not in message:
            _fail(f"{where}.role", "missing")
        role = _check_str(f"{where}.role", message["role"])
        if role not in ROLES:
            _fail(f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}")
        out = {key: _copy(value) for key, value in message.items()}
        if message.get("tool_calls") is not None:
            if role != "assistant":
                _fail(f"{where}.tool_calls", f"only assistant messages make tool calls, not {role} messages")
            out["tool_calls"] = _check_tool_calls(f"{where}.tool_calls", message["tool_calls"])
            if not out["tool_calls"]:
                del out["tool_calls"]
        if "content" in message:
            out["content"] = _check_content(f"{where}.content", message["content"])
        elif role == "assistant" and (out.get("tool_calls") or "reasoning_content" in message):
            out["content"] = ""
        else:
            hint = " (an assistant message needs content or tool_calls)" if role == "assistant" else ""
            _fail(f"{where}.content", f"missing{hint}")
        for key in ("name", "tool_call_id", "reasoning_content"):
            if key in message:
                _check_str(f"{where}.{key}", message[key])
        if role == "tool":
            _check_tool_message(where, i, out, checked)
        checked.append(out)
    return checked
