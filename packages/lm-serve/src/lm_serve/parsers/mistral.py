"""Mistral tool calls after the `[TOOL_CALLS]` token, in both of Mistral's formats.

Mistral-7B-v0.3, Mistral-Nemo, Mixtral-8x22B and Mistral-Large-2407 (tokenizer v3) write a JSON list::

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]

Newer models (tokenizer v11+: Mistral-Small-3.2, Magistral, Devstral) write each call as name then arguments,
optionally with the call id the model chose::

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}

Mistral's templates reject call ids that are not 9 letters and digits when the conversation is sent back, so
this parser's default ids are such (`[CALL_ID]` ids are kept). `[TOOL_CALLS]` is a special token: the server
must detokenize with `skip_special_tokens=False` for it to reach the parser.
"""

from __future__ import annotations

import re
import secrets
import string

from lm_serve.parsers.json_scan import JsonScanner
from lm_serve.parsers.markers import is_proper_prefix, match_length
from lm_serve.parsers.tool_stream import CONTENT, StreamingToolParser

ARGS_TAG = "[ARGS]"
CALL_ID_TAG = "[CALL_ID]"
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")
_ID_CHARS = re.compile(r"[A-Za-z0-9]*")
_ALPHANUMERIC = string.ascii_letters + string.digits

_OPEN = "open"  # after [TOOL_CALLS]: "[" (list), "{" (one object) or a name
_LIST_ITEM = "list_item"  # inside the list, before an object
_AFTER_ITEM = "after_item"  # an object of the list closed: "," or "]"
_NAME = "name"  # name[ARGS]...: the name
_CALL_ID = "call_id"  # name[CALL_ID]id[ARGS]...: the id
_ARGUMENTS = "arguments"  # the arguments object after [ARGS]
_AFTER_CALLS = "after_calls"  # whitespace to drop, then content


def mistral_call_id() -> str:
    """A call id Mistral's templates accept: 9 random letters and digits."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


class MistralToolParser(StreamingToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` or `[TOOL_CALLS]name[ARGS]{...}`."""

    tag = "[TOOL_CALLS]"

    def __init__(self, tools: list[dict], id_factory=None) -> None:
        super().__init__(tools, id_factory)
        self._is_list = False
        self._name = ""
        self._call_id = ""

    @staticmethod
    def default_id_factory() -> str:
        """Mistral-shaped ids (9 letters and digits)."""
        return mistral_call_id()

    def _step(self, final: bool) -> bool:
        state = self._state
        if state == CONTENT:
            return self._step_content(final, next_state=_OPEN)
        if state == "call_object":
            return self._step_call_object(final)
        if state in (_OPEN, _LIST_ITEM):
            self._take(len(self._buf) - len(self._buf.lstrip()))
            if not self._buf:
                return self._fail() if final else False
            first = self._buf[0]
            if first == "{":
                self._is_list = self._is_list and state == _LIST_ITEM
                self._begin_call_object(after_object=_AFTER_ITEM)
            elif state == _OPEN and first == "[":
                self._take(1)
                self._is_list, self._state = True, _LIST_ITEM
            elif state == _OPEN and match_length(_NAME_CHARS, first):
                self._is_list, self._name, self._call_id, self._state = False, "", "", _NAME
            else:
                return self._fail()
            return True
        if state == _AFTER_ITEM:
            if not self._is_list:
                self._state = _AFTER_CALLS
                return True
            if not self._drop_whitespace():
                return False
            if self._buf[0] == ",":
                self._take(1)
                self._state = _LIST_ITEM
            elif self._buf[0] == "]":
                self._take(1, hold=False)
                self._state = _AFTER_CALLS
            else:
                self._state = CONTENT  # the list never closed: what follows is content
            return True
        if state in (_NAME, _CALL_ID):
            return self._step_name_or_id(final)
        if state == _ARGUMENTS:
            return self._step_arguments(final)
        # _AFTER_CALLS
        if not self._drop_whitespace():
            return False
        self._state = CONTENT
        return True

    def _step_name_or_id(self, final: bool) -> bool:
        """Reads `name` then `[ARGS]`, or `name[CALL_ID]id[ARGS]`; the call commits at the "{" after `[ARGS]`."""
        is_name = self._state == _NAME
        run = match_length(_NAME_CHARS if is_name else _ID_CHARS, self._buf)
        if is_name:
            self._name += self._buf[:run]
        else:
            self._call_id += self._buf[:run]
        self._take(run)
        buf = self._buf
        if buf.startswith(ARGS_TAG) and (self._name and (is_name or self._call_id)):
            self._take(len(ARGS_TAG))
            self._state = _ARGUMENTS
            return True
        if is_name and buf.startswith(CALL_ID_TAG) and self._name:
            self._take(len(CALL_ID_TAG))
            self._state = _CALL_ID
            return True
        tags = (ARGS_TAG, CALL_ID_TAG) if is_name else (ARGS_TAG,)
        if not final and (not buf or any(is_proper_prefix(buf, tag) for tag in tags)):
            return False
        return self._fail()

    def _step_arguments(self, final: bool) -> bool:
        """The arguments object after `[ARGS]`, streamed as it comes once its "{" is seen."""
        if self._call_index is None:
            if not self._buf:
                return self._fail() if final else False
            if self._buf[0] != "{":
                return self._fail()
            self._open_call(self._name, self._call_id or None)
            self._scanner = JsonScanner()
        scanner = self._json_scanner()
        if self._buf:
            n = scanner.feed(self._buf)
            self._emit_arguments(self._buf[:n])
            self._take(n, hold=False)
        if scanner.is_done:
            self._end_call()
            self._state = _AFTER_CALLS
            return True
        if scanner.is_invalid or final:
            self._end_call()
            self._state = CONTENT
            return True
        return False
