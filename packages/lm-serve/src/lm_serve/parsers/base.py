"""The message model the parsers produce, and `OutputParser`: reasoning parser, then tool-call parser, per sequence.

A generated sequence reaches lm-serve as text pieces of any size. `OutputParser.feed` turns each piece into a
`DeltaMessage` (new content, new reasoning, new pieces of tool calls); `finish` flushes what was held back while it
could still be the start of markup. `parse` is the non-streamed path and is, by definition, `feed(text)` + `finish()`
joined by `accumulate`, so a streamed response can only differ from a non-streamed one if a parser decided
something differently depending on where the chunks were cut; every parser is written so that it never does
(each decision depends on the characters seen, never on where a chunk ended), and the tests check it with random
chunkings.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

IdFactory = Callable[[], str]


@dataclass
class ToolCall:
    """A complete tool call; `arguments` is a JSON object as a string, as the OpenAI API returns it."""

    id: str
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """A streamed piece of call number `index` (0, 1, ... within the message).

    `id` and `name` are set on the call's first delta only (the whole name at once); `arguments` is the next piece
    of the arguments string, so joining a call's pieces gives its `ToolCall.arguments`.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class DeltaMessage:
    """What one `OutputParser.feed` (or `finish`) returns; every field may be empty."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def is_empty(self) -> bool:
        """True when the delta carries nothing (a server skips such chunks)."""
        return not (self.content or self.reasoning_content or self.tool_calls)


@dataclass
class ParsedMessage:
    """A whole assistant message: `None` marks an absent part (no content, no reasoning)."""

    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


def accumulate(deltas: Iterable[DeltaMessage]) -> ParsedMessage:
    """Joins streamed deltas into the message they make up (what a client that concatenates the stream sees)."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, list] = {}  # index -> [id, name, argument pieces]
    for delta in deltas:
        content.append(delta.content)
        reasoning.append(delta.reasoning_content)
        for piece in delta.tool_calls:
            call = calls.setdefault(piece.index, [None, None, []])
            call[0] = call[0] if call[0] is not None else piece.id
            call[1] = call[1] if call[1] is not None else piece.name
            call[2].append(piece.arguments)
    tool_calls = []
    for index in sorted(calls):
        call_id, name, pieces = calls[index]
        if call_id is None or name is None:
            raise ValueError(f"tool call {index} has no {'id' if call_id is None else 'name'} in any of its deltas")
        tool_calls.append(ToolCall(id=call_id, name=name, arguments="".join(pieces)))
    return ParsedMessage(
        content="".join(content) or None, reasoning_content="".join(reasoning) or None, tool_calls=tool_calls
    )


def random_call_id() -> str:
    """An OpenAI-style call id: `call_` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


class ReasoningParser(abc.ABC):
    """Splits generated text into reasoning and content; one instance per sequence."""

    def __init__(self, prompt_text: str | None = None, chat_template_kwargs: dict | None = None) -> None:
        self.prompt_text = prompt_text
        self.chat_template_kwargs = chat_template_kwargs or {}

    @abc.abstractmethod
    def feed(self, text: str) -> tuple[str, str]:
        """Takes the next piece of generated text; returns the new (reasoning, content)."""

    @abc.abstractmethod
    def finish(self) -> tuple[str, str]:
        """End of generation: returns the (reasoning, content) still held back."""


class ToolParser(abc.ABC):
    """Finds tool calls in content; one instance per sequence. Built only when the request has tools."""

    def __init__(self, tools: list[dict], id_factory: IdFactory | None = None) -> None:
        self.tool_names = tool_names(tools)
        self.id_factory = id_factory or self.default_id_factory
        self.num_calls = 0

    @staticmethod
    def default_id_factory() -> str:
        """The call id used when the caller gives no `id_factory`."""
        return random_call_id()

    @abc.abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Takes the next piece of content; returns the new content and the new tool-call deltas."""

    @abc.abstractmethod
    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of generation: returns the content and tool-call deltas still held back."""


def tool_names(tools: list[dict]) -> set[str]:
    """The function names of OpenAI tool dicts (`{"type": "function", "function": {"name": ...}}`)."""
    names = set()
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        function = function if isinstance(function, dict) else tool
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            names.add(name)
    return names


def merge_tool_deltas(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Merges consecutive deltas of the same call, so a chunk carries at most one entry per call (as OpenAI's do)."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if last is not None and last.index == delta.index and delta.id is None and delta.name is None:
            last.arguments += delta.arguments
        else:
            merged.append(ToolCallDelta(delta.index, delta.id, delta.name, delta.arguments))
    return [d for d in merged if d.id is not None or d.name is not None or d.arguments]


class OutputParser:
    """Parses one generated sequence: the reasoning parser runs first, its content goes on to the tool parser.

    Either parser may be absent (then reasoning stays empty, or everything is content). Build it with
    `make_output_parser`.
    """

    def __init__(self, reasoning_parser: ReasoningParser | None, tool_parser: ToolParser | None) -> None:
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        self._is_started = False
        self._is_finished = False

    def feed(self, text: str) -> DeltaMessage:
        """Takes the next piece of generated text (any chunking) and returns what it adds to the message."""
        if self._is_finished:
            raise RuntimeError("OutputParser.feed() after finish(): build one parser per generated sequence")
        self._is_started = True
        reasoning, content = self.reasoning_parser.feed(text) if self.reasoning_parser else ("", text)
        deltas: list[ToolCallDelta] = []
        if self.tool_parser is not None:
            content, deltas = self.tool_parser.feed(content)
        return DeltaMessage(content, reasoning, merge_tool_deltas(deltas))

    def finish(self) -> DeltaMessage:
        """End of generation: flushes what was held back (a partial tag that never completed becomes content)."""
        if self._is_finished:
            raise RuntimeError("OutputParser.finish() called twice")
        self._is_started = self._is_finished = True
        reasoning, content = self.reasoning_parser.finish() if self.reasoning_parser else ("", "")
        deltas: list[ToolCallDelta] = []
        if self.tool_parser is not None:
            content, deltas = self.tool_parser.feed(content)
            rest, more = self.tool_parser.finish()
            content, deltas = content + rest, deltas + more
        return DeltaMessage(content, reasoning, merge_tool_deltas(deltas))

    def parse(self, text: str) -> ParsedMessage:
        """The non-streamed path: the whole generated text at once (exactly `feed(text)` + `finish()`, joined)."""
        if self._is_started:
            raise RuntimeError("OutputParser.parse() needs a fresh parser (this one was already fed)")
        return accumulate([self.feed(text), self.finish()])
