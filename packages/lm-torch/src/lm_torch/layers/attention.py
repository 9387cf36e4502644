"""The attention layer models call: rotary-embedded q, k, v in, attended output out, KV kept in the paged cache."""

from __future__ import annotations

import torch
from torch import nn

from lm_torch.attention.base import AttentionState
from lm_torch.kernels import runs_triton


class PagedAttention(nn.Module):
    """Holds one layer's attention shape; the backend (torch on CPU, Triton on CUDA) does the work."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.softcap = scale, sliding_window, softcap
        self.backend = None  # set by the model runner, which knows the device

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, ...],  # (k, v) or a quantized `kv_quant.KVCache` (k, v, scales/zeros of each)
        state: AttentionState,
        rotary=None,  # a RotaryEmbedding to apply to q and k first (None: they arrive rotated)
        positions: torch.Tensor | None = None,  # [num_tokens], with `rotary`
        kv_stored: bool = False,  # q arrives rotated and k, v are already in the cache (`project_rotate_store`)
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        scales_zeros = tuple(kv_cache[2:4]) if len(kv_cache) > 2 else (None, None)
        if rotary is not None and not kv_stored:
            if self._fuses_kv_store(q):
                # One kernel rotates q and k and writes k and v into the cache; the backend then only attends.
                rotary.rotate_and_store(
                    positions, q, k, v, kv_cache[0], kv_cache[1], state.meta.slot_mapping, *scales_zeros
                )
                kv_stored = True
            else:
                q, k = rotary(positions, q, k)
        out = self.backend.forward(
            q,
            k,
            v,
            kv_cache,
            state,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            kv_stored=kv_stored,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _fuses_kv_store(self, t: torch.Tensor) -> bool:
        """Whether this step's K/V write can happen in the kernel that computes them (the Triton backend takes k and v
        already in the cache, and `t` is where Triton runs)."""
        return getattr(self.backend, "fuses_kv_store", False) and runs_triton(t)

    def project_rotate_store(self, qkv_proj, x, rotary, positions, kv_cache, state) -> torch.Tensor | None:
        """The [q | k | v] projection of a one-token step with the rotary embedding and the KV-cache write folded
        into its kernel, where it can be (a W4A16 layer's one-row GEMV on CUDA, the Triton backend, an unquantized
        cache, rotary over the whole head): the row with q and k rotated and k, v in the cache, for `forward(...,
        kv_stored=True)`. None where it cannot: the caller runs the projection, then `forward` with the rotary."""
        fused = getattr(qkv_proj, "forward_qkv_rotary", None)
        if fused is None or rotary is None or x.shape[0] != 1 or rotary.rotary_dim != self.head_dim:
            return None
        if not self._fuses_kv_store(x):
            return None
        if len(kv_cache) > 2 and kv_cache[2] is not None:  # a quantized cache: its scales need whole heads
            return None
        from lm_torch.kernels.w4a16 import QKVRotary

        rope = QKVRotary(
            positions,
            rotary.cos,
            rotary.sin,
            kv_cache[0],
            kv_cache[1],
            state.meta.slot_mapping,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        return fused(x, rope)
