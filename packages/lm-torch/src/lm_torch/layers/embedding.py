"""The token embedding, split over the tensor-parallel ranks by vocabulary (the Megatron scheme).

Each rank holds `ceil(vocab / tp)` rows, the last rank's share padded with zero rows past the vocabulary
(`sharding.mark_sharded(..., padded=True)`). A rank looks up the ids in its range, writes zeros for the others, and
the all-reduce sums the one non-zero row of each token. A tied LM head shares the rank's rows: each rank computes its
share of the logits and `CausalLM.compute_logits` gathers them. At tp 1 this is `nn.Embedding`.
"""

from __future__ import annotations

import torch
from torch import nn

from lm_torch.distributed.sharding import mark_sharded
from lm_torch.layers.context import BuildContext, context_or_current


def vocab_shard_size(vocab_size: int, tp_size: int) -> int:
    """Rows of the vocabulary each of `tp_size` ranks holds (the last one's padded)."""
    return -(-vocab_size // tp_size)


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding over this rank's rows of the vocabulary; the whole embedding after the all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: BuildContext | None = None) -> None:
        ctx = context_or_current(ctx)
        self.tp = ctx.tp
        self.vocab_size = vocab_size
        rows = vocab_shard_size(vocab_size, self.tp.size)
        super().__init__(rows, hidden_size)
        self.vocab_start = self.tp.rank * rows
        if self.tp.size > 1:
            mark_sharded(self.weight, 0, padded=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        """input_ids: [num_tokens] in [0, vocab_size)."""
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        hidden = super().forward(local.masked_fill(outside, 0))
        hidden.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(hidden)
