"""Prefill attention with per-token key limits (`StepMetadata.key_limits`: Gemma 3's image tokens attend each other
bidirectionally) against a plain-torch float32 reference: the Triton kernel, the torch backend, and the Triton
backend against the torch backend on whole steps. Limits of position + 1 everywhere are the causal kernel exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from lm_torch.attention import StepMetadata, TorchAttentionBackend, TritonAttentionBackend

# A fresh prompt, a chunk after a 9-token cached prefix, a prompt of several tiles, and a decode.
QUERY_LENS = [12, 21, 40, 1]
CONTEXT_LENS = [12, 30, 40, 9]
# (sequence, first, end) of each bidirectional span, in sequence positions among the sequence's new tokens: one at
# a prompt's start, one ending at the context's end, two crossing tile boundaries (8 or 16 tokens a tile here).
SPANS = [(0, 0, 4), (0, 6, 9), (1, 10, 14), (1, 25, 30), (2, 12, 20), (2, 30, 37)]


def key_limits(query_lens: list[int], context_lens: list[int], spans: list[tuple[int, int, int]]) -> list[int]:
    """One limit per new token: its position + 1, or its span's end."""
    limits: list[list[int]] = [
        list(range(ctx - n + 1, ctx + 1)) for n, ctx in zip(query_lens, context_lens, strict=True)
    ]
    for seq, first, end in spans:
        offset = context_lens[seq] - query_lens[seq]
        assert offset <= first < end <= context_lens[seq]
        limits[seq][first - offset : end - offset] = [end] * (end - first)
    return [limit for row in limits for limit in row]


def reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    scale: float,
    limits: list[int],
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim] float32
    """Token t at position p sees the keys k with k < limits[t] and k > p - sliding_window (transformers' Gemma 3:
    AND(window, OR(causal, same image)))."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    first = 0
    for i, (num_new, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
        positions = torch.arange(ctx, device=q.device)
        slots = block_tables[i, positions // block_size].long() * block_size + positions % block_size
        keys = k_cache.reshape(-1, num_kv_heads, k_cache.shape[3])[slots].float().repeat_interleave(group, dim=1)
        values = v_cache.reshape(-1, num_kv_heads, v_cache.shape[3])[slots].float().repeat_interleave(group, dim=1)
        queries = q[first : first + num_new].float().transpose(0, 1)  # [num_heads, num_new, head_dim]
        scores = queries @ keys.permute(1, 2, 0) * scale  # [num_heads, num_new, ctx]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        query_positions = torch.arange(ctx - num_new, ctx, device=q.device)[:, None]
        bound = torch.tensor(limits[first : first + num_new], device=q.device)[:, None]
        visible = positions[None, :] < bound
        if sliding_window is not None:
            visible &= positions[None, :] > query_positions - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[first : first + num_new] = (torch.softmax(scores, dim=-1) @ values.transpose(0, 1)).transpose(0, 1)
        first += num_new
    return out


def _kernel(batch, scale: float, limits: torch.Tensor | None, **kwargs) -> torch.Tensor:
    from lm_torch.kernels.prefill_attention import prefill_attention, prefill_tiles, tokens_per_tile

    group = batch.q.shape[1] // batch.k_cache.shape[2]
    per_tile = tokens_per_tile(group, batch.q.shape[2])
    tile_seq, tile_first = prefill_tiles(batch.query_lens, per_tile, batch.q.device, skip_single=False)
    out = torch.full_like(batch.q, float("nan"))
    return prefill_attention(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.query_start_loc,
        batch.context_lens_tensor,
        tile_seq,
        tile_first,
        scale,
        tokens_per_tile=per_tile,
        out=out,
        key_limits=limits,
        **kwargs,
    )


def _limits_tensor(limits: list[int], device: str) -> torch.Tensor:
    return torch.tensor(limits, dtype=torch.int32, device=device)


@pytest.mark.parametrize(
    ("heads", "sliding_window", "softcap"),
    [((8, 2), None, None), ((4, 4), 3, None), ((6, 2), 7, 5.0), ((8, 1), None, 5.0)],
    ids=["gqa4", "mha-window3", "gqa3-window7-softcap", "mqa8-softcap"],
)
def test_kernel_key_limits_match_reference(case, paged_batch, heads, sliding_window, softcap):
    batch = paged_batch(case, 7, QUERY_LENS, CONTEXT_LENS, *heads, 32, q_scale=2.0)
    limits = key_limits(QUERY_LENS, CONTEXT_LENS, SPANS)
    scale = 1 / math.sqrt(32)
    out = _kernel(batch, scale, _limits_tensor(limits, case.device), sliding_window=sliding_window, softcap=softcap)
    expected = reference(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.query_lens,
        batch.context_lens,
        batch.block_tables,
        scale,
        limits,
        sliding_window,
        softcap,
    )
    case.assert_close(out, expected, case.attention_tol)
    causal = key_limits(QUERY_LENS, CONTEXT_LENS, [])
    span_rows = torch.tensor([a != b for a, b in zip(limits, causal, strict=True)])
    assert (out.float().cpu() - _kernel(batch, scale, None, sliding_window=sliding_window, softcap=softcap).cpu())[
        span_rows
    ].abs().max() > 0.05  # the limits changed what the span's tokens see


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_kernel_causal_limits_are_the_causal_kernel(case, paged_batch, sliding_window):
    """Limits of position + 1 everywhere give the causal kernel's output to the bit."""
    batch = paged_batch(case, 8, QUERY_LENS, CONTEXT_LENS, 8, 2, 32)
    limits = _limits_tensor(key_limits(QUERY_LENS, CONTEXT_LENS, []), case.device)
    out = _kernel(batch, 0.2, limits, sliding_window=sliding_window)
    assert torch.equal(out, _kernel(batch, 0.2, None, sliding_window=sliding_window))


