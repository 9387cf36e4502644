"""Paged attention on CUDA through the Triton kernels: the GPU backend, same interface as `TorchAttentionBackend`.

A step's one-token sequences (decodes, or a prompt's last uncached token) go to the decode kernel, split-K over long
contexts; the others go to the prefill kernel in tiles of new tokens. Both read the cache the KV-store kernel has
just written, so a prefill chunk sees its cached prefix and itself. A quantized cache (`lm_torch.kv_quant`) comes
with its scales and zeros: the store kernel quantizes, the attention kernels dequantize. The per-step device tensors
(query start offsets, context lengths, the prefill tile list) are built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm_torch.attention.metadata import AttentionMetadata

LAYOUT_KEY = "triton_layout"
# From this many one-token sequences on, the decode kernel's programs start longest context first (one sort per
# step): a batch mixes contexts of a few tokens with thousands, and the long ones starting last leave the GPU waiting
# on them. Measured on the H100 (benchmarks/decode_ragged.py, contexts of real ShareGPT steps, RESULTS.md): at 256
# decodes the sort saves 9% (bf16) to 25-30% (int8, int4) of the kernel's time; at 128 it saves 10% with int8 but
# costs 4% with bf16, at 64 it costs bf16 6%. Hence two thresholds.
SORT_MIN_DECODES = 192
SORT_MIN_DECODES_QUANTIZED = 128


@dataclass
class StepLayout:
    """What the kernels need of a step beyond `AttentionMetadata`'s own tensors.

    The backend derives it from the metadata on the first layer; a caller that knows it already (the model runner,
    which builds every step's tensors at once, and the CUDA-graph capture, which must fix the split-K) stores it in
    `meta.cache[LAYOUT_KEY]` beforehand.
    """

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    num_decodes: int  # sequences with one new token
    max_decode_context: int  # the longest context among them (sizes the split-K)
    num_splits: int | None = None  # the decode kernel's split-K; None: the backend's own, else the heuristic
    decode_order: torch.Tensor | None = None  # the sequences by context length, longest first (the backend sorts)
    split_tokens: int | None = None  # the fewest tokens a decode split covers; None: the kernel's default
    num_tokens: int | None = None  # the step's real tokens, when q has padding rows after them (zeroed in the output)


class TritonAttentionBackend:
    """Writes the step's K/V into the paged cache and attends every new token with the Triton kernels.

    `num_splits` fixes the decode kernel's split-K (a CUDA graph must, since it is a launch constant); None picks it
    per step from the batch size and the longest context.
    """

    # `PagedAttention` may hand this backend k and v already in the cache (rotary and KV store in one kernel).
    fuses_kv_store = True

    def __init__(self, num_splits: int | None = None) -> None:
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be at least 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        kv_stored: bool = False,  # the caller already wrote k and v into the cache (the fused rotary kernel)
        k_scales_zeros: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads, 2]: a quantized cache
        v_scales_zeros: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        from lm_torch.kernels.decode_attention import (
            LAUNCH_KEYS,
            MIN_TOKENS_PER_SPLIT,
            decode_attention,
            tuned_decode_plan,
        )
        from lm_torch.kernels.kv_cache import store_kv_cache
        from lm_torch.kernels.prefill_attention import prefill_attention, prefill_tiles, tokens_per_tile

        if k_cache.shape[1] != meta.block_size:
            raise ValueError(f"cache blocks hold {k_cache.shape[1]} tokens but the metadata says {meta.block_size}")
        if not kv_stored:
            store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scales_zeros, v_scales_zeros)
        scales_zeros = {"k_scales_zeros": k_scales_zeros, "v_scales_zeros": v_scales_zeros}
        layout = _step_layout(meta, q.device)
        out = torch.empty_like(q)
        if layout.num_tokens is not None and layout.num_tokens < q.shape[0]:
            out[layout.num_tokens :].zero_()  # no kernel writes padding rows: zeros, not the memory's old contents
        if layout.num_decodes:
            # An unquantized cache the tuning table was measured with (card, head_dim, element size) takes the plan
            # measured for this many decodes (launch shape, split-K, order); otherwise the kernel's defaults and the
            # thresholds above.
            plan = tuned_decode_plan(layout.num_decodes, k_cache)  # None for quantized (uint8) caches
            threshold = SORT_MIN_DECODES if k_scales_zeros is None else SORT_MIN_DECODES_QUANTIZED
            sort = plan["sort"] if plan is not None else layout.num_decodes >= threshold
            if sort and layout.decode_order is None:
                # Once per step (the first layer's call; inside a CUDA graph it is captured with the step).
                layout.decode_order = torch.argsort(layout.context_lens, descending=True).to(torch.int32)
            num_splits, split_tokens = layout.num_splits, layout.split_tokens
            if num_splits is None:
                num_splits = self.num_splits
                if num_splits is None and plan is not None:
                    num_splits, split_tokens = plan["num_splits"], plan["split_tokens"]
            decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                layout.query_start_loc,
                layout.context_lens,
                scale,
                max_context_len=layout.max_decode_context,
                sliding_window=sliding_window,
                softcap=softcap,
                num_splits=num_splits,
                out=out,
                seq_order=layout.decode_order,
                split_tokens=split_tokens or MIN_TOKENS_PER_SPLIT,
                **({key: plan[key] for key in LAUNCH_KEYS} if plan is not None else {}),
                **scales_zeros,
            )
        if layout.num_decodes < meta.num_seqs:
            per_tile = tokens_per_tile(q.shape[1] // k_cache.shape[2], q.shape[2])
            key = ("triton_prefill_tiles", per_tile)
            tiles = meta.cache.get(key)
            if tiles is None:
                tiles = meta.cache[key] = prefill_tiles(meta.query_lens, per_tile, q.device)
            prefill_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                layout.query_start_loc,
                layout.context_lens,
                tiles[0],
                tiles[1],
                scale,
                tokens_per_tile=per_tile,
                sliding_window=sliding_window,
                softcap=softcap,
                out=out,
                **scales_zeros,
            )
        return out


def _step_layout(meta: AttentionMetadata, device: torch.device) -> StepLayout:
    """The step's layout, from the metadata's optional tensors where `AttentionMetadata.build` made them."""
    cached = meta.cache.get(LAYOUT_KEY)
    if cached is not None:
        return cached
    query_start_loc, context_lens = meta.query_start_loc, meta.context_lens_tensor
    if query_start_loc is None or context_lens is None:
        starts = [0]
        for n in meta.query_lens:
            starts.append(starts[-1] + n)
        query_start_loc = torch.tensor(starts, dtype=torch.int32).to(device)
        context_lens = torch.tensor(meta.context_lens, dtype=torch.int32).to(device)
    decodes = [ctx for n, ctx in zip(meta.query_lens, meta.context_lens, strict=True) if n == 1]
    layout = StepLayout(
        query_start_loc=query_start_loc,
        context_lens=context_lens,
        num_decodes=len(decodes),
        max_decode_context=max(decodes, default=0),
    )
    meta.cache[LAYOUT_KEY] = layout
    return layout
