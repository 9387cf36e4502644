"""Paged attention in plain torch: the CPU backend, and the reference the Triton kernels are tested against.

Each sequence is attended on its own (gathering its blocks), so a sequence's result never depends on what else is
in the batch: batch invariance by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm_torch.attention.metadata import AttentionMetadata


class TorchAttentionBackend:
    """Writes the step's K/V into the paged cache and attends each new token to its sequence's cached tokens."""

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
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        flat_k = k_cache.view(-1, num_kv_heads, head_dim)
        flat_v = v_cache.view(-1, num_kv_heads, head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        flat_v.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        out = torch.empty_like(q)
        start = 0
        for i, (num_new, ctx) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            blocks = meta.block_tables[i, : (ctx + meta.block_size - 1) // meta.block_size]
            keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
            values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
            out[start : start + num_new] = attend(
                q[start : start + num_new], keys, values, scale, sliding_window, softcap
            ).to(q.dtype)
            start += num_new
        return out


def attend(
    q: torch.Tensor,  # [num_new, num_heads, head_dim]: the last num_new of the ctx positions
    keys: torch.Tensor,  # [ctx, num_kv_heads, head_dim]
    values: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of the newest `num_new` positions over `ctx` cached ones (GQA by head groups)."""
    num_new, ctx = q.shape[0], keys.shape[0]
    positions = torch.arange(ctx - num_new, ctx, device=q.device)[:, None]
    key_positions = torch.arange(ctx, device=q.device)[None, :]
    allowed = key_positions <= positions  # [num_new, ctx]
    if sliding_window is not None:
        allowed &= key_positions > positions - sliding_window
    q_t, k_t, v_t = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)  # heads first
    if softcap is None:
        return F.scaled_dot_product_attention(
            q_t.unsqueeze(0), k_t.unsqueeze(0), v_t.unsqueeze(0), attn_mask=allowed, scale=scale, enable_gqa=True
        )[0].transpose(0, 1)
    # Soft-capping sits between the scores and the softmax, which SDPA does not expose.
    group = q.shape[1] // keys.shape[1]
    k_t = k_t.repeat_interleave(group, dim=0)
    v_t = v_t.repeat_interleave(group, dim=0)
    scores = torch.matmul(q_t.float(), k_t.float().transpose(1, 2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v_t.float()).transpose(0, 1)
