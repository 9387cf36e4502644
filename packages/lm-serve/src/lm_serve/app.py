"""`build_app`: the FastAPI application over one `AsyncPipeline` (routes, errors, auth, metrics)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from lm_core.async_pipeline import AsyncPipeline
from lm_serve import __version__
from lm_serve.auth import APIKeyMiddleware
from lm_serve.docs_page import render_docs
from lm_serve.errors import install_error_handlers
from lm_serve.metrics import ServerMetrics
from lm_serve.request_guards import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit
from lm_serve.routes import chat, completions, embeddings, models, responses, tokenize
from lm_serve.state import DEFAULT_MAX_SEQUENCES_PER_REQUEST, ConcurrencyLimiter, ServerState


def build_app(
    pipeline: AsyncPipeline,
    model_names: list[str],
    *,
    api_keys: Iterable[str] = (),
    tool_parser: str | None = None,
    reasoning_parser: str | None = None,
    max_concurrent_requests: int | None = None,
    max_sequences_per_request: int | None = DEFAULT_MAX_SEQUENCES_PER_REQUEST,
    allow_origins: Iterable[str] = (),
    close_pipeline_on_shutdown: bool = True,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allow_special_tokens_in_content: bool = False,
) -> FastAPI:
    """The OpenAI-compatible app serving `pipeline` under `model_names` (the first is the one responses carry).

    Bodies over `max_request_bytes` get a 413; text in messages that spells a special token stays text unless
    `allow_special_tokens_in_content`.
    """
    check_parser_names(tool_parser, reasoning_parser)
    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be a positive integer, got {max_request_bytes!r}")
    state = ServerState(
        pipeline=pipeline,
        model_names=list(model_names),
        tool_parser=tool_parser,
        reasoning_parser=reasoning_parser,
        limiter=ConcurrencyLimiter(max_concurrent_requests),
        max_sequences_per_request=max_sequences_per_request,
        metrics=ServerMetrics(pipeline.engine.stats),
        allow_special_tokens_in_content=allow_special_tokens_in_content,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_pipeline_on_shutdown:
            await pipeline.close()

    app = FastAPI(
        title="lm-serve",
        version=__version__,
        description="OpenAI-compatible API of lm-deploy.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN; /docs is a page of our own that loads nothing.
        docs_url=None,
        redoc_url=None,
    )
    app.state.lm = state

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi()))

    for module in (models, chat, completions, responses, embeddings, tokenize):
        app.include_router(module.router)
    install_error_handlers(app)
    # Inside the API-key check, which reads no body: an oversized body is refused before any route reads it.
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    keys = list(api_keys)
    if keys:
        app.add_middleware(APIKeyMiddleware, api_keys=keys)
    origins = list(allow_origins)
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        # Added last, so it runs first: browsers' preflight requests carry no API key.
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    return app


def check_parser_names(tool_parser: str | None, reasoning_parser: str | None) -> None:
    """Unknown parser names fail at start-up (ValueError listing the known ones)."""
    if tool_parser is None and reasoning_parser is None:
        return
    from lm_serve.parsers import make_output_parser

    make_output_parser(reasoning_parser=reasoning_parser, tool_parser=tool_parser)
