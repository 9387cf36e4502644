"""Server-sent events: the `data: {...}` framing and a response that aborts its generation when the client leaves."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse

from lm_serve.errors import ServerShuttingDown

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One event: `event: <name>` (when given) and `data: <json>`, ended by a blank line."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n" if event else f"data: {payload}\n\n"


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

    async def __call__(self, scope, receive, send) -> None:
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
