"""The attention layer models call: rotary-embedded q, k, v in, attended output out, KV kept in the paged cache.

The backend comes from the `BuildContext` at construction. Its contract: `backend.forward(q, k, v, kv_cache, state,
scale=, sliding_window=, softcap=, kv_stored=)` with q [T, H, D], k and v [T, KVH, D], `kv_cache` the layer's cache
tuple (k, v[, k_scales_zeros, v_scales_zeros]) and `state` the per-step object the backend's `prepare()` returned
(models pass it through unchanged); `state.meta.slot_mapping` is the [T] cache slot of each token; the class
attribute `fuses_kv_store` says whether the backend takes k and v already stored by the rotary kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lm_torch.attention.base import AttentionBackend, AttentionState
from lm_torch.layers.context import BuildContext, context_or_current

if TYPE_CHECKING:
    from lm_torch.layers.linear import LinearBase
    from lm_torch.layers.rotary import RotaryEmbedding


def _scales_zeros(kv_cache: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A quantized cache's (k_scales_zeros, v_scales_zeros), (None, None) for an unquantized one."""
    if len(kv_cache) < 4:
        return None, None
    return kv_cache[2], kv_cache[3]


class PagedAttention(nn.Module):
    """Holds one layer's attention shape and its backend (torch on CPU, Triton on CUDA), which does the work."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        ctx: BuildContext | None = None,
    ) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.softcap = scale, sliding_window, softcap
        # None: a model built for something other than running steps (its logits, its weights); `forward` refuses.
        self.backend: AttentionBackend | None = ctx.attention_backend
        # Where the step's K/V write can happen in the kernel that computes them: a backend that takes k and v
        # already stored, and the Triton rotary kernel.
        self.fuses_kv_store = ctx.runs_triton and self.backend is not None and self.backend.fuses_kv_store

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, ...],  # (k, v) or a quantized `kv_quant.KVCache` (k, v, scales/zeros of each)
        attn: AttentionState,  # the backend's per-step state
        rotary: RotaryEmbedding | None = None,  # applied to q and k first (None: they arrive rotated)
        positions: torch.Tensor | None = None,  # [num_tokens] (or [3, num_tokens]: M-RoPE), with `rotary`
        kv_stored: bool = False,  # q arrives rotated and k, v are already in the cache (`project_rotate_store`)
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        """Attend the step's tokens; k and v are written into the cache on the way."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if rotary is not None and not kv_stored:
            if self.fuses_kv_store:
                # One kernel rotates q and k and writes k and v into the cache; the backend then only attends.
                if positions is None:
                    raise ValueError("PagedAttention: `rotary` needs `positions`")
                k_cache, v_cache = kv_cache[0], kv_cache[1]
                rotary.rotate_and_store(
                    positions, q, k, v, k_cache, v_cache, attn.meta.slot_mapping, *_scales_zeros(kv_cache)
                )
                kv_stored = True
            else:
                q, k = rotary(positions, q, k)
        if self.backend is None:
            raise ValueError("PagedAttention was built without an attention backend (BuildContext.attention_backend)")
        out = self.backend.forward(
            q,
            k,
            v,
            kv_cache,
            attn,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            kv_stored=kv_stored,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def project_rotate_store(
        self,
        qkv_proj: LinearBase,
        x: torch.Tensor,
        rotary: RotaryEmbedding | None,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, ...],
        attn: AttentionState,
    ) -> torch.Tensor | None:
        """The [q | k | v] projection of a one-token step with the rotary embedding and the KV-cache write folded
        into its kernel, where it can be (a layer that folds it, a backend that takes k and v stored, an unquantized
        cache, rotary over the whole head): the row with q and k rotated and k, v in the cache, for `forward(...,
        kv_stored=True)`. None where it cannot: the caller runs the projection, then `forward` with the rotary."""
        if not (qkv_proj.can_fold_qkv_rotary and self.fuses_kv_store) or rotary is None or x.shape[0] != 1:
            return None
        if rotary.rotary_dim != self.head_dim or positions.dim() != 1:
            return None
        if _scales_zeros(kv_cache)[0] is not None:  # a quantized cache: its scales need whole heads
            return None
        from lm_torch.kernels.w4a16 import QKVRotary

        rope = QKVRotary(
            positions,
            rotary.cos,
            rotary.sin,
            kv_cache[0],
            kv_cache[1],
            attn.meta.slot_mapping,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        return qkv_proj.forward_qkv_rotary(x, rope)
