"""Responses API output: the `response` object, its output items, and the typed event stream that builds them.

A stream opens one output item at a time, in the order the model writes: reasoning, then message text or function
calls. Each item is announced (`response.output_item.added`), grows by deltas, and is closed
(`..._text.done`, `response.content_part.done`, `response.output_item.done`) before the next one opens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from lm_serve.output import new_id
from lm_serve.parsers import DeltaMessage, ParsedMessage
from lm_serve.streaming import sse

if TYPE_CHECKING:
    from lm_serve.generation import Generation


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if text is not None else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(parsed: ParsedMessage) -> list[dict[str, Any]]:
    """The output items of a whole (non-streamed) message."""
    items = []
    if parsed.reasoning_content is not None:
        items.append(_reasoning_item(new_id("rs", "_"), parsed.reasoning_content, "completed"))
    if parsed.content is not None or not parsed.tool_calls:
        items.append(_message_item(new_id("msg", "_"), parsed.content or "", "completed"))
    for call in parsed.tool_calls:
        items.append(_call_item(new_id("fc", "_"), call.id, call.name, call.arguments, "completed"))
    return items


def response_json(
    base: dict[str, Any],
    output: list[dict[str, Any]],
    finish_reason: str | None,
    num_prompt: int,
    num_output: int,
    status: str | None = None,
) -> dict[str, Any]:
    """The `response` object; `finish_reason` "length" makes it incomplete (max_output_tokens)."""
    body = base["request"]
    if status is None:
        status = "incomplete" if finish_reason == "length" else "completed"
    text_format = (
        body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else None
    )
    tool_choice = body.tool_choice
    if tool_choice is not None and not isinstance(tool_choice, str):
        tool_choice = tool_choice.model_dump()
    usage = None
    if status != "in_progress":
        usage = {
            "input_tokens": num_prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": num_output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": num_prompt + num_output,
        }
    return {
        "id": base["id"],
        "object": "response",
        "created_at": base["created_at"],
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": base["model"],
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": body.temperature,
        "text": {"format": text_format or {"type": "text"}},
        "tool_choice": tool_choice or "auto",
        "tools": base["tools"],
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": body.user,
        "metadata": body.metadata or {},
    }


class ResponseEventWriter:
    """Turns one sequence's deltas into Responses API events."""

    def __init__(self, base: dict[str, Any], parser, num_prompt: int) -> None:
        self.base = base
        self.parser = parser
        self.num_prompt = num_prompt
        self.sequence_number = 0
        self.output: list[dict[str, Any]] = []  # closed items
        self._open: dict[str, Any] | None = None  # the item being written: kind, id, text pieces, ...

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse(data, event=kind)

    async def events(self, gen: Generation) -> AsyncIterator[str]:
        """The typed Responses events of `gen`, ending with `response.completed`, `.incomplete` or `.failed`."""
        num_output = 0
        try:
            opening = response_json(self.base, [], None, self.num_prompt, 0, status="in_progress")
            yield self._event("response.created", response=opening)
            yield self._event("response.in_progress", response=opening)
            async for piece in gen:
                if piece.finish_reason == "error":
                    message = piece.error or "generation failed"
                    yield self._event("error", message=message, code="server_error", param=None)
                    failed = response_json(self.base, self.output, None, self.num_prompt, num_output, "failed")
                    yield self._event("response.failed", response=failed)
                    return
                num_output = piece.generate_token_len
                for event in self._delta(self.parser.feed(piece.text)):
                    yield event
                if piece.finish_reason is not None:
                    for event in self._delta(self.parser.finish()):
                        yield event
                    for event in self._close():
                        yield event
                    if not self.output:  # nothing was written: an empty message, as the non-streamed answer has
                        for event in [*self._open_message(), *self._close()]:
                            yield event
                    final = response_json(self.base, self.output, piece.finish_reason, self.num_prompt, num_output)
                    kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
                    yield self._event(kind, response=final)
        finally:
            await gen.aclose()

    def _delta(self, delta: DeltaMessage) -> list[str]:
        events: list[str] = []
        if delta.reasoning_content:
            if self._kind() != "reasoning":
                events += self._close()
                events += self._open_reasoning()
            events.append(self._piece("response.reasoning_text.delta", delta.reasoning_content))
        if delta.content:
            if self._kind() != "message":
                events += self._close()
                events += self._open_message()
            events.append(self._piece("response.output_text.delta", delta.content, logprobs=[]))
        for call in delta.tool_calls:
            if call.id is not None or self._kind() != "function_call" or self._opened()["index"] != call.index:
                events += self._close()
                events += self._open_call(call.index, call.id or new_id("call", "_"), call.name or "")
            if call.arguments:
                self._opened()["text"].append(call.arguments)
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self._opened()["id"],
                        output_index=len(self.output),
                        delta=call.arguments,
                    )
                )
        return events

    def _opened(self) -> dict[str, Any]:
        if self._open is None:
            raise RuntimeError("no output item is open")
        return self._open

    def _kind(self) -> str | None:
        return self._open["kind"] if self._open else None

    def _piece(self, kind: str, text: str, **extra: Any) -> str:
        self._opened()["text"].append(text)
        at = len(self.output)
        return self._event(kind, item_id=self._opened()["id"], output_index=at, content_index=0, delta=text, **extra)

    def _open_reasoning(self) -> list[str]:
        self._open = {"kind": "reasoning", "id": new_id("rs", "_"), "text": []}
        item = _reasoning_item(self._open["id"], "", "in_progress")
        part = {"type": "reasoning_text", "text": ""}
        return [
            self._event("response.output_item.added", output_index=len(self.output), item=item),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=len(self.output),
                content_index=0,
                part=part,
            ),
        ]

    def _open_message(self) -> list[str]:
        self._open = {"kind": "message", "id": new_id("msg", "_"), "text": []}
        item = _message_item(self._open["id"], None, "in_progress")
        return [
            self._event("response.output_item.added", output_index=len(self.output), item=item),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=len(self.output),
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def _open_call(self, index: int, call_id: str, name: str) -> list[str]:
        self._open = {
            "kind": "function_call",
            "id": new_id("fc", "_"),
            "text": [],
            "index": index,
            "call_id": call_id,
            "name": name,
        }
        item = _call_item(self._open["id"], call_id, name, "", "in_progress")
        return [self._event("response.output_item.added", output_index=len(self.output), item=item)]

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        item_open, self._open = self._open, None
        text, item_id, at = "".join(item_open["text"]), item_open["id"], len(self.output)
        events = []
        if item_open["kind"] == "reasoning":
            item = _reasoning_item(item_id, text, "completed")
            events.append(
                self._event(
                    "response.reasoning_text.done", item_id=item_id, output_index=at, content_index=0, text=text
                )
            )
            events.append(
                self._event(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=at,
                    content_index=0,
                    part={"type": "reasoning_text", "text": text},
                )
            )
        elif item_open["kind"] == "message":
            item = _message_item(item_id, text, "completed")
            events.append(
                self._event(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=at,
                    content_index=0,
                    text=text,
                    logprobs=[],
                )
            )
            events.append(
                self._event(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=at,
                    content_index=0,
                    part=_text_part(text),
                )
            )
        else:
            item = _call_item(item_id, item_open["call_id"], item_open["name"], text, "completed")
            events.append(
                self._event("response.function_call_arguments.done", item_id=item_id, output_index=at, arguments=text)
            )
        events.append(self._event("response.output_item.done", output_index=at, item=item))
        self.output.append(item)
        return events
