"""Tool calls as a JSON object between tags: Hermes, Qwen2.5 and Qwen3 (`<tool_call>`), and the shared machinery
for InternLM2 (`<|action_start|><|plugin|>`).

Qwen2.5/Qwen3 and Hermes-3 templates ask for, and their models write::

    Some text first, maybe.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {}}
    </tool_call>

Whitespace around the tags belongs to the markup. A block may hold several objects; a missing closing tag is
forgiven (the object's closing brace ends the call); text after a block is content again.
"""

from __future__ import annotations

from lm_serve.parsers.markers import is_proper_prefix
from lm_serve.parsers.tool_stream import CONTENT, StreamingToolParser

_OPEN = "open"  # after the opening tag, before the object's "{"
_AFTER_OBJECT = "after_object"  # the object closed: the closing tag, another object, or content
_AFTER_BLOCK = "after_block"  # the closing tag was read: whitespace to drop


class TaggedJsonToolParser(StreamingToolParser):
    """Tool calls written as `<open tag> {"name": ..., "arguments": {...}} <close tag>`."""

    tag = ""
    close_tag = ""

    def _step(self, final: bool) -> bool:
        state = self._state
        if state == CONTENT:
            return self._step_content(final, next_state=_OPEN)
        if state == "call_object":
            return self._step_call_object(final)
        if state == _OPEN:
            self._take(len(self._buf) - len(self._buf.lstrip()))
            if not self._buf:
                return self._fail() if final else False
            if self._buf[0] != "{":
                return self._fail()
            self._begin_call_object(after_object=_AFTER_OBJECT)
            return True
        if state == _AFTER_OBJECT:
            if not self._drop_whitespace():
                return False
            buf = self._buf
            if buf.startswith(self.close_tag):
                self._take(len(self.close_tag), hold=False)
                self._state = _AFTER_BLOCK
            elif is_proper_prefix(buf, self.close_tag) and not final:
                return False
            elif buf[0] == "{":
                self._begin_call_object(after_object=_AFTER_OBJECT)
            else:
                self._state = CONTENT  # a closing tag that never came, or text after the call
            return True
        # _AFTER_BLOCK
        if not self._drop_whitespace():
            return False
        self._state = CONTENT
        return True


class HermesToolParser(TaggedJsonToolParser):
    """Hermes-2/3, Qwen2.5 and Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

    tag = "<tool_call>"
    close_tag = "</tool_call>"
