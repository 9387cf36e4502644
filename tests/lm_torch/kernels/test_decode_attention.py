"""Decode attention (split-K over the paged cache) against the float32 reference."""

from __future__ import annotations

import math

import pytest
import torch

from lm_torch.kernels import reference

HEADS = [(4, 4), (8, 2), (8, 1), (6, 2)]
HEAD_IDS = ["mha", "gqa4", "mqa8", "gqa3"]


def _run(batch, scale, **kwargs):
    from lm_torch.kernels.decode_attention import decode_attention

    out = torch.full_like(batch.q, float("nan"))  # every row the kernel owns must be written
    return decode_attention(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.query_start_loc,
        batch.context_lens_tensor,
        scale,
        max_context_len=max(batch.context_lens),
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


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS[:3], ids=HEAD_IDS[:3])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("ordered", [False, True], ids=["in-order", "seq-order"])
def test_decode_matches_reference(case, paged_batch, num_heads, num_kv_heads, num_splits, ordered):
    # Contexts of 1 token, under a block, across blocks, not multiples of the block size. `ordered`: the programs
    # take the sequences in a given permutation (the backend's longest-first order).
    context_lens = [1, 17, 50, 33]
    batch = paged_batch(case, num_heads + num_splits, [1] * 4, context_lens, num_heads, num_kv_heads, 32)
    scale = 1 / math.sqrt(32)
    order = torch.tensor([2, 0, 3, 1], dtype=torch.int32, device=case.device) if ordered else None
    out = _run(batch, scale, num_splits=num_splits, seq_order=order)
    case.assert_close(out, _expected(batch, scale), case.attention_tol)


@pytest.mark.parametrize("split_tokens", [1, 20, 40, 1000])
def test_decode_splits_each_sequence_by_its_length(case, paged_batch, split_tokens):
    """Each sequence takes min(num_splits, ceil(context / split_tokens)) splits (one: it writes its output itself;
    several: partials merged by the last), so one batch mixes sequences of 1, 2, 3 and 4 splits and the grid's
    unused split programs return at once; with a sliding window the visible part decides."""
    context_lens = [1, 17, 50, 33, 130, 0]
    batch = paged_batch(case, 11, [1] * 6, context_lens, 8, 2, 32)
    scale = 1 / math.sqrt(32)
    out = _run(batch, scale, num_splits=4, split_tokens=split_tokens)
    case.assert_close(out, _expected(batch, scale), case.attention_tol)
    out = _run(batch, scale, num_splits=4, split_tokens=split_tokens, sliding_window=40)
    case.assert_close(out, _expected(batch, scale, sliding_window=40), case.attention_tol)


@pytest.mark.parametrize(("sliding_window", "softcap"), [(20, None), (None, 5.0), (7, 10.0)])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [HEADS[1], HEADS[3]], ids=[HEAD_IDS[1], HEAD_IDS[3]])
def test_decode_window_and_softcap(case, paged_batch, sliding_window, softcap, num_heads, num_kv_heads):
    # head_dim 24 is not a power of two: the kernel pads it to 32 and masks.
    context_lens = [45, 6, 21]
    batch = paged_batch(case, 7, [1] * 3, context_lens, num_heads, num_kv_heads, 24, q_scale=3.0)
    scale = 1 / math.sqrt(24)
    out = _run(batch, scale, num_splits=2, sliding_window=sliding_window, softcap=softcap)
    case.assert_close(out, _expected(batch, scale, sliding_window, softcap), case.attention_tol)


def test_decode_leaves_prefill_rows_alone(case, paged_batch):
    # In a mixed batch the decode kernel owns only the one-token sequences' rows.
    batch = paged_batch(case, 3, [1, 3, 1], [20, 40, 9], 8, 2, 16)
    out = _run(batch, 0.25, num_splits=2)
    expected = _expected(batch, 0.25)
    decode_rows = torch.tensor([0, 4])
    case.assert_close(out[decode_rows], expected[decode_rows], case.attention_tol)
    assert out[1:4].isnan().all()


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "softcap"),
    [(32, 8, 128, None), (16, 8, 256, 50.0)],
    ids=["llama3", "gemma2"],
)
def test_decode_real_shapes(case, paged_batch, num_heads, num_kv_heads, head_dim, softcap):
    """Llama-3-8B's and Gemma-2-9B's attention, split-K chosen by the heuristic, with and without a window."""
    if case.device == "cpu":
        pytest.skip("too large for the interpreter")
    context_lens = [1, 100, 2055, 513, 16, 1024, 777, 3000]
    batch = paged_batch(case, 11, [1] * 8, context_lens, num_heads, num_kv_heads, head_dim)
    scale = 1 / math.sqrt(head_dim)
    for window in (None, 256):
        out = _run(batch, scale, sliding_window=window, softcap=softcap)
        case.assert_close(out, _expected(batch, scale, window, softcap), case.attention_tol)


def test_decode_calls_in_a_row_reset_the_counters(case, paged_batch):
    """The last split program of each (sequence, kv head) merges and zeroes its counter, so the next call (another
    layer, another batch, another split count) finds them all at zero: a stale count would leave rows unmerged."""
    from lm_torch.kernels.common import persistent_zeros
    from lm_torch.kernels.decode_attention import SPLIT_COUNTERS

    scale = 0.2
    # Context 0 is a CUDA graph's padding row: every split empty, output 0.
    calls = [([1, 17, 50, 33], 3), ([40, 0], 32), ([9, 70, 2, 30, 64], 2), ([1, 17, 50, 33], 5)]
    for seed, (context_lens, num_splits) in enumerate(calls):
        batch = paged_batch(case, 20 + seed, [1] * len(context_lens), context_lens, 8, 2, 32)
        out = _run(batch, scale, num_splits=num_splits)
        case.assert_close(out, _expected(batch, scale), case.attention_tol)
        assert not persistent_zeros(batch.q.device, SPLIT_COUNTERS, 1).any()


def test_decode_grows_the_counter_buffer(case, paged_batch, monkeypatch):
    """More (sequence, kv head) pairs than the shared counters hold: a larger zeroed buffer replaces it, and the
    old one stays referenced (a captured CUDA graph may still point at it)."""
    from lm_torch.kernels import common
    from lm_torch.kernels.decode_attention import SPLIT_COUNTERS

    device = torch.empty(0, device=case.device).device  # with its index on CUDA, as the kernel's tensors have it
    small = torch.zeros(2, dtype=torch.int32, device=device)
    monkeypatch.setattr(common, "_PERSISTENT_ZEROS", {(device, SPLIT_COUNTERS): [small]})
    for seed, context_lens in enumerate([[5, 40, 21], [33, 1, 12, 64, 7]]):
        batch = paged_batch(case, 30 + seed, [1] * len(context_lens), context_lens, 4, 2, 16)
        out = _run(batch, 0.25, num_splits=2)
        case.assert_close(out, _expected(batch, 0.25), case.attention_tol)
    buffers = common._PERSISTENT_ZEROS[(device, SPLIT_COUNTERS)]
    assert buffers[0] is small and [b.numel() for b in buffers] == [2, 1024]
    assert not any(b.any() for b in buffers)
