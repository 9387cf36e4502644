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
    """One sequence to generate: the prompt's token ids and how to decode.

    Everything textual is already resolved by lm-core: `gen_config.stop_token_ids` holds every stop id (EOS included
    unless `ignore_eos`), and `bad_word_ids` holds the token sequences of `gen_config.bad_words`. `multimodal` and
    `adapter_name` are passed on as given: an engine that cannot honour them must reject the request with an "error"
    output, never ignore them.
    """

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
    # Token sequences the engine must never complete (each a non-empty list of ids): `gen_config.bad_words` tokenized
    # by lm-core, each word with and without a leading space. None: no bad words.
    bad_word_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        """Check the fields' types and shapes (ValueError naming the field)."""
        _check_name(self.request_id, "request_id", optional=False)
        _check_name(self.group, "group", optional=True)
        _check_name(self.adapter_name, "adapter_name", optional=True)
        if not self.prompt_token_ids:
            raise ValueError("EngineRequest.prompt_token_ids is empty: the prompt has no tokens")
        if not _is_dict_list(self.multimodal):
            raise ValueError("EngineRequest.multimodal must be a list of dicts or None")
        if not _is_token_lists(self.bad_word_ids):
            raise ValueError("EngineRequest.bad_word_ids must be a list of non-empty lists of token ids, or None")


def _check_name(value: object, name: str, *, optional: bool) -> None:
    if (value is None and optional) or (isinstance(value, str) and value):
        return
    expected = "a non-empty string or None" if optional else "a non-empty string"
    raise ValueError(f"EngineRequest.{name} must be {expected}, got {value!r}")


def _is_dict_list(value: object) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(item, dict) for item in value))  # pyright: ignore[reportUnknownVariableType]


def _is_token_lists(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, list):
        return False
    for word in value:  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(word, list) or not word:
            return False
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in word):  # pyright: ignore[reportUnknownVariableType]
            return False
    return True


def session_length_error(num_prompt_tokens: int, max_new_tokens: int | None, session_len: int | None) -> str | None:
    """Why a prompt of `num_prompt_tokens` plus `max_new_tokens` does not fit `session_len`, or None when it fits.

    The wording engines reject such a request with (an "error" output), so that every engine and lm-core's early
    check say the same thing.
    """
    if session_len is None:
        return None
    if num_prompt_tokens >= session_len:
        return f"the prompt has {num_prompt_tokens} tokens; the session length is {session_len}"
    if max_new_tokens is not None and num_prompt_tokens + max_new_tokens > session_len:
        return (
            f"prompt ({num_prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the session length "
            f"{session_len}"
        )
    return None


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
    extra: dict[str, Any] = field(default_factory=dict[str, Any])


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
        """Submit `request` and stream its outputs; bad requests end at once with finish_reason "error".

        The engine is the one authority on length: a prompt of `session_len` tokens or more, or one whose
        `max_new_tokens` would pass `session_len`, ends with an "error" output worded by `session_length_error`.
        Closing the stream before its final output aborts the request (the generator's `finally`): callers never
        call `abort` after closing a stream, so each request is aborted once.
        """

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

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer generate (a worker process of a multi-process engine died), or None while
        it can. Once set it stays: every request then ends with finish_reason "error", and a server answers 503."""
        return None

    @abstractmethod
    def stats(self) -> EngineStats:
        """The current load."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the engine and release its memory; pending requests end with "abort"."""
