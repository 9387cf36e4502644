"""Running a request's blocking preprocessing (chat template, tokenizer) off the event loop when its input is large.

Tokenizing megabytes takes seconds; on the event loop that would stall every other request's stream. Small bodies
stay inline, where a thread hop would only add latency.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

# Bodies up to this size are tokenized on the event loop (well under a millisecond of work each).
INLINE_BODY_BYTES = 64 * 1024

T = TypeVar("T")


def is_large(request: Request) -> bool:
    """Whether the body is over `INLINE_BODY_BYTES`, or of unknown size (chunked)."""
    length = request.headers.get("content-length")
    return length is None or not length.isdigit() or int(length) > INLINE_BODY_BYTES


async def off_loop(request: Request, fn: Callable[..., T], *args: Any, force: bool = False, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, in a worker thread when the request's body is large (or `force`), inline otherwise."""
    if not force and not is_large(request):
        return fn(*args, **kwargs)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
