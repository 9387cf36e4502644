"""Prompt logprobs: the model's raw log-softmax over a prompt, computed while the prompt is prefilled.

Position p of a sequence predicts token p + 1, so a step that computes positions `[start, start + n)` yields the
log-probabilities of prompt tokens `start + 1` up to the last prompt token (the last prompt position predicts the
first generated token: that is the sampler's). Chunks of one prompt therefore join without a gap: a chunk's last
position predicts the next chunk's first token, which is known already.

Only the sequences that ask pay for this: their positions go through the LM head in slices of at most `SLICE_BYTES`
of float32 logits, and each position is reduced on the device to the prompt token's log-probability and the top N
before anything moves to the host. The values are the log-softmax of the raw logits in float32, as transformers'
`log_softmax(model(ids).logits)`: no temperature, penalty, bias or grammar applies to a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from lm_torch.sampling.params import host_tensor, start_host_copy

if TYPE_CHECKING:
    from lm_torch.models.base import CausalLM
    from lm_torch.runner.state import RequestState
    from lm_torch.scheduler import ScheduledBatch

# The most float32 logits computed at once ([rows, vocab]): bounds the memory a long prompt's logprobs take.
SLICE_BYTES = 32 * 1024**2


@dataclass
class PromptLogprobsChunk:
    """One step's prompt logprobs of one sequence: `entries[j]` is {prompt token: logprob, top-N token: logprob, ...}
    of prompt token `first + j` (the first prompt token has none, so `first >= 1`)."""

    first: int
    entries: list[dict[int, float]]


@dataclass
class _Span:
    row: int  # the sequence's index in the batch
    first: int  # index of the first prompt token predicted in this step
    count: int  # how many prompt tokens this step predicts
    num_top: int
    hidden_start: int  # the row of the step's hidden states that predicts token `first`


def _spans(batch: ScheduledBatch, states: list[RequestState]) -> list[_Span]:
    spans = []
    starts = None
    for i, state in enumerate(states):
        num_top = state.gen_config.prompt_logprobs
        if num_top is None:
            continue
        start = batch.starts[i]
        stop = min(start + batch.num_new_tokens[i], state.num_prompt_tokens - 1)
        if stop <= start:
            continue
        if starts is None:  # the step's tokens are laid out sequence after sequence, in batch order
            starts = [0, *accumulate(batch.num_new_tokens)]
        spans.append(_Span(i, start + 1, stop - start, num_top, starts[i]))
    return spans


def compute_prompt_logprobs(
    model: CausalLM,
    hidden: torch.Tensor,
    batch: ScheduledBatch,
    states: list[RequestState],
    vocab_size: int,
) -> PendingPromptLogprobs | None:
    """Queue the prompt logprobs that `batch` yields (None when no request in it wants any); `states[i]` is row i's
    request.

    hidden: [num_tokens (+ padding), hidden] final hidden states of every token of the step, sequence after sequence.
    """
    spans = _spans(batch, states)
    if not spans:
        return None
    device = hidden.device
    positions = [s.hidden_start + j for s in spans for j in range(s.count)]
    targets = [t for s in spans for t in states[s.row].prompt_token_ids[s.first : s.first + s.count]]
    index = host_tensor(positions, torch.int64, device)  # [rows]
    target_index = host_tensor(targets, torch.int64, device)  # [rows]
    num_rows, width = len(positions), max(s.num_top for s in spans)
    target_lp = torch.empty(num_rows, dtype=torch.float32, device=device)
    top_values = torch.empty(num_rows, width, dtype=torch.float32, device=device)
    top_ids = torch.empty(num_rows, width, dtype=torch.int64, device=device)
    slice_rows = max(1, SLICE_BYTES // (4 * vocab_size))
    for a in range(0, num_rows, slice_rows):
        b = min(a + slice_rows, num_rows)
        logits = model.compute_logits(hidden.index_select(0, index[a:b]))[:, :vocab_size]  # [b - a, vocab] float32
        logprobs = torch.log_softmax(logits, dim=-1)
        target_lp[a:b] = logprobs.gather(1, target_index[a:b, None]).squeeze(1)
        if width:
            top = logprobs.topk(width, dim=-1)
            top_values[a:b], top_ids[a:b] = top.values, top.indices
    return PendingPromptLogprobs(spans, targets, [target_lp, top_ids, top_values])


class PendingPromptLogprobs:
    """A step's prompt logprobs on their way to the host (on CUDA a non-blocking copy into pinned memory with an event
    after it, as `PendingLogprobs`); `resolve()` builds each sequence's `PromptLogprobsChunk`."""

    def __init__(self, spans: list[_Span], targets: list[int], tensors: list[torch.Tensor]) -> None:
        self._spans, self._targets = spans, targets
        tensors, self._event = start_host_copy(tensors)
        self._tensors = tensors

    def resolve(self, num_rows: int) -> list[PromptLogprobsChunk | None]:
        """Per batch row (of `num_rows`): the prompt logprobs this step yielded for it, or None."""
        if self._event is not None:
            self._event.synchronize()
        target_lp, top_ids, top_values = (t.tolist() for t in self._tensors)
        result: list[PromptLogprobsChunk | None] = [None] * num_rows
        offset = 0
        for span in self._spans:
            entries = []
            for j in range(offset, offset + span.count):
                entry = dict(zip(top_ids[j][: span.num_top], top_values[j][: span.num_top], strict=True))
                entry[self._targets[j]] = target_lp[j]
                entries.append(entry)
            result[span.row] = PromptLogprobsChunk(span.first, entries)
            offset += span.count
        return result
