"""Limits on what a request body may be: its size (413 before it is read), and, once parsed, its nesting depth and
its strings (a lone UTF-16 surrogate cannot be tokenized or written back as UTF-8): 400s naming the field."""

from __future__ import annotations

import json
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request

from lm_serve.errors import APIError, RejectedBody

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Deeper than this anywhere in a body is refused: recursive code (pydantic, templates, grammars) must not reach
# Python's recursion limit (1000 frames).
MAX_JSON_DEPTH = 800
# What chat templates see (messages, tools, their kwargs) is copied and walked recursively, a few frames per level.
MAX_TEMPLATE_DATA_DEPTH = 64
_TEMPLATE_FIELDS = frozenset({"messages", "tools", "chat_template_kwargs", "input"})
_SCALARS = frozenset({int, float, bool, type(None)})


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` gets a 413 with an OpenAI error body.

    A Content-Length over the limit is answered before any of the body is read; a body without one (chunked) is
    counted as it arrives and cut where it passes the limit (the app sees a disconnect, its answer is replaced).
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        return APIError(
            f"The request body is larger than this server accepts ({self.max_bytes} bytes, --max-request-bytes).",
            status_code=413,
            code="request_too_large",
        )

    async def __call__(self, scope, receive, send) -> None:
        """Answers 413 to a body over `max_bytes`, before reading it when Content-Length says so."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._error().response()(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body it never got whole; the 413 replaces it
            started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if exceeded and not started:
            await self._error().response()(scope, receive, send)


def check_json_body(body: Any) -> None:
    """Raise a 400 `APIError` naming the field for a lone surrogate anywhere, or nesting beyond the limits."""
    # Iterative: the depth being checked is what would overflow a recursive walk. Items: (value, path, depth, limit).
    stack: list[tuple[Any, tuple, int, int]] = [(body, (), 0, MAX_JSON_DEPTH)]
    while stack:
        value, path, depth, limit = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                raise APIError(
                    f"{_param(path) or 'body'}: the text contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                    "escape), which is not valid Unicode text",
                    param=_param(path),
                    code="invalid_unicode",
                )
            continue
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            if _SCALARS.issuperset(map(type, value)):
                continue  # numbers only (token ids): nothing to look into, and no Python loop over them
            items = enumerate(value)
        else:
            continue
        depth += 1
        if depth > limit:
            allowed = MAX_JSON_DEPTH if limit == MAX_JSON_DEPTH else MAX_TEMPLATE_DATA_DEPTH
            where = _param(path[:1])
            raise APIError(
                f"{where or 'body'}: nested deeper than {allowed} levels", param=where, code="too_deeply_nested"
            )
        for key, item in items:
            if isinstance(key, str) and _has_surrogate(key):
                raise APIError(
                    f"{_param(path) or 'body'}: a key contains a lone UTF-16 surrogate (not valid Unicode text)",
                    param=_param(path),
                    code="invalid_unicode",
                )
            if isinstance(item, dict | list | str):
                child_limit = limit
                if not path and key in _TEMPLATE_FIELDS:
                    child_limit = depth + MAX_TEMPLATE_DATA_DEPTH
                stack.append((item, (*path, key), depth, child_limit))


def _has_surrogate(text: str) -> bool:
    # UTF-8 can encode every code point but the surrogates; isascii() settles most strings without encoding them.
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _param(path: tuple) -> str | None:
    """`messages[0].content[1].text` for ("messages", 0, "content", 1, "text")."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or None


class _GuardedRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                parsed = json.loads(body)
            except RecursionError:
                raise RejectedBody(
                    APIError(f"body: nested deeper than {MAX_JSON_DEPTH} levels", code="too_deeply_nested")
                ) from None
            try:
                check_json_body(parsed)
            except APIError as exc:
                raise RejectedBody(exc) from None
            self._json = parsed
        return self._json


class GuardedRoute(APIRoute):
    """Routes whose JSON bodies pass `check_json_body` before FastAPI validates them."""

    def get_route_handler(self):
        """The route's handler, with the JSON body checked by `check_json_body` first."""
        handler = super().get_route_handler()

        async def guarded(request: Request):
            return await handler(_GuardedRequest(request.scope, request.receive))

        return guarded