def _step_inputs(case, seed: int, query_lens: list[int], context_lens: list[int], heads: tuple[int, int]):
    """A step's q, k, v [tokens, heads, 32] and empty caches (0: the step stores k and v), with block tables."""
    gen = torch.Generator().manual_seed(seed)
    block_size = 16
    used = [-(-ctx // block_size) for ctx in context_lens]
    order = torch.randperm(sum(used) + 2, generator=gen).tolist()
    tables, first = [], 0
    for n in used:
        tables.append(order[first : first + n])
        first += n
    num_tokens = sum(query_lens)
    q = case.randn(num_tokens, heads[0], 32, generator=gen, scale=2.0)
    k = case.randn(num_tokens, heads[1], 32, generator=gen)
    v = case.randn(num_tokens, heads[1], 32, generator=gen)
    k_cache = case.randn(sum(used) + 2, block_size, heads[1], 32, generator=gen)
    v_cache = case.randn(sum(used) + 2, block_size, heads[1], 32, generator=gen)
    return q, k, v, k_cache, v_cache, tables


@pytest.mark.parametrize(("sliding_window", "softcap"), [(None, None), (5, None), (None, 8.0)])
def test_backends_follow_key_limits(case, sliding_window, softcap):
    """Whole steps (a decode among them): the torch backend against the reference, the Triton one against both."""
    query_lens, context_lens = [1, *QUERY_LENS[:3]], [17, *CONTEXT_LENS[:3]]
    spans = [(seq + 1, first, end) for seq, first, end in SPANS]
    limits = key_limits(query_lens, context_lens, spans)
    q, k, v, k_cache, v_cache, tables = _step_inputs(case, 9, query_lens, context_lens, (8, 2))
    scale = 1 / math.sqrt(32)
    outputs = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        caches = (k_cache.clone(), v_cache.clone())
        meta = StepMetadata.build(query_lens, context_lens, tables, 16, case.device, key_limits=limits)
        state = backend.prepare(meta)
        out = backend.forward(q, k, v, caches, state, scale=scale, sliding_window=sliding_window, softcap=softcap)
        outputs.append((out, caches, meta))
    (torch_out, caches, meta), (triton_out, _, _) = outputs
    expected = reference(
        q, caches[0], caches[1], query_lens, context_lens, meta.block_tables, scale, limits, sliding_window, softcap
    )
    # The torch backend computes in dtype (SDPA) where the reference is float32: allow both their errors.
    case.assert_close(torch_out, expected, 2 * case.attention_tol)
    case.assert_close(triton_out, torch_out, 2 * case.attention_tol)
