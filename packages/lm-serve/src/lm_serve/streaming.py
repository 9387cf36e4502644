"""Server-sent events: the `data: {...}` framing and a response that aborts its generation when the client leaves."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lm_core.response import Response
from lm_serve.errors import ServerShuttingDown, error_body
from lm_serve.output import new_id, now, usage_json

if TYPE_CHECKING:
    from lm_serve.generation import Generation

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One event: `event: <name>` (when given) and `data: <json>`, ended by a blank line."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n" if event else f"data: {payload}\n\n"


class ChunkWriter:
    """The SSE chunks of one streamed chat or text completion (OpenAI's `chat.completion.chunk` and
    `text_completion` objects): every chunk carries the same id, object, creation time and model, and, when the
    client asked for usage (`stream_options.include_usage`), a `usage` that is null until a last chunk of its own.
    """

    def __init__(self, object_name: str, id_prefix: str, model: str, include_usage: bool, num_prompt_tokens: int):
        """Chunks of `object_name` with a fresh id `<id_prefix>-<hex>`, for a request of `num_prompt_tokens`."""
        self.object_name = object_name
        self.id = new_id(id_prefix)
        self.created = now()
        self.model = model
        self.include_usage = include_usage
        self.num_prompt_tokens = num_prompt_tokens

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        """One `data:` event of `choices` (and `usage`, when the client asked for it)."""
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return sse(chunk)

    async def events(
        self,
        gen: Generation,
        choices_of: Callable[[Response], Iterable[dict[str, Any]]],
        opening_choice: Callable[[int], dict[str, Any]] | None = None,
    ) -> AsyncIterator[str]:
        """The stream of `gen`: a chunk per choice `choices_of(piece)` gives (one chunk each), an OpenAI error event
        ending a sequence that failed, the usage chunk, then `[DONE]`; `gen` is closed in every case.

        `opening_choice(index)`, when given, is a sequence's first chunk, sent before its first piece (the chat
        role chunk).
        """
        started: set[int] = set()
        num_completion: dict[int, int] = {}
        try:
            async for piece in gen:
                if opening_choice is not None and piece.index not in started:
                    started.add(piece.index)
                    yield self.chunk([opening_choice(piece.index)])
                if piece.finish_reason == "error":
                    yield sse(error_body(piece.error or "generation failed", "server_error"))
                    return
                num_completion[piece.index] = piece.generate_token_len
                for choice in choices_of(piece):
                    yield self.chunk([choice])
            if self.include_usage:
                yield self.chunk([], usage_json(self.num_prompt_tokens, sum(num_completion.values())))
            yield DONE
        finally:
            await gen.aclose()


async def _ended_on_shutdown(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`; a stream the server stops at shutdown ends with an OpenAI error event and `[DONE]`."""
    try:
        async for event in events:
            yield event
    except ServerShuttingDown as exc:
        yield sse(exc.body())
        yield DONE
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


class SSEResponse(StreamingResponse):
    """Streams `events`; when the client disconnects, the stream stops and `on_close` runs (shielded).

    Starlette only watches for disconnects on some ASGI versions; here it is always done, and `on_close` runs in
    every case (end, error, disconnect), so the engine request is aborted and its KV blocks are freed.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(_ended_on_shutdown(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the end or the client's disconnect, then close the events and run `on_close`."""
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                async def watch_then_stop() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                group.start_soon(watch_then_stop)
        except OSError:
            pass  # the client went away while we were writing
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()
