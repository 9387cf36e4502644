"""Paged attention in plain torch: the CPU backend, and the reference the Triton kernels are tested against.

Each sequence is attended on its own (gathering its blocks), so a sequence's result never depends on what else is
in the batch: batch invariance by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lm_torch.attention.base import AttentionBackend, AttentionState, StepMetadata
from lm_torch.kv_quant import cache_quant_policy, dequantize_kv, quantize_kv


@dataclass
class TorchAttentionState(AttentionState):
    """The torch backend's step: every sequence's used blocks in one index tensor, and the decode grouping per
    sliding window (built by the first layer that needs it)."""

    context_blocks: torch.Tensor = None  # type: ignore[assignment]  # [sum of used blocks] int64
    context_block_starts: list[int] = field(default_factory=list)  # where sequence i's blocks start
    query_starts: list[int] = field(default_factory=list)  # [S + 1]: sequence i's rows of q
    decode_groups: dict[int | None, list[DecodeGroup]] = field(default_factory=dict)


class TorchAttentionBackend(AttentionBackend):
    """Writes the step's K/V into the paged cache and attends each new token to its sequence's cached tokens."""

    def prepare(self, meta: StepMetadata) -> TorchAttentionState:
        """The step's used blocks per sequence, gathered once for every layer."""
        tables = meta.block_tables.tolist()
        bs = meta.block_size
        used = [table[: (ctx + bs - 1) // bs] for ctx, table in zip(meta.context_lens, tables, strict=True)]
        starts = [0]
        for blocks in used[:-1]:
            starts.append(starts[-1] + len(blocks))
        query_starts = [0]
        for n in meta.query_lens:
            query_starts.append(query_starts[-1] + n)
        blocks = torch.tensor([b for row in used for b in row], dtype=torch.int64, device=meta.block_tables.device)
        return TorchAttentionState(meta, blocks, starts, query_starts)

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
        kv_stored: bool = False,  # the caller already wrote k and v into the cache
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store the step's K/V (unless `kv_stored`) and attend each sequence on its own."""
        assert isinstance(state, TorchAttentionState)
        meta = state.meta
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        k_scales_zeros, v_scales_zeros = (kv_cache[2], kv_cache[3]) if len(kv_cache) > 2 else (None, None)
        num_kv_heads = k_cache.shape[2]
        policy = cache_quant_policy(k_cache, k_scales_zeros, q.shape[2])
        if not kv_stored:
            self._store(k, v, k_cache, v_cache, k_scales_zeros, v_scales_zeros, meta.slot_mapping, policy)
        # Reads the cache as [.., head_dim] in q's dtype: dequantized after the gather when the cache is quantized.
        read = _CacheReader(k_cache, v_cache, k_scales_zeros, v_scales_zeros, policy, q.dtype)

        out = torch.empty_like(q)
        if meta.num_real_tokens < q.shape[0]:
            out[meta.num_real_tokens :].zero_()  # padding rows: zeros, not the memory's old contents
        starts = state.query_starts
        per_sequence = list(range(meta.num_seqs))
        if softcap is None:
            decodes = [i for i in per_sequence if meta.query_lens[i] == 1]
            per_sequence = [i for i in per_sequence if meta.query_lens[i] != 1]
            self._decode_by_bucket(q, read, state, decodes, starts, scale, sliding_window, out)
        if not per_sequence:
            return out
        # One gather per layer for the remaining sequences; each reads its slice (a view, no copy).
        batch_keys, batch_values = read(state.context_blocks)
        batch_keys = batch_keys.view(-1, num_kv_heads, q.shape[2])
        batch_values = batch_values.view(-1, num_kv_heads, q.shape[2])
        limits = meta.key_limits
        for i in per_sequence:
            num_new, ctx = meta.query_lens[i], meta.context_lens[i]
            first = state.context_block_starts[i] * meta.block_size
            rows = slice(starts[i], starts[i] + num_new)
            out[rows] = attend(
                q[rows],
                batch_keys[first : first + ctx],
                batch_values[first : first + ctx],
                scale,
                sliding_window,
                softcap,
                limits[rows] if limits is not None and num_new > 1 else None,
            ).to(q.dtype)
        return out

    @staticmethod
    def _store(k, v, k_cache, v_cache, k_scales_zeros, v_scales_zeros, slot_mapping, policy) -> None:
        """Write the step's k and v [num_tokens, num_kv_heads, head_dim] at their slots (quantized first if the
        cache is)."""
        num_kv_heads = k_cache.shape[2]
        if policy:
            for x, cache, params in ((k, k_cache, k_scales_zeros), (v, v_cache, v_scales_zeros)):
                codes, scales_zeros = quantize_kv(x, policy, params.dtype)
                cache.view(-1, num_kv_heads, cache.shape[3]).index_copy_(0, slot_mapping, codes)
                params.view(-1, num_kv_heads, 2).index_copy_(0, slot_mapping, scales_zeros)
            return
        k_cache.view(-1, num_kv_heads, k_cache.shape[3]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, v_cache.shape[3]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))

    @staticmethod
    def _decode_by_bucket(q, read, state, rows, starts, scale, sliding_window, out) -> None:
        """Decode rows attend in groups padded to a power-of-two number of blocks, one SDPA call per group.

        A row's padded length depends on its own context only, never on the batch, and each (row, head) is computed
        independently inside SDPA: a sequence decodes to the same bits alone or in any batch.
        """
        num_kv_heads, head_dim = read.num_kv_heads, q.shape[2]
        for group in decode_groups(state, rows, starts, sliding_window, q.device):
            size, length = len(group.token_rows), group.length
            keys, values = read(group.tables)
            keys = keys.reshape(size * length, num_kv_heads, head_dim)
            values = values.reshape(size * length, num_kv_heads, head_dim)
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
class _CacheReader:
    """Gathers blocks of the K and V caches: `read(blocks)` -> (keys, values), [*blocks.shape, block_size,
    num_kv_heads, head_dim] each, dequantized into `dtype` when the cache is quantized (a copy either way)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scales_zeros: torch.Tensor | None
    v_scales_zeros: torch.Tensor | None
    policy: int
    dtype: torch.dtype

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[2]

    def __call__(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of `blocks`, dequantized when the cache is quantized."""
        k_params, v_params = self.k_scales_zeros, self.v_scales_zeros
        if not self.policy or k_params is None or v_params is None:
            return self.k_cache[blocks], self.v_cache[blocks]
        return (
            dequantize_kv(self.k_cache[blocks], k_params[blocks], self.policy, self.dtype),
            dequantize_kv(self.v_cache[blocks], v_params[blocks], self.policy, self.dtype),
        )


@dataclass
class DecodeGroup:
    """Decode rows that share one padded length: their block tables, attention mask and padding slots."""

    token_rows: torch.Tensor  # [group] rows of q
    tables: torch.Tensor  # [group, width] block ids (padding blocks are any valid id: their slots are cleared)
    length: int  # width * block_size
    mask: torch.Tensor  # [group, 1, 1, length] bool: key positions each row may see
    padding: torch.Tensor | None  # flat positions (row * length + key) of the gathered K/V past each row's context


def decode_groups(state: TorchAttentionState, rows, starts, sliding_window, device) -> list[DecodeGroup]:
    """The step's decode grouping, built once per step and sliding window and shared by every layer."""
    cached = state.decode_groups.get(sliding_window)
    if cached is not None:
        return cached
    meta = state.meta
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
    state.decode_groups[sliding_window] = groups
    return groups


def attend(
    q: torch.Tensor,  # [num_new, num_heads, head_dim]: the last num_new of the ctx positions
    keys: torch.Tensor,  # [ctx, num_kv_heads, head_dim]
    values: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    key_limits: torch.Tensor | None = None,  # [num_new]: keys below key_limits[t] visible to t (None: causal)
) -> torch.Tensor:
    """Causal attention of the newest `num_new` positions over `ctx` cached ones (GQA by head groups); with
    `key_limits`, new token t sees the keys below `key_limits[t]` (`StepMetadata.key_limits`)."""
    num_new, ctx = q.shape[0], keys.shape[0]
    allowed = None
    if num_new > 1 or (sliding_window is not None and ctx > sliding_window):
        # A single new token sees every cached one unless a window cuts them: no mask needed then.
        positions = torch.arange(ctx - num_new, ctx, device=q.device)[:, None]
        key_positions = torch.arange(ctx, device=q.device)[None, :]
        # [num_new, ctx]: causal, or below each token's limit
        bound = positions + 1 if key_limits is None else key_limits.to(q.device)[:, None]
        allowed = key_positions < bound
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
