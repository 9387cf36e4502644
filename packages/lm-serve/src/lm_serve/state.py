"""`ServerState`: what every route shares (the pipeline, served names, parsers, limits, metrics)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lm_serve.errors import APIError


class ConcurrencyLimiter:
    """At most `limit` generation requests in flight; one more is refused at once (429), never queued."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"max_concurrent_requests must be a positive integer, got {limit!r}")
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> None:
        """Take a slot or raise the 429 `APIError`."""
        if self.limit is not None and self.in_flight >= self.limit:
            raise APIError(
                f"Too many requests: this server handles at most {self.limit} generation requests at once "
                "(--max-concurrent-requests); retry shortly.",
                status_code=429,
                type="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


@dataclass
class ServerState:
    """Built once by `build_app`; routes reach it as `request.app.state.lm`."""

    pipeline: Any  # lm_core.AsyncPipeline
    model_names: list[str]
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    limiter: ConcurrencyLimiter = field(default_factory=lambda: ConcurrencyLimiter(None))
    metrics: Any = None  # lm_serve.metrics.ServerMetrics
    # Text in messages that spells a special token is tokenized as that token (else as ordinary text).
    allow_special_tokens_in_content: bool = False
    # True once a shutdown's grace period is over: running requests are aborted and end with a 503 or error event.
    draining: bool = False
    # The generations under way (lm_serve.generation.Generation), for ending them at shutdown.
    generations: set = field(default_factory=set)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.model_names or not all(isinstance(n, str) and n for n in self.model_names):
            raise ValueError(f"ServerState.model_names must be non-empty strings, got {self.model_names!r}")

    @property
    def model_name(self) -> str:
        """The name responses carry."""
        return self.model_names[0]

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def session_len(self) -> int | None:
        return self.pipeline.engine.session_len

    async def end_running_requests(self) -> None:
        """Refuse new generations and abort the engine work of those under way (they answer 503 / error event)."""
        self.draining = True
        for generation in list(self.generations):
            await generation.interrupt()

    def check_model(self, name: str | None) -> None:
        """404 unless `name` is a served model (None: the request did not name one, where that is allowed)."""
        if name is None or name in self.model_names:
            return
        raise APIError(
            f"The model {name!r} does not exist on this server; it serves {', '.join(map(repr, self.model_names))}.",
            status_code=404,
            param="model",
            code="model_not_found",
        )
