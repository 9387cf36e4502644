"""`build_app`: the FastAPI application over one `AsyncPipeline` (routes, errors, auth, metrics)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from lm_serve import __version__
from lm_serve.auth import APIKeyMiddleware
from lm_serve.errors import install_error_handlers
from lm_serve.metrics import ServerMetrics
from lm_serve.routes import chat, completions, embeddings, models, responses, tokenize
from lm_serve.state import DEFAULT_MAX_SEQUENCES_PER_REQUEST, ConcurrencyLimiter, ServerState


def build_app(
    pipeline: Any,
    model_names: list[str],
    *,
    api_keys: Iterable[str] = (),
    tool_parser: str | None = None,
    reasoning_parser: str | None = None,
    max_concurrent_requests: int | None = None,
    max_sequences_per_request: int | None = DEFAULT_MAX_SEQUENCES_PER_REQUEST,
    allow_origins: Iterable[str] = (),
    close_pipeline_on_shutdown: bool = True,
) -> FastAPI:
    """The OpenAI-compatible app serving `pipeline` under `model_names` (the first is the one responses carry)."""
    check_parser_names(tool_parser, reasoning_parser)
    state = ServerState(
        pipeline=pipeline,
        model_names=list(model_names),
        tool_parser=tool_parser,
        reasoning_parser=reasoning_parser,
        limiter=ConcurrencyLimiter(max_concurrent_requests),
        max_sequences_per_request=max_sequences_per_request,
        metrics=ServerMetrics(pipeline.engine.stats),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_pipeline_on_shutdown:
            await pipeline.close()

    app = FastAPI(
        title="lm-serve",
        version=__version__,
        description="OpenAI-compatible API of lm-deploy.",
        lifespan=lifespan,
    )
    app.state.lm = state
    for module in (models, chat, completions, responses, embeddings, tokenize):
        app.include_router(module.router)
    install_error_handlers(app)
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
