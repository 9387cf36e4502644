"""Per-request state of the model runner: created when a request is first scheduled, dropped when the scheduler's
output names it finished (`ScheduledBatch.finished_request_ids`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lm_core.generation_config import GenerationConfig
from lm_torch.sampling import is_plain_greedy
from lm_torch.scheduler import NewRequest, ScheduledBatch


@dataclass
class RequestState:
    """What the runner keeps of one request between its steps."""

    request_id: str
    prompt_token_ids: list[int]
    gen_config: GenerationConfig
    bad_word_ids: list[list[int]] | None
    pooling: str | None
    normalize: bool
    grammar: Any
    # Tokens the runner sampled and accepted for the request (the penalties read them).
    output_token_ids: list[int] = field(default_factory=list)
    # A seeded request's own generator, advanced only by its draws: seeded output does not depend on the batch.
    generator: torch.Generator | None = None
    # Mean pooling over a chunked prompt: the float32 sum of the final hidden states computed so far ([hidden]).
    pooled_sum: torch.Tensor | None = None
    # The row of the runner's token buffer that holds this request's last sampled token while it runs (-1: none).
    slot: int = -1
    # Greedy with no other sampling stage: its tokens are the logits' arg-max, no sampler needed.
    is_plain_greedy: bool = False
    # Images and videos (`lm_torch.multimodal.MMItem`), by span; under M-RoPE the prompt's [3, num_prompt_tokens]
    # positions and the generated tokens' position shift, computed on the request's first step with items.
    mm_items: tuple[Any, ...] = ()
    mrope: Any = None
    rope_delta: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the request's prompt."""
        return len(self.prompt_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt and accepted output tokens (what a grammar state syncs with)."""
        return self.prompt_token_ids + self.output_token_ids

    @classmethod
    def create(cls, request: NewRequest) -> RequestState:
        """The state of a request the scheduler announced (its seeded generator created here)."""
        cfg = request.gen_config
        generator = None
        if cfg.random_seed is not None:
            # CPU generators: their draws are cheaper than CUDA ones, and the sampler accepts either.
            generator = torch.Generator().manual_seed(cfg.random_seed)
        return cls(
            request.request_id,
            list(request.prompt_token_ids),
            cfg,
            request.bad_word_ids,
            request.pooling,
            request.normalize,
            request.grammar,
            generator=generator,
            is_plain_greedy=is_plain_greedy(cfg) and request.grammar is None and not request.bad_word_ids,
            mm_items=tuple(request.mm_items),
        )


class RequestStates:
    """The runner's request states and the token-buffer slots of the running ones.

    A slot is taken by a request the first time it samples and given back when it is preempted or finished: at most
    `num_slots` (the engine's max_batch_size) requests run at once, so slots never run out. A slot freed while a
    launched step still writes it is safe to reuse: device work runs in launch order, and a newly admitted request
    reads no pending token from its slot in its first step.
    """

    def __init__(self, num_slots: int) -> None:
        self.states: dict[str, RequestState] = {}
        self._free_slots = list(range(num_slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, request_id: str) -> RequestState:
        return self.states[request_id]

    def apply(self, batch: ScheduledBatch) -> list[RequestState]:
        """Bring the states up to `batch`: drop the finished, free the preempted ones' slots, add the new requests,
        give a slot to each sampling row without one. Returns the state of each row."""
        for request_id in batch.finished_request_ids:
            state = self.states.pop(request_id, None)
            if state is not None:
                self._release(state)
        for request_id in batch.preempted_request_ids:
            state = self.states.get(request_id)
            if state is not None:
                self._release(state)
        for request in batch.new_requests:
            self.states[request.request_id] = RequestState.create(request)
        rows = [self.states[request_id] for request_id in batch.request_ids]
        for state, num_sampled in zip(rows, batch.num_sampled, strict=True):
            if num_sampled and state.slot < 0:
                if not self._free_slots:
                    raise RuntimeError("more running requests than token-buffer slots (max_batch_size)")
                state.slot = self._free_slots.pop()
        return rows

    def _release(self, state: RequestState) -> None:
        if state.slot >= 0:
            self._free_slots.append(state.slot)
            state.slot = -1
