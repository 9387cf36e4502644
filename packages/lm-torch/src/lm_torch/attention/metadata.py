"""The batch layout every attention backend reads: which new tokens belong to which sequence, and where."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """One step's flattened batch: `num_tokens` new tokens from `num_seqs` sequences, in sequence order.

    Sequence i contributes `query_lens[i]` new tokens; after this step its cache holds `context_lens[i]` tokens (the
    new ones last). Its tokens' K/V live in the blocks `block_tables[i]` (padded with 0 past its last block);
    `slot_mapping[t]` is the flat cache slot (block * block_size + offset) where new token t is written.
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_size: int
    # Every sequence's used blocks, concatenated: one gather per layer fetches the whole batch's context.
    context_blocks: torch.Tensor  # [sum of used blocks] int64
    context_block_starts: list[int]  # where sequence i's blocks start in context_blocks
    # Per-step layouts a backend derives once and every layer reuses (keyed by the backend).
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    # The same lengths as device tensors, for kernels (built by `build`; None when constructed without them):
    # sequence i's new tokens are rows [query_start_loc[i], query_start_loc[i + 1]) of the step.
    query_start_loc: torch.Tensor | None = None  # [num_seqs + 1] int32
    context_lens_tensor: torch.Tensor | None = None  # [num_seqs] int32

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)

    @classmethod
    def build(
        cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int, device
    ) -> AttentionMetadata:
        """Lay out a step from per-sequence lengths and block tables (the scheduler's view)."""
        width = max((len(t) for t in block_tables), default=1) or 1
        used = [
            table[: (ctx + block_size - 1) // block_size] for ctx, table in zip(context_lens, block_tables, strict=True)
        ]
        starts = [0]
        for blocks in used[:-1]:
            starts.append(starts[-1] + len(blocks))
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        slots: list[int] = []
        query_starts = [0]
        for n, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
            for pos in range(ctx - n, ctx):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            query_starts.append(query_starts[-1] + n)
        # One host-to-device copy for both int32 length tensors.
        lengths = torch.tensor(query_starts + list(context_lens), dtype=torch.int32).to(device)
        return cls(
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_size=block_size,
            context_blocks=torch.tensor([b for blocks in used for b in blocks], dtype=torch.int64, device=device),
            context_block_starts=starts,
            query_start_loc=lengths[: len(query_starts)],
            context_lens_tensor=lengths[len(query_starts) :],
        )
