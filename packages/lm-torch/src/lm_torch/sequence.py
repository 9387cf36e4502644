"""`Sequence`: one request as the scheduler, the block manager and the model runner see it. No torch here.

A sequence's `token_ids` only ever grow (prompt, then the sampled tokens each step accepted), and only with real token
ids: a token sampled by a launched step whose value is not back on the host yet is counted in `num_pending_tokens`,
never written. So anything derived from a prefix of them (the prefix-cache hashes of its full blocks) stays valid for
the sequence's whole life, preemptions included.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lm_core.engine import POOLING_METHODS, FinishReason
from lm_core.generation_config import GenerationConfig
from lm_torch.multimodal import MMItem, chunk_for

if TYPE_CHECKING:
    from lm_core.engine import EngineRequest

FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "abort", "error")


class SequenceStatus(enum.Enum):
    """WAITING: queued, holds no KV blocks. RUNNING: holds blocks and is stepped. FINISHED: done, holds nothing."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens, where their KV lives, and how far the model has computed them.

    Invariants kept by the scheduler and the block manager:
    - `0 <= num_computed_tokens <= num_tokens + num_pending_tokens`; the KV of positions `[0, num_computed_tokens)` is
      written, or queued to be written by a launched step, in the blocks of `block_table` (block `i` holds positions
      `[i * block_size, (i + 1) * block_size)`). The scheduler advances `num_computed_tokens` when it schedules a
      step, so a second step can be scheduled before the first one's tokens are back.
    - `num_pending_tokens`: tokens the launched steps will sample for this sequence whose values have not been
      appended yet (`Scheduler.update` appends them, in launch order). Every token id in `token_ids` is real.
    - A WAITING or FINISHED sequence has an empty `block_table`; a preempted one also has `num_computed_tokens == 0`.
    - Between steps a RUNNING sequence has at least one uncomputed position (its last or pending token, fed next
      step), unless it is prefill-only and a launched step computes its last chunk (`update` then finishes it).
    - A prefill-only sequence (an embedding, or `max_new_tokens == 0`) never samples: it finishes as soon as its
      whole prompt is computed.
    - A guided sequence's `grammar` has accepted exactly its generated tokens after every step (preemption keeps
      `token_ids`, so it keeps the grammar state too).
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    gen_config: GenerationConfig
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    # Arrival order, assigned by `Scheduler.add` (first come first served within a group); a preempted sequence
    # keeps it, so it goes back ahead of its group's newer ones.
    arrival: int = -1
    # The client request this sequence belongs to (`EngineRequest.group`): the scheduler shares the batch fairly
    # between groups. None: a group of its own.
    group: str | None = None
    # Mixed into the prefix-cache key of the first block: sequences with different salts never share KV. The engine
    # sets it when equal token ids do not mean equal KV across the whole sequence (a LoRA adapter); images key only
    # the blocks they cover (`mm_items`).
    cache_salt: str | None = None
    num_preemptions: int = 0
    # Set for an embedding request: "mean" or "last" pooling of the prompt's final hidden states; nothing is sampled.
    pooling: str | None = None
    normalize: bool = True
    # A guided request's grammar state (`lm_torch.guided.GrammarState`): the runner masks and advances it, the
    # scheduler reads its `is_terminated` and `error`. Typed loosely so that this module needs no xgrammar.
    grammar: Any = field(default=None, repr=False)
    # Block-manager bookkeeping: prefix-cache keys of the full blocks hashed so far (append-only, like token_ids), and
    # how many leading blocks of `block_table` were already offered to the prefix cache.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_committed_blocks: int = field(default=0, repr=False)
    # Tokens sampled by launched steps, not appended yet (see the invariants above).
    num_pending_tokens: int = 0
    # The request's bad words, tokenized by lm-core: the sampler bans each sequence of ids.
    bad_word_ids: list[list[int]] | None = field(default=None, repr=False)
    # The request's images and videos, by span (`lm_torch.multimodal`): chunks and prefix hits never end inside a
    # span, and the prefix-cache key of a block over a span includes the item's content hash.
    mm_items: tuple[MMItem, ...] = field(default=(), repr=False)
    # Set once the model runner has been told about the request (`ScheduledBatch.new_requests`).
    is_announced: bool = field(default=False, repr=False)
    # The EOS ids and the request's stop ids, as a set (lm-core merged EOS into stop_token_ids unless ignore_eos).
    stop_token_ids: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"Sequence.request_id must be a non-empty string, got {self.request_id!r}")
        # Copied so that the caller's prompt list is never extended by generation.
        self.token_ids = list(self.token_ids)
        if not self.token_ids:
            raise ValueError("Sequence.token_ids is empty: the prompt has no tokens")
        if not 1 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(
                f"Sequence.num_prompt_tokens must be in [1, {len(self.token_ids)}], got {self.num_prompt_tokens}"
            )
        if not isinstance(self.gen_config, GenerationConfig):
            raise ValueError(f"Sequence.gen_config must be a GenerationConfig, got {type(self.gen_config).__name__}")
        if not 0 <= self.num_computed_tokens <= len(self.token_ids):
            raise ValueError(
                f"Sequence.num_computed_tokens must be in [0, {len(self.token_ids)}], got {self.num_computed_tokens}"
            )
        if not 0 <= self.num_cached_tokens <= self.num_prompt_tokens:
            raise ValueError(
                f"Sequence.num_cached_tokens must be in [0, {self.num_prompt_tokens}], got {self.num_cached_tokens}"
            )
        if not isinstance(self.status, SequenceStatus):
            raise ValueError(f"Sequence.status must be a SequenceStatus, got {self.status!r}")
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"Sequence.finish_reason must be one of {FINISH_REASONS} or None, got {self.finish_reason!r}"
            )
        if self.group is not None and not isinstance(self.group, str):
            raise ValueError(f"Sequence.group must be a string or None, got {self.group!r}")
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise ValueError(f"Sequence.cache_salt must be a string or None, got {self.cache_salt!r}")
        if self.pooling is not None and self.pooling not in POOLING_METHODS:
            raise ValueError(f"Sequence.pooling must be one of {POOLING_METHODS} or None, got {self.pooling!r}")
        if self.pooling is not None and self.grammar is not None:
            raise ValueError("Sequence.grammar must be None for an embedding sequence: it samples nothing")
        self.stop_token_ids = frozenset(self.gen_config.stop_token_ids or ())
        cfg = self.gen_config
        # The next step's host work reads this sequence's token values (the grammar's mask, penalties over the output
        # ids, bad-word prefixes): it is never scheduled while a token of it is pending.
        self.needs_host_tokens = (
            self.grammar is not None
            or cfg.repetition_penalty != 1.0
            or cfg.frequency_penalty != 0.0
            or cfg.presence_penalty != 0.0
            or bool(self.bad_word_ids)
        )

    @classmethod
    def from_request(cls, request: EngineRequest, cache_salt: str | None = None) -> Sequence:
        """A waiting sequence for an engine request (the prompt list is copied)."""
        prompt = request.prompt_token_ids
        return cls(
            request.request_id,
            list(prompt),
            len(prompt),
            request.gen_config,
            cache_salt=cache_salt,
            group=request.group,
            bad_word_ids=request.bad_word_ids,
            mm_items=tuple(MMItem.from_dict(entry) for entry in request.multimodal or ()),
        )

    def set_grammar(self, grammar: Any) -> None:
        """Attach a guided request's grammar state (before the sequence is scheduled)."""
        self.grammar = grammar
        self.needs_host_tokens = True

    @property
    def is_embedding(self) -> bool:
        """Whether this is an embedding request (pooled, never sampled)."""
        return self.pooling is not None

    @property
    def is_prefill_only(self) -> bool:
        """Whether the sequence ends once its prompt is computed, sampling nothing (embeddings, max_new_tokens=0)."""
        return self.pooling is not None or self.gen_config.max_new_tokens == 0

    @property
    def skips_prefix_hits(self) -> bool:
        """Whether the runner needs every prompt position computed (embeddings, prompt logprobs): such a sequence
        takes no prefix-cache hits, which would skip positions (its full blocks are still offered to the cache)."""
        return self.pooling is not None or self.gen_config.prompt_logprobs is not None

    def chunk_size(self, budget: int, encoder_budget: int | None = None, first: bool = True) -> int:
        """Tokens to compute next within `budget`: the uncomputed ones from `num_computed_tokens`, see
        `multimodal.chunk_for`."""
        num_new = min(self.num_uncomputed_tokens, budget)
        if not self.mm_items or self.num_computed_tokens >= self.num_prompt_tokens:
            return num_new
        return chunk_for(self.mm_items, self.num_computed_tokens, num_new, encoder_budget, first)

    @property
    def num_tokens(self) -> int:
        """Prompt and appended tokens."""
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        """Tokens appended after the prompt."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Positions whose KV is still to be computed, pending tokens included (the whole remaining prefill, or 1 for
        a decode)."""
        return len(self.token_ids) + self.num_pending_tokens - self.num_computed_tokens

    @property
    def last_token_id(self) -> int:
        """The newest appended token."""
        return self.token_ids[-1]

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt's token ids."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def generated_token_ids(self) -> list[int]:
        """The tokens appended after the prompt."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        """Whether the sequence has ended."""
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Append a real token id (the scheduler's `update` only)."""
        self.token_ids.append(token_id)

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        """Mark finished; releasing the blocks is the block manager's job (`BlockManager.free`)."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"Sequence.finish_reason must be one of {FINISH_REASONS}, got {reason!r}")
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
