"""Paged attention on CUDA through the Triton kernels: the GPU backend, same interface as `TorchAttentionBackend`.

A step's one-token sequences (decodes, or a prompt's last uncached token) go to the decode kernel, split-K over long
contexts; the others go to the prefill kernel in tiles of new tokens. Both read the cache the KV-store kernel has
just written, so a prefill chunk sees its cached prefix and itself. A quantized cache (`lm_torch.kv_quant`) comes
with its scales and zeros: the store kernel quantizes, the attention kernels dequantize. The per-step device tensors
(query start offsets, context lengths, the prefill tile list) are built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lm_torch.attention.base import AttentionBackend, AttentionState, StepMetadata
from lm_torch.config import KernelConfig

if TYPE_CHECKING:
    from lm_torch.kernels.tuning import TuningTables

# From this many one-token sequences on, the decode kernel's programs start longest context first (one sort per
# step): a batch mixes contexts of a few tokens with thousands, and the long ones starting last leave the GPU waiting
# on them. The sort pays off at large batches and costs a little at small ones, more so for an unquantized cache
# (benchmarks/decode_ragged.py measures it; benchmarks/RESULTS.md has the figures): hence two thresholds.
SORT_MIN_DECODES = 192
SORT_MIN_DECODES_QUANTIZED = 128


@dataclass
class TritonAttentionState(AttentionState):
    """The Triton backend's step: the decode kernel's split plan (fixed for a CUDA graph, else chosen per step), and
    what the first layer derives for the rest: the tuned plan, the longest-first decode order, the prefill tiles."""

    num_splits: int | None = None  # None: the tuned plan's, else the kernel's heuristic
    split_tokens: int | None = None
    plans: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # cache signature -> tuned decode plan or None
    decode_order: torch.Tensor | None = None
    tiles: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # tokens per tile -> tiles


class TritonAttentionBackend(AttentionBackend):
    """Writes the step's K/V into the paged cache and attends every new token with the Triton kernels.

    `num_splits` fixes the decode kernel's split-K for every step; None picks it per step from the tuned plan or the
    batch size and the longest context. `kernels` (`KernelConfig`: programmatic dependent launch, the forced split
    plan of CUDA graphs) and `tuning` (the engine's tuning tables; None: the shipped ones) are the engine's;
    `max_context_len` is the longest context a CUDA graph's split plan is chosen for. `k_cache` is the engine's first
    layer's K cache, set once the cache exists: the graphs' tuned plans are looked up for it.
    """

    fuses_kv_store = True

    def __init__(
        self,
        num_splits: int | None = None,
        *,
        kernels: KernelConfig | None = None,
        tuning: TuningTables | None = None,
        max_context_len: int = 1024,
    ) -> None:
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be at least 1, got {num_splits}")
        self.num_splits = num_splits
        self.kernels = kernels if kernels is not None else KernelConfig()
        self.tuning = tuning
        self.max_context_len = max_context_len
        self.k_cache: torch.Tensor | None = None

    def prepare(self, meta: StepMetadata) -> TritonAttentionState:
        """A fresh per-step state; plans, order and tiles are derived by the first layer."""
        return TritonAttentionState(meta, num_splits=self.num_splits)

    def prepare_for_capture(self, meta: StepMetadata, batch_size: int) -> TritonAttentionState:
        """The state of a CUDA graph of `batch_size` decodes: its split plan fixed at capture."""
        from lm_torch.kernels.decode_attention import graph_split_plan

        k_cache = self.k_cache
        num_kv_heads = k_cache.shape[2] if k_cache is not None else 1
        splits, split_tokens = graph_split_plan(
            batch_size,
            num_kv_heads,
            self.max_context_len,
            meta.block_tables.device,
            self.kernels.decode_splits,
            self.tuning,
            k_cache,
        )
        return TritonAttentionState(meta, num_splits=splits, split_tokens=split_tokens)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, ...],
        state: AttentionState,
        *,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        kv_stored: bool = False,  # the caller already wrote k and v into the cache (the fused rotary kernel)
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store the step's K/V (unless `kv_stored`), then run the decode and prefill kernels."""
        from lm_torch.kernels.decode_attention import (
            LAUNCH_KEYS,
            MIN_TOKENS_PER_SPLIT,
            decode_attention,
            tuned_decode_plan,
        )
        from lm_torch.kernels.kv_cache import store_kv_cache
        from lm_torch.kernels.prefill_attention import prefill_attention, prefill_tiles, tokens_per_tile

        assert isinstance(state, TritonAttentionState)
        meta = state.meta
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        k_scales_zeros, v_scales_zeros = (kv_cache[2], kv_cache[3]) if len(kv_cache) > 2 else (None, None)
        if k_cache.shape[1] != meta.block_size:
            raise ValueError(f"cache blocks hold {k_cache.shape[1]} tokens but the metadata says {meta.block_size}")
        if not kv_stored:
            store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scales_zeros, v_scales_zeros)
        out = torch.empty_like(q)
        if meta.num_real_tokens < q.shape[0]:
            out[meta.num_real_tokens :].zero_()  # no kernel writes padding rows: zeros, not the memory's old contents
        if meta.num_decodes:
            # An unquantized cache the tuning table was measured with (card, head_dim, element size) takes the plan
            # measured for this many decodes (launch shape, split-K, order); otherwise the kernel's defaults and the
            # thresholds above.
            signature = (k_cache.dtype, k_cache.shape[2], k_cache.shape[3])
            if signature not in state.plans:
                state.plans[signature] = tuned_decode_plan(meta.num_decodes, k_cache, self.tuning)  # None: quantized
            plan = state.plans[signature]
            threshold = SORT_MIN_DECODES if k_scales_zeros is None else SORT_MIN_DECODES_QUANTIZED
            sort = plan["sort"] if plan is not None else meta.num_decodes >= threshold
            if sort and state.decode_order is None:
                # Once per step (the first layer's call; inside a CUDA graph it is captured with the step).
                state.decode_order = torch.argsort(meta.context_lens_tensor, descending=True).to(torch.int32)
            num_splits, split_tokens = state.num_splits, state.split_tokens
            if num_splits is None and plan is not None:
                num_splits, split_tokens = plan["num_splits"], plan["split_tokens"]
            decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.context_lens_tensor,
                scale,
                max_context_len=meta.max_decode_context,
                sliding_window=sliding_window,
                softcap=softcap,
                num_splits=num_splits,
                out=out,
                seq_order=state.decode_order if sort else None,
                split_tokens=split_tokens or MIN_TOKENS_PER_SPLIT,
                **({key: plan[key] for key in LAUNCH_KEYS} if plan is not None else {}),
                k_scales_zeros=k_scales_zeros,
                v_scales_zeros=v_scales_zeros,
                allow_pdl=self.kernels.pdl,
            )
        if meta.num_decodes < meta.num_seqs:
            per_tile = tokens_per_tile(q.shape[1] // k_cache.shape[2], q.shape[2])
            tiles = state.tiles.get(per_tile)
            if tiles is None:
                if meta.tile_seq is not None and meta.tile_first is not None and meta.tokens_per_tile == per_tile:
                    tiles = (meta.tile_seq, meta.tile_first)  # built by the runner for this tile size
                else:
                    tiles = prefill_tiles(meta.query_lens, per_tile, q.device)
                state.tiles[per_tile] = tiles
            prefill_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.context_lens_tensor,
                tiles[0],
                tiles[1],
                scale,
                tokens_per_tile=per_tile,
                sliding_window=sliding_window,
                softcap=softcap,
                out=out,
                k_scales_zeros=k_scales_zeros,
                v_scales_zeros=v_scales_zeros,
                key_limits=meta.key_limits,
            )
        return out
