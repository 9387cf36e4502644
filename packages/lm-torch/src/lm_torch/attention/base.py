"""The contract between the model runner and the attention backends.

The runner builds one `StepMetadata` per step (the batch layout, typed and frozen); the backend turns it into its
own per-step state once (`AttentionBackend.prepare`: tiles, decode order, split plan), and every attention layer of
the step hands that state back to `AttentionBackend.forward`. CUDA graphs fix what must be launch constants at
capture (`prepare_for_capture`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepMetadata:
    """One step's flattened batch: `num_tokens` new tokens from `num_seqs` sequences, sequence after sequence.

    Sequence i contributes `query_lens[i]` new tokens; after this step its cache holds `context_lens[i]` tokens (the
    new ones last). Its tokens' K/V live in the blocks `block_tables[i]` (padded with 0 past its last block);
    `slot_mapping[t]` is the flat cache slot (block * block_size + offset) where new token t is written (-1: a
    padding row, nothing written). Rows of the step from `num_real_tokens` on are padding that belongs to no
    sequence.

    `key_limits` (None: every new token attends causally) widens the causal mask of prefill tokens: new token t sees
    its sequence's key positions below `key_limits[t]`, which is at least its own position + 1 and at most its
    sequence's context length (a sliding window still cuts keys from below, relative to t's position). One-token
    sequences always attend causally. Gemma 3 gives the placeholder tokens of an image its span's end, so that the
    image's tokens attend each other bidirectionally (`VisionLanguageModel.bidirectional_images`).
    """

    query_lens: list[int]  # [S], host
    context_lens: list[int]  # [S], host
    block_size: int
    block_tables: torch.Tensor  # [S, W] int32 or int64
    slot_mapping: torch.Tensor  # [T] int32 or int64
    query_start_loc: torch.Tensor  # [S + 1] int32: sequence i's tokens are rows [qsl[i], qsl[i + 1])
    context_lens_tensor: torch.Tensor  # [S] int32
    num_decodes: int  # sequences with one new token
    max_decode_context: int  # the longest context among them
    num_real_tokens: int
    # The prefill kernel's tiles of `tokens_per_tile` new tokens, when the runner built them with the step's other
    # inputs (CUDA eager steps).
    tile_seq: torch.Tensor | None = None
    tile_first: torch.Tensor | None = None
    tokens_per_tile: int | None = None
    key_limits: torch.Tensor | None = None  # [num_real_tokens] int32: exclusive bound of each token's visible keys

    @property
    def num_seqs(self) -> int:
        """Sequences in the step."""
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        """Whether every sequence of the step has one new token."""
        return self.num_decodes == self.num_seqs

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        key_limits: list[int] | None = None,
    ) -> StepMetadata:
        """Lay out a step from per-sequence lengths and block tables (the scheduler's view); `key_limits`, one per
        new token, as the field."""
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        slots: list[int] = []
        query_starts = [0]
        for n, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
            for pos in range(ctx - n, ctx):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            query_starts.append(query_starts[-1] + n)
        lengths = torch.tensor(query_starts + list(context_lens), dtype=torch.int32).to(device)
        decodes = [ctx for n, ctx in zip(query_lens, context_lens, strict=True) if n == 1]
        return cls(
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_size=block_size,
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=lengths[: len(query_starts)],
            context_lens_tensor=lengths[len(query_starts) :],
            num_decodes=len(decodes),
            max_decode_context=max(decodes, default=0),
            num_real_tokens=query_starts[-1],
            key_limits=None if key_limits is None else torch.tensor(key_limits, dtype=torch.int32, device=device),
        )


@dataclass
class AttentionState:
    """A backend's per-step state, built by `prepare` and read by every layer of the step. Backends subclass it."""

    meta: StepMetadata


class AttentionBackend(ABC):
    """Writes a step's K/V into the paged cache and attends every new token to its sequence's context."""

    # Whether `forward` accepts k and v already written to the cache (`kv_stored=True`: rotary and KV store in one
    # kernel before it).
    fuses_kv_store: bool = False

    @abstractmethod
    def prepare(self, meta: StepMetadata) -> AttentionState:
        """The step's state, computed once and shared by every layer."""

    def prepare_for_capture(self, meta: StepMetadata, batch_size: int) -> AttentionState:
        """The state a CUDA graph of `batch_size` decodes captures (launch constants fixed); by default `prepare`."""
        return self.prepare(meta)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, ...],  # (k, v) [blocks, block_size, kv_heads, head_dim], + scales/zeros
        state: AttentionState,
        *,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Attend the step's new tokens (storing k and v first unless `kv_stored`)."""
