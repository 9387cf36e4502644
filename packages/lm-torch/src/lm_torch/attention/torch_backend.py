"""Paged attention in plain torch: the CPU backend, and the reference the Triton kernels are tested against.

Each sequence is attended on its own (gathering its blocks), so a sequence's result never depends on what else is
in the batch: batch invariance by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        kv_stored: bool = False,  # the caller already wrote k and v into the cache
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        if not kv_stored:
            flat_k = k_cache.view(-1, num_kv_heads, head_dim)
            flat_v = v_cache.view(-1, num_kv_heads, head_dim)
            flat_k.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
            flat_v.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        out = torch.empty_like(q)
        starts = [0]
        for n in meta.query_lens:
            starts.append(starts[-1] + n)
        per_sequence = list(range(meta.num_seqs))
        if softcap is None:
            decodes = [i for i in per_sequence if meta.query_lens[i] == 1]
            per_sequence = [i for i in per_sequence if meta.query_lens[i] != 1]
            self._decode_by_bucket(q, k_cache, v_cache, meta, decodes, starts, scale, sliding_window, out)
        if not per_sequence:
            return out
        # One gather per layer for the remaining sequences; each reads its slice (a view, no copy).
        batch_keys = k_cache.index_select(0, meta.context_blocks).view(-1, num_kv_heads, head_dim)
        batch_values = v_cache.index_select(0, meta.context_blocks).view(-1, num_kv_heads, head_dim)
        for i in per_sequence:
            num_new, ctx = meta.query_lens[i], meta.context_lens[i]
            first = meta.context_block_starts[i] * meta.block_size
            out[starts[i] : starts[i] + num_new] = attend(
                q[starts[i] : starts[i] + num_new],
                batch_keys[first : first + ctx],
                batch_values[first : first + ctx],
                scale,
                sliding_window,
                softcap,
            ).to(q.dtype)
        return out

    @staticmethod
    def _decode_by_bucket(q, k_cache, v_cache, meta, rows, starts, scale, sliding_window, out) -> None:
        """Decode rows attend in groups padded to a power-of-two number of blocks, one SDPA call per group.

        A row's padded length depends on its own context only, never on the batch, and each (row, head) is computed
        independently inside SDPA: a sequence decodes to the same bits alone or in any batch.
        """
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        for group in decode_groups(meta, rows, starts, sliding_window, q.device):
            size, length = len(group.token_rows), group.length
            keys = k_cache[group.tables].view(size * length, num_kv_heads, head_dim)
            values = v_cache[group.tables].view(size * length, num_kv_heads, head_dim)
            # Slots past a row's context hold whatever the block held before (never NaN in practice, but a masked
            # score only zeroes a value's weight, and 0 * NaN is NaN): clear them in the gathered copy.
            if group.padding is not None:
                keys.index_fill_(0, group.padding, 0.0)
                values.index_fill_(0, group.padding, 0.0)
            keys = keys.view(size, length, num_kv_heads, head_dim).transpose(1, 2)
            values = values.view(size, length, num_kv_heads, head_dim).transpose(1, 2)
            queries = q[group.token_rows].unsqueeze(2)  # [group, num_heads, 1, head_dim]
            attended = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=group.mask, scale=scale, enable_gqa=True
            )  # [group, num_heads, 1, head_dim]
            out[group.token_rows] = attended.squeeze(2).to(out.dtype)


@dataclass
class DecodeGroup:
    """Decode rows that share one padded length: their block tables, attention mask and padding slots."""

    token_rows: torch.Tensor  # [group] rows of q
    tables: torch.Tensor  # [group, width] block ids (padding blocks are any valid id: their slots are cleared)
    length: int  # width * block_size
    mask: torch.Tensor  # [group, 1, 1, length] bool: key positions each row may see
    padding: torch.Tensor | None  # flat positions (row * length + key) of the gathered K/V past each row's context


def decode_groups(meta: AttentionMetadata, rows, starts, sliding_window, device) -> list[DecodeGroup]:
    """The step's decode grouping, built once per step and sliding window and shared by every layer."""
    key = ("decode_groups", sliding_window)
    cached = meta.cache.get(key)
    if cached is not None:
        return cached
    buckets: dict[int, list[int]] = {}
    for i in rows:
        num_blocks = (meta.context_lens[i] + meta.block_size - 1) // meta.block_size
        buckets.setdefault(1 << (num_blocks - 1).bit_length(), []).append(i)
    groups = []
    for width, members in buckets.items():
        tables = meta.block_tables[members, : min(width, meta.block_tables.shape[1])]
        if tables.shape[1] < width:
            tables = F.pad(tables, (0, width - tables.shape[1]))
        length = width * meta.block_size
        ctx = torch.tensor([meta.context_lens[i] for i in members], device=device)[:, None]
        key_positions = torch.arange(length, device=device)[None, :]
        allowed = key_positions < ctx  # [group, length]
        if sliding_window is not None:
            allowed &= key_positions >= ctx - sliding_window
        padding = (~(key_positions < ctx)).flatten().nonzero().flatten()
        groups.append(
            DecodeGroup(
                token_rows=torch.tensor([starts[i] for i in members], device=device),
                tables=tables,
                length=length,
                mask=allowed[:, None, None, :],
                padding=padding if padding.numel() else None,
            )
        )
    meta.cache[key] = groups
    return groups


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
    allowed = None
    if num_new > 1 or (sliding_window is not None and ctx > sliding_window):
        # A single new token sees every cached one unless a window cuts them: no mask needed then.
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
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v_t.float()).transpose(0, 1)
