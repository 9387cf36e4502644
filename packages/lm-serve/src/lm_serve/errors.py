"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure the server reports.

Validation problems become 400 (FastAPI's own 422 included, since OpenAI clients expect 400 for bad input), unknown
routes 404, and anything unexpected 500 with a body of the same shape, so a client never has to parse an HTML page.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("lm_serve")

# GenerationConfig field -> the OpenAI request parameter a user set it through (for the error's `param`).
_PARAM_OF_FIELD = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "random_seed": "seed",
    "stop_words": "stop",
    "do_sample": "temperature",
    "logprobs": "top_logprobs",
}


# How pydantic names the member of a union it tried, in an error's location ("list[str]", "NamedToolChoice", ...).
_UNION_MEMBER = re.compile(r"str|int|float|bool|none|(list|dict|literal|function-\w+|tagged-union)\[.*\]|[A-Z]\w*")


class APIError(Exception):
    """An error to answer with `status_code` and an OpenAI error body."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status code and headers."""
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class ServerShuttingDown(APIError):
    """The server is shutting down and ended this request before it finished (503)."""

    def __init__(self) -> None:
        super().__init__(
            "The server is shutting down and could not finish this request; retry it on another server.",
            status_code=503,
            type="server_error",
            code="server_shutting_down",
        )


class RejectedBody(StarletteHTTPException):
    """A request body refused while it is parsed (it reaches FastAPI as an HTTPException, then answers `error`)."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.status_code, error.message)
        self.error = error


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(exc: Exception, param: str | None = None) -> APIError:
    """A 400 for a ValueError from lm-core (GenerationConfig, messages, templates, prompt length)."""
    message = str(exc) or type(exc).__name__
    if param is None:
        found = re.search(r"GenerationConfig\.(\w+)", message)
        if found:
            param = _PARAM_OF_FIELD.get(found.group(1), found.group(1))
        else:
            found = re.match(r"(messages\[\d+\][\w.\[\]]*)", message)
            param = found.group(1) if found else None
    return APIError(message, param=param)


def _location(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Pydantic names the union member it tried ("str", "list[str]", "function-after[...]"): not a user's field.
    parts = [p for p in parts if not _UNION_MEMBER.fullmatch(p)]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 for FastAPI's request validation (malformed JSON, wrong types, values out of range)."""
    errors = exc.errors()
    if not errors:
        return APIError("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(
            "We could not parse the JSON body of your request: it is not valid JSON "
            f"({first.get('ctx', {}).get('error', 'syntax error')}).",
            code="invalid_json",
        )
    param = _location(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param is None:
        return APIError("the request needs a JSON body", code="invalid_json")
    details = "; ".join(
        f"{_location(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]
    )
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return APIError(f"Invalid request: {details}{more}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error the app can raise with an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RejectedBody)
    async def _rejected_body(request: Request, exc: RejectedBody):
        return exc.error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message, code = f"Unknown route {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"Method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, kind, None, code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, exc: json.JSONDecodeError):
        return APIError(f"We could not parse the JSON body of your request ({exc})", code="invalid_json").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body(f"Internal server error: {type(exc).__name__}: {exc}", "server_error", None, None)
        return JSONResponse(body, status_code=500)
