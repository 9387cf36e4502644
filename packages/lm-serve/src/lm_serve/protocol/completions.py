"""`POST /v1/completions` request (the legacy text completions API)."""

from __future__ import annotations

from pydantic import Field

from lm_serve.protocol.common import ResponseFormat, SamplingFields


class CompletionRequest(SamplingFields):
    """The body of `POST /v1/completions`."""

    model: str
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo: the prompt is scored (its logprobs) and nothing is generated.
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's extension: per prompt token, its log-probability and the top N (not with stream).
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None
    response_format: ResponseFormat | None = None
