"""`StreamingToolParser`: the state-machine driver shared by the tool-call parsers, and JSON call objects in it.

A parser keeps the text it has not decided on in `_buf` and runs `_step` until a step needs more text. Markup it
has consumed but not yet proven to be a call is *held* (`_held`); if it turns out not to be one, it is released as
content unchanged (so a malformed call comes back as text, never dropped) and the text after the point of failure
is read again as content.

A call is *committed* (its id and name sent) as soon as its name is complete and its arguments object has begun;
from then on the arguments are streamed as the model writes them, as long as they are valid JSON. A committed
call cannot be taken back, which decides the two cases that happen after it: if the stream ends inside the
arguments (max_tokens), the call keeps the arguments written so far, as OpenAI does with finish_reason "length";
if the arguments stop being valid JSON, the call keeps its valid part and the text from the invalid character on
is content.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from lm_serve.parsers.base import IdFactory, ToolCallDelta, ToolParser
from lm_serve.parsers.json_scan import CallObjectScanner, JsonScanner
from lm_serve.parsers.markers import TagSplitter, skip_whitespace

CONTENT = "content"
_NOTHING_MORE = float("inf")  # `_args_emitted` once a call's arguments were sent whole


class StreamingToolParser(ToolParser):
    """Base of the tool parsers: content up to a tag, JSON call objects, held text and committed calls."""

    #: The tag that opens tool-call markup in content.
    tag = ""

    def __init__(self, tools: list[dict], id_factory: IdFactory | None = None) -> None:
        super().__init__(tools, id_factory)
        self._state = CONTENT
        self._splitter = TagSplitter(self.tag) if self.tag else None
        self._fallback = CONTENT  # where a failed piece of markup sends the parser
        self._buf = ""
        self._held: list[str] = []
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        # The call being read (None between calls).
        self._call_index: int | None = None
        self._scanner: JsonScanner | None = None
        self._object_pieces: list[str] = []  # the call object's text until the call is committed
        self._args_emitted: float = 0  # scanner offset up to which arguments were sent
        self._after_object = CONTENT

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Takes the next piece of content; returns the new content and tool-call deltas."""
        self._buf += text
        while self._step(final=False):
            pass
        return self._flush()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of generation: resolves everything held (`_step` must consume the buffer when `final`)."""
        while self._step(final=True):
            pass
        if self._buf or self._held:  # NOTE: every state must resolve at the end; this is a bug if it happens
            raise RuntimeError(f"{type(self).__name__} kept text at finish() in state {self._state!r}")
        return self._flush()

    @abc.abstractmethod
    def _step(self, final: bool) -> bool:
        """Takes one decision on `_buf`; returns False when it needs more text (or, when `final`, when done)."""

    def _flush(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas

    # -- small moves ------------------------------------------------------------------------------------------

    def _emit_content(self, text: str) -> None:
        if text:
            self._content.append(text)

    def _take(self, n: int, hold: bool = True) -> None:
        """Consumes `n` characters of the buffer as markup: held until a call is committed, or dropped."""
        if hold and n:
            self._held.append(self._buf[:n])
        self._buf = self._buf[n:]

    def _drop_whitespace(self) -> bool:
        """Drops leading whitespace (markup's own); True if there is text after it."""
        self._take(skip_whitespace(self._buf), hold=False)
        return bool(self._buf)

    def _fail(self) -> bool:
        """The held markup is not a call after all: it becomes content, and the buffer is read again."""
        self._emit_content("".join(self._held))
        self._held = []
        self._end_call()
        self._state = self._fallback
        return True

    def _open_call(self, name: str, call_id: str | None = None) -> None:
        """Commits a call: the held markup was its syntax, so it is dropped; id and name go out."""
        self._held = []
        self._call_index = self.num_calls
        self.num_calls += 1
        self._deltas.append(ToolCallDelta(self._call_index, call_id or self.id_factory(), name))

    def _emit_arguments(self, text: str) -> None:
        if not text:
            return
        if self._call_index is None:
            raise RuntimeError("tool-call arguments emitted outside a committed call")
        self._deltas.append(ToolCallDelta(self._call_index, arguments=text))

    def _json_scanner(self) -> JsonScanner:
        """The scanner of the JSON value being read (set when the value begins, dropped by `_end_call`)."""
        if self._scanner is None:
            raise RuntimeError("no JSON value is being read")
        return self._scanner

    def _call_object_scanner(self) -> CallObjectScanner:
        """The scanner of the call object being read (set by `_begin_call_object`)."""
        scanner = self._scanner
        if not isinstance(scanner, CallObjectScanner):
            raise RuntimeError("no call object is being read")
        return scanner

    def _end_call(self) -> None:
        self._call_index, self._scanner, self._object_pieces = None, None, []

    # -- content up to the tag --------------------------------------------------------------------------------

    def _step_content(self, final: bool, next_state: str) -> bool:
        """Emits content up to `tag`; holds the whitespace before the tag with the tag and goes to `next_state`."""
        if self._splitter is None:
            raise RuntimeError(f"{type(self).__name__} has no tag to split content at")
        released, whitespace, rest = self._splitter.push(self._buf, final)
        self._emit_content(released)
        self._buf = rest
        if whitespace is None:
            return False
        self._held = [whitespace + self.tag]
        self._state = next_state
        return True

    # -- a JSON call object: {"name": ..., "arguments": {...}} ---------------------------------------------------

    def _begin_call_object(self, after_object: str, accept_name: Callable[[str], bool] | None = None) -> None:
        """The buffer starts with "{": read a call object, then go to `after_object`."""
        self._scanner = CallObjectScanner(accept_name)
        self._object_pieces, self._args_emitted, self._after_object = [], 0, after_object
        self._state = "call_object"

    def _step_call_object(self, final: bool) -> bool:
        scanner = self._call_object_scanner()
        if self._buf:
            start = scanner.pos
            n = scanner.feed(self._buf)
            piece = self._buf[:n]
            if self._call_index is None:
                self._take(n)
                self._object_pieces.append(piece)
            else:
                self._take(n, hold=False)
                self._stream_arguments(piece, start)
        # NOTE: commit is tried before failure is checked: whether the call was committed must not depend on
        # whether the scanner stopped at an invalid character in this chunk or in a later one.
        if self._call_index is None and not self._try_commit():
            if scanner.is_invalid or scanner.is_done or final:
                return self._fail()
            return False
        if scanner.is_done:
            self._end_call()
            self._state = self._after_object
            return True
        if scanner.is_invalid or final:
            # Committed, then broken or cut off: the call keeps what it has; the rest is content.
            self._end_call()
            self._state = self._fallback
            return True
        return False

    def _try_commit(self) -> bool:
        """Commits the call once its name is known and its arguments have begun (or the object closed without)."""
        scanner = self._call_object_scanner()
        if scanner.name is None:
            return False
        if scanner.arguments_start is not None and not scanner.arguments_is_string:
            text = "".join(self._object_pieces)
            end = scanner.arguments_end if scanner.arguments_end is not None else scanner.pos
            self._open_call(scanner.name)
            self._emit_arguments(text[scanner.arguments_start : end])
            self._args_emitted = end
        elif scanner.decoded_arguments is not None or (scanner.is_done and scanner.arguments_start is None):
            self._open_call(scanner.name)
            self._emit_arguments(scanner.decoded_arguments if scanner.decoded_arguments is not None else "{}")
            self._args_emitted = _NOTHING_MORE
        else:
            return False
        self._object_pieces = []
        return True

    def _stream_arguments(self, piece: str, start: int) -> None:
        """Sends the part of `piece` (scanner offsets `start`...) that lies inside the arguments value."""
        scanner = self._call_object_scanner()
        end = scanner.arguments_end if scanner.arguments_end is not None else scanner.pos
        lo, hi = max(self._args_emitted, start), min(end, start + len(piece))
        if hi > lo:
            self._emit_arguments(piece[int(lo) - start : int(hi) - start])
            self._args_emitted = hi
