"""Incremental JSON checking for tool-call markup: how far a growing text is a valid JSON prefix.

The tool parsers stream a call's arguments as the model writes them, so after every chunk they must know whether
the text so far can still be valid JSON, where each member of the call object starts and ends, and whether the
object has closed. `json.loads` only answers for a finished text; `JsonScanner` answers as the text grows, looking
at each character once (runs of plain string characters in one regex step).

The grammar is RFC 8259, strictly: no raw control characters inside strings, no trailing commas, no NaN (a client
parsing the arguments with `json.loads` or `JSON.parse` would fail on those).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from lm_serve.parsers.markers import match_length

_STRING_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_DIGIT_RUN = re.compile(r"[0-9]+")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrt')
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_VALUE_STARTS = frozenset('{["-0123456789tfn')

# Scanner states. The _NUM_* ones follow the number grammar -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
(
    _VALUE,  # a value must come (whitespace allowed)
    _OBJECT_FIRST,  # just after "{": a key or "}"
    _OBJECT_KEY,  # just after ",": a key
    _COLON,
    _AFTER_VALUE,  # "," or the closing bracket
    _ARRAY_FIRST,  # just after "[": a value or "]"
    _STRING,
    _ESCAPE,  # after a backslash
    _UNICODE,  # inside \uXXXX
    _LITERAL,  # inside true / false / null
    _NUM_MINUS,
    _NUM_ZERO,
    _NUM_INT,
    _NUM_DOT,
    _NUM_FRAC,
    _NUM_EXP,
    _NUM_EXP_SIGN,
    _NUM_EXP_DIGITS,
) = range(18)
_SKIPS_WHITESPACE = frozenset({_VALUE, _OBJECT_FIRST, _OBJECT_KEY, _COLON, _AFTER_VALUE, _ARRAY_FIRST})


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class JsonScanner:
    """Checks one JSON value fed in pieces; stops at the value's end or before the first character that cannot
    continue it.

    Subclasses see the members of a top-level object through the `on_key`, `on_value_start` and `on_value_end`
    hooks (offsets count characters from the first one fed) and may reject the text there by returning False.
    """

    def __init__(self) -> None:
        self.pos = 0  # characters consumed so far
        self.is_done = False  # the value is complete (nothing after it was consumed)
        self.is_invalid = False  # the text cannot be (the start of) valid JSON; consuming stopped at `pos`
        self._stack: list[str] = []  # open containers, "{" or "["
        self._state = _VALUE
        self._is_key = False  # the string being scanned is an object key
        self._capture: list[str] | None = None  # raw text of the current top-level member string
        self._literal_rest = ""
        self._hex_left = 0

    def on_key(self, key: str) -> bool:
        """A key of the top-level object was read."""
        return True

    def on_value_start(self, offset: int, first_char: str) -> bool:
        """A value of the top-level object starts at `offset`; False rejects it (nothing of it is consumed)."""
        return True

    def on_value_end(self, offset: int, raw_string: str | None) -> bool:
        """A value of the top-level object ends before `offset`; `raw_string` is its JSON text if it is a string."""
        return True

    def feed(self, text: str) -> int:
        """Consumes characters of `text` until the value ends, an invalid character or the end; returns how many."""
        base = self.pos
        i = 0
        while i < len(text) and not (self.is_done or self.is_invalid):
            i = self._step(text, i, base)
        self.pos = base + i
        return i

    def _at_member_depth(self) -> bool:
        return len(self._stack) == 1 and self._stack[0] == "{"

    def _step(self, text: str, i: int, base: int) -> int:
        """Consumes the character(s) at `i`; returns the next index (== i when it stopped or must look again)."""
        state, ch = self._state, text[i]
        if state == _STRING:
            run = _STRING_RUN.match(text, i)
            if run:
                self._capture_text(run.group())
                return run.end()
            if ch == '"':
                self._capture_text(ch)
                self._end_string(base + i + 1)
            elif ch == "\\":
                self._capture_text(ch)
                self._state = _ESCAPE
            else:
                return self._invalid(i)  # a raw control character
            return i + 1
        if state == _ESCAPE:
            if ch == "u":
                self._state, self._hex_left = _UNICODE, 4
            elif ch in _ESCAPES:
                self._state = _STRING
            else:
                return self._invalid(i)
            self._capture_text(ch)
            return i + 1
        if state == _UNICODE:
            if ch not in _HEX_DIGITS:
                return self._invalid(i)
            self._hex_left -= 1
            if self._hex_left == 0:
                self._state = _STRING
            self._capture_text(ch)
            return i + 1
        if state in _SKIPS_WHITESPACE and ch in " \t\n\r":
            return i + 1
        if state == _VALUE:
            return self._start_value(ch, i, base)
        if state in (_OBJECT_FIRST, _OBJECT_KEY):
            if ch == "}" and state == _OBJECT_FIRST:
                return self._close(i, base)
            if ch != '"':
                return self._invalid(i)
            self._begin_string(is_key=True)
            return i + 1
        if state == _COLON:
            if ch != ":":
                return self._invalid(i)
            self._state = _VALUE
            return i + 1
        if state == _ARRAY_FIRST:
            return self._close(i, base) if ch == "]" else self._start_value(ch, i, base)
        if state == _AFTER_VALUE:
            is_object = self._stack[-1] == "{"
            if ch == ",":
                self._state = _OBJECT_KEY if is_object else _VALUE
                return i + 1
            if ch == ("}" if is_object else "]"):
                return self._close(i, base)
            return self._invalid(i)
        if state == _LITERAL:
            if ch != self._literal_rest[0]:
                return self._invalid(i)
            self._literal_rest = self._literal_rest[1:]
            if not self._literal_rest:
                self._end_value(base + i + 1, None)
            return i + 1
        return self._step_number(text, i, base)

    def _step_number(self, text: str, i: int, base: int) -> int:
        state, ch = self._state, text[i]
        is_digit = "0" <= ch <= "9"
        if state in (_NUM_INT, _NUM_FRAC, _NUM_EXP_DIGITS) and is_digit:
            return i + match_length(_DIGIT_RUN, text, i)
        if state == _NUM_MINUS and is_digit:
            self._state = _NUM_ZERO if ch == "0" else _NUM_INT
        elif state in (_NUM_DOT, _NUM_EXP_SIGN, _NUM_EXP) and is_digit:
            self._state = _NUM_FRAC if state == _NUM_DOT else _NUM_EXP_DIGITS
        elif state == _NUM_EXP and ch in "+-":
            self._state = _NUM_EXP_SIGN
        elif state in (_NUM_ZERO, _NUM_INT) and ch == ".":
            self._state = _NUM_DOT
        elif state in (_NUM_ZERO, _NUM_INT, _NUM_FRAC) and ch in "eE":
            self._state = _NUM_EXP
        elif state in (_NUM_ZERO, _NUM_INT, _NUM_FRAC, _NUM_EXP_DIGITS):
            # NOTE: a number only ends at the character after it, which then is looked at again in the new state.
            self._end_value(base + i, None)
            return i
        else:
            return self._invalid(i)
        return i + 1

    def _invalid(self, i: int) -> int:
        self.is_invalid = True
        return i

    def _capture_text(self, text: str) -> None:
        if self._capture is not None:
            self._capture.append(text)

    def _start_value(self, ch: str, i: int, base: int) -> int:
        if ch not in _VALUE_STARTS:
            return self._invalid(i)
        if self._at_member_depth() and not self.on_value_start(base + i, ch):
            return self._invalid(i)
        if ch in "{[":
            self._stack.append(ch)
            self._state = _OBJECT_FIRST if ch == "{" else _ARRAY_FIRST
        elif ch == '"':
            self._begin_string(is_key=False)
        elif ch == "-":
            self._state = _NUM_MINUS
        elif "0" <= ch <= "9":
            self._state = _NUM_ZERO if ch == "0" else _NUM_INT
        else:
            self._state, self._literal_rest = _LITERAL, _LITERALS[ch]
        return i + 1

    def _begin_string(self, is_key: bool) -> None:
        self._state, self._is_key = _STRING, is_key
        self._capture = ['"'] if self._at_member_depth() else None

    def _end_string(self, end: int) -> None:
        raw = "".join(self._capture) if self._capture is not None else None
        self._capture = None
        if not self._is_key:
            self._end_value(end, raw)
            return
        self._state = _COLON
        if raw is not None and not self.on_key(json.loads(raw)):
            self.is_invalid = True

    def _close(self, i: int, base: int) -> int:
        self._stack.pop()
        self._end_value(base + i + 1, None)
        return i + 1

    def _end_value(self, end: int, raw_string: str | None) -> None:
        """A value ended before offset `end` (for a container: its bracket was just popped)."""
        if not self._stack:
            self.is_done = True
            return
        self._state = _AFTER_VALUE
        if self._at_member_depth() and not self.on_value_end(end, raw_string):
            self.is_invalid = True


class CallObjectScanner(JsonScanner):
    """Scans `{"name": "...", "arguments": {...}}` (or `"parameters"`), noting the name and where the arguments are.

    The first `name` member must be a non-empty string (and pass `accept_name`); the first `arguments` or
    `parameters` member must be an object, or a string holding one (some models quote their arguments); other
    members are checked as JSON and ignored. A rule broken makes the scanner invalid at that character.
    """

    ARGUMENT_KEYS = ("arguments", "parameters")

    def __init__(self, accept_name: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.accept_name = accept_name
        self.name: str | None = None
        self.arguments_start: int | None = None  # offset of the arguments value's first character
        self.arguments_end: int | None = None  # offset just after it
        self.arguments_is_string = False
        self.decoded_arguments: str | None = None  # for quoted arguments: the JSON text inside the string
        self._key: str | None = None
        self._member: str | None = None  # "name" / "arguments" while that value is being scanned
        self._is_name_seen = False

    def on_key(self, key: str) -> bool:
        """Notes the key whose value comes next."""
        self._key = key
        return True

    def on_value_start(self, offset: int, first_char: str) -> bool:
        """Rejects a first `name` that is not a string and first arguments that are neither object nor string."""
        self._member = None
        if self._key == "name" and not self._is_name_seen:
            self._is_name_seen, self._member = True, "name"
            return first_char == '"'
        if self._key in self.ARGUMENT_KEYS and self.arguments_start is None:
            if first_char not in '{"':
                return False
            self._member, self.arguments_start = "arguments", offset
            self.arguments_is_string = first_char == '"'
        return True

    def on_value_end(self, offset: int, raw_string: str | None) -> bool:
        """Takes the name (rejected if empty or not accepted) or ends the arguments (a string must hold an object)."""
        member, self._member = self._member, None
        if member == "name":
            if raw_string is None:  # not a string
                return False
            name = json.loads(raw_string)
            if not name or (self.accept_name is not None and not self.accept_name(name)):
                return False
            self.name = name
        elif member == "arguments":
            self.arguments_end = offset
            if self.arguments_is_string:
                if raw_string is None:  # not a string
                    return False
                decoded = json.loads(raw_string)
                try:
                    is_object = isinstance(json.loads(decoded, parse_constant=_reject_constant), dict)
                except ValueError:
                    is_object = False
                if not is_object:
                    return False
                self.decoded_arguments = decoded
        return True
