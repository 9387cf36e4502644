"""The engine protocol: what lm-core asks of an inference engine (lm-torch, lm-turbomind, or a user's own).

Engines see token ids only; text, chat templates, stop strings and n > 1 fan-out live in lm-core.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lm_core.generation_config import GenerationConfig

FinishReason = Literal["stop", "length", "abort", "error"]
#: How `Engine.embed` pools a prompt's final hidden states: their mean, or the last token's.
POOLING_METHODS = ("mean", "last")


@dataclass
class EngineRequest:
    """One sequence to generate: the prompt's token ids and how to decode."""

    request_id: str
    prompt_token_ids: list[int]
    gen_config: GenerationConfig
    # Images/videos already preprocessed by lm-vl, with the positions of their placeholder tokens.
    multimodal: list[dict[str, Any]] | None = None
    adapter_name: str | None = None
    # The client request this sequence is part of (all prompts and samples of one API request share it): engines that
    # schedule fairly share their capacity between groups, so one large request cannot starve the others. None: a
    # group of its own.
    group: str | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("EngineRequest.request_id must be a non-empty string")
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise ValueError(f"EngineRequest.group must be a non-empty string or None, got {self.group!r}")
        if not self.prompt_token_ids:
            raise ValueError("EngineRequest.prompt_token_ids is empty: the prompt has no tokens")


@dataclass
class EngineOutput:
    """What one engine step produced for one request.

    `token_ids` are the tokens new since the previous output. `logprobs`, when asked for, holds one mapping per new
    token: the sampled token and the top-N tokens, each to its log-probability (of the processed distribution).
    `prompt_logprobs`, when asked for (`GenerationConfig.prompt_logprobs`), comes once, on the first output after the
    prompt is computed: one entry per prompt token, None for the first (nothing predicts it), then a mapping of that
    prompt token and the top-N tokens to their log-probabilities under the model's raw distribution at the position
    before it. `finish_reason` is None while the request runs; the last output of a request always carries one.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass
class EngineStats:
    """A snapshot of an engine's load, for logs, `/metrics` and tests."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV-cache blocks in use
    prefix_cache_hit_rate: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(ABC):
    """Base of every engine. Engines register under the entry-point group `lm_deploy.engines`.

    Heavy imports (torch, the compiled module) belong in `from_pretrained`, never at module level, so that selecting
    an engine costs nothing until it is built.
    """

    #: Higher wins when `backend="auto"` finds several engines that support a model.
    priority: ClassVar[int] = 0

    @classmethod
    @abstractmethod
    def from_pretrained(cls, model_path: str | os.PathLike[str], config: Any = None) -> Engine:
        """Load the model at `model_path` (a local Hugging Face directory) with engine-specific `config`."""

    @classmethod
    def supports(cls, model_path: str | os.PathLike[str]) -> bool:
        """Whether this engine can run the model at `model_path` on this machine (for `backend="auto"`)."""
        return True

    @property
    def session_len(self) -> int | None:
        """The longest prompt + generation this engine accepts, if it has a limit."""
        return None

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Submit `request` and stream its outputs; bad requests end at once with finish_reason "error"."""

    async def embed(self, prompt_token_ids: list[int], pooling: str = "mean", normalize: bool = True) -> list[float]:
        """The prompt's final hidden states (after the final norm) pooled into one vector: their mean over all tokens
        (`pooling="mean"`) or the last token's (`"last"`), L2-normalised when `normalize`.

        Bad input (no tokens, ids outside the vocabulary, too long, unknown pooling) raises ValueError. Engines that
        cannot embed keep this default, which raises NotImplementedError.
        """
        raise NotImplementedError(f"the {type(self).__name__} engine does not compute embeddings")

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds; its stream ends with finish_reason "abort"."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """The current load."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the engine and release its memory; pending requests end with "abort"."""
