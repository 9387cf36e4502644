"""`ServerState`: what every route shares (the pipeline, served names, parsers, limits, metrics)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lm_core.async_pipeline import AsyncPipeline
from lm_core.tokenizer import Tokenizer
from lm_serve.errors import APIError

if TYPE_CHECKING:
    from lm_serve.generation import Generation
    from lm_serve.metrics import ServerMetrics

# Sequences (prompts x n) one generation request may ask for: bounds what a single request queues in the engine.
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 1024


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ConcurrencyLimiter:
    """At most `limit` sequences (prompts x n, summed over requests) in flight; a request that would go beyond it is
    refused at once (429), never queued."""

    def __init__(self, limit: int | None) -> None:
        _check_limit("max_concurrent_requests", limit)
        self.limit = limit
        self.in_flight = 0

    def acquire(self, num_sequences: int = 1) -> None:
        """Take `num_sequences` slots or raise the 429 `APIError`."""
        if self.limit is not None and self.in_flight + num_sequences > self.limit:
            raise APIError(
                f"Too many requests: this server generates at most {self.limit} sequences at once "
                f"(--max-concurrent-requests; {self.in_flight} running, this request asks for {num_sequences}); "
                "retry shortly.",
                status_code=429,
                type="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += num_sequences

    def release(self, num_sequences: int = 1) -> None:
        """Give back `num_sequences` slots."""
        self.in_flight -= num_sequences


@dataclass
class ServerState:
    """Built once by `build_app`; routes reach it as `request.app.state.lm`."""

    pipeline: AsyncPipeline
    model_names: list[str]
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    limiter: ConcurrencyLimiter = field(default_factory=lambda: ConcurrencyLimiter(None))
    max_sequences_per_request: int | None = DEFAULT_MAX_SEQUENCES_PER_REQUEST
    metrics: ServerMetrics | None = None
    # Text in messages that spells a special token is tokenized as that token (else as ordinary text).
    allow_special_tokens_in_content: bool = False
    # True once a shutdown's grace period is over: running requests are aborted and end with a 503 or error event.
    draining: bool = False
    # The generations under way, for ending them at shutdown.
    generations: set[Generation] = field(default_factory=set)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        """Check the served names and the per-request limit (ValueError naming the field)."""
        if not self.model_names or not all(isinstance(n, str) and n for n in self.model_names):
            raise ValueError(f"ServerState.model_names must be non-empty strings, got {self.model_names!r}")
        _check_limit("max_sequences_per_request", self.max_sequences_per_request)

    def check_num_sequences(self, num_prompts: int, n: int) -> None:
        """400 if a request of `num_prompts` prompts with `n` samples each asks for more sequences than one request
        may (`max_sequences_per_request`), or than the server runs at once (`--max-concurrent-requests`: it would be
        refused forever)."""
        num_sequences = num_prompts * n
        shape = f"{num_prompts} prompts x n={n}" if num_prompts > 1 else f"n={n}"
        for limit, flag, what in (
            (self.max_sequences_per_request, "--max-sequences-per-request", "per request"),
            (self.limiter.limit, "--max-concurrent-requests", "at once"),
        ):
            if limit is not None and num_sequences > limit:
                raise APIError(
                    f"This request asks for {num_sequences} sequences ({shape}); this server generates at most "
                    f"{limit} {what} ({flag}). Split it into smaller requests.",
                    param="prompt" if num_prompts > 1 else "n",
                    code="too_many_sequences",
                )

    @property
    def model_name(self) -> str:
        """The name responses carry."""
        return self.model_names[0]

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self.pipeline.tokenizer

    @property
    def session_len(self) -> int | None:
        """The engine's limit on prompt + generated tokens (None: no limit)."""
        return self.pipeline.session_len

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
