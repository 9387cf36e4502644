"""Prefill attention (new tokens over a cached prefix and themselves, causal) against the float32 reference."""

from __future__ import annotations

import math

import pytest
import torch

from lm_torch.kernels import reference

# A fresh prompt, a chunk after a 23-token cached prefix, a prompt spanning several tiles, and one single token.
QUERY_LENS = [5, 7, 40, 1]
CONTEXT_LENS = [5, 30, 40, 9]


def _run(batch, scale, skip_single=False, **kwargs):
    from lm_torch.kernels.prefill_attention import prefill_attention, prefill_tiles, tokens_per_tile

    group = batch.q.shape[1] // batch.k_cache.shape[2]
    per_tile = tokens_per_tile(group, batch.q.shape[2])
    tile_seq, tile_first = prefill_tiles(batch.query_lens, per_tile, batch.q.device, skip_single=skip_single)
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
        **kwargs,
    )


def _expected(batch, scale, sliding_window=None, softcap=None):
    return reference.paged_attention(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.query_lens,
        batch.context_lens,
        batch.block_tables,
        scale,
        sliding_window,
        softcap,
    )


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa8"])
def test_prefill_matches_reference(case, paged_batch, num_heads, num_kv_heads):
    batch = paged_batch(case, num_heads, QUERY_LENS, CONTEXT_LENS, num_heads, num_kv_heads, 32)
    scale = 1 / math.sqrt(32)
    case.assert_close(_run(batch, scale), _expected(batch, scale), case.attention_tol)


@pytest.mark.parametrize(("sliding_window", "softcap"), [(6, None), (None, 5.0), (9, 10.0)])
def test_prefill_window_and_softcap(case, paged_batch, sliding_window, softcap):
    # 6 query heads over 2 kv heads (groups of 3, padded to 4), head_dim 24 (padded to 32).
    batch = paged_batch(case, 5, QUERY_LENS, CONTEXT_LENS, 6, 2, 24, q_scale=3.0)
    scale = 1 / math.sqrt(24)
    out = _run(batch, scale, sliding_window=sliding_window, softcap=softcap)
    case.assert_close(out, _expected(batch, scale, sliding_window, softcap), case.attention_tol)


def test_prefill_skips_single_token_sequences(case, paged_batch):
    batch = paged_batch(case, 2, QUERY_LENS, CONTEXT_LENS, 8, 2, 16)
    out = _run(batch, 0.25, skip_single=True)
    expected = _expected(batch, 0.25)
    case.assert_close(out[:-1], expected[:-1], case.attention_tol)
    assert out[-1].isnan().all()  # the decode kernel's row


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "softcap"),
    [(32, 8, 128, None), (16, 8, 256, 50.0)],
    ids=["llama3", "gemma2"],
)
def test_prefill_real_shapes(case, paged_batch, num_heads, num_kv_heads, head_dim, softcap):
    """Llama-3-8B's and Gemma-2-9B's attention: chunks after long cached prefixes, with and without a window."""
    if case.device == "cpu":
        pytest.skip("too large for the interpreter")
    query_lens, context_lens = [300, 1, 64, 513], [300, 1500, 2100, 1000]
    batch = paged_batch(case, 13, query_lens, context_lens, num_heads, num_kv_heads, head_dim)
    scale = 1 / math.sqrt(head_dim)
    for window in (None, 200):
        out = _run(batch, scale, sliding_window=window, softcap=softcap)
        case.assert_close(out, _expected(batch, scale, window, softcap), case.attention_tol)
