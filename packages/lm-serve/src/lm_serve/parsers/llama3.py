"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: the whole message is the call.

Llama 3's template asks for `{"name": function name, "parameters": dictionary of argument name and its value}`
and the model answers with just that object, sometimes after the `<|python_tag|>` token, and for several calls
with objects separated by `;`::

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

Without a tag to announce it, a call is recognised only at the very start of the message (after whitespace), and
only if its name is one of the request's tools: `{"name": "Ada", "age": 36}` asked for as a JSON answer stays
content. Any message that does not open with such a call is content, whole. `parameters` and `arguments` are
both read.
"""

from __future__ import annotations

from lm_serve.parsers.markers import is_proper_prefix, skip_whitespace
from lm_serve.parsers.tool_stream import CONTENT, StreamingToolParser

PYTHON_TAG = "<|python_tag|>"

_START = "start"  # the message's first characters: whitespace, the python tag, then "{"
_AFTER_OBJECT = "after_object"  # a call closed: ";" and another call, or the end
_SEPARATOR = "separator"  # after ";": another call must follow


class Llama3JsonToolParser(StreamingToolParser):
    """Llama 3.x: `{"name": ..., "parameters": {...}}` (optionally `<|python_tag|>` first, `;` between calls)."""

    def __init__(self, tools: list[dict], id_factory=None) -> None:
        super().__init__(tools, id_factory)
        self._state = _START
        self._is_tag_seen = False

    def _accept_name(self, name: str) -> bool:
        return not self.tool_names or name in self.tool_names

    def _step(self, final: bool) -> bool:
        state = self._state
        if state == CONTENT:  # the rest of the message is plain content
            self._emit_content(self._buf)
            self._buf = ""
            return False
        if state == "call_object":
            return self._step_call_object(final)
        if state == _AFTER_OBJECT:
            if not self._drop_whitespace():
                return False
            if self._buf[0] == ";":
                self._take(1)
                self._state = _SEPARATOR
            elif self._buf[0] == "{":
                self._begin_call_object(_AFTER_OBJECT, self._accept_name)
            else:
                self._state = CONTENT
            return True
        # _START and _SEPARATOR: whitespace (held), then a call object
        self._take(skip_whitespace(self._buf))
        rest = self._buf
        if state == _START and not self._is_tag_seen and rest.startswith(PYTHON_TAG):
            self._take(len(PYTHON_TAG))
            self._is_tag_seen = True
            return True
        if rest.startswith("{"):
            self._begin_call_object(_AFTER_OBJECT, self._accept_name)
            return True
        could_be_tag = state == _START and not self._is_tag_seen and is_proper_prefix(rest, PYTHON_TAG)
        if (not rest or could_be_tag) and not final:
            return False
        return self._fail()
