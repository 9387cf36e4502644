"""`TritonAttentionBackend` against `TorchAttentionBackend` on whole steps built by `AttentionMetadata.build`."""

from __future__ import annotations

import math

import pytest
import torch

from lm_torch.attention import AttentionMetadata, TorchAttentionBackend, TritonAttentionBackend, triton_backend

BLOCK_SIZE = 16


def _step(case, seed, query_lens, context_lens, num_heads, num_kv_heads, head_dim, sliding_window, softcap):
    """Run one step through both backends from identical caches; return (outputs, caches) of each."""
    gen = torch.Generator().manual_seed(seed)
    used = [-(-ctx // BLOCK_SIZE) for ctx in context_lens]
    num_blocks = sum(used) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, first = [], 0
    for n in used:
        tables.append(order[first : first + n])
        first += n
    meta_args = (query_lens, context_lens, tables, BLOCK_SIZE, case.device)
    num_tokens = sum(query_lens)
    q = case.randn(num_tokens, num_heads, head_dim, generator=gen)
    k = case.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = case.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    k_cache = case.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    v_cache = case.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    results = []
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        caches = (k_cache.clone(), v_cache.clone())
        meta = AttentionMetadata.build(*meta_args)
        out = backend.forward(q, k, v, *caches, meta, 1 / math.sqrt(head_dim), sliding_window, softcap)
        results.append((out, caches))
    return results


@pytest.mark.parametrize(
    ("sliding_window", "softcap", "heads"),
    [(None, None, (8, 2)), (12, None, (4, 4)), (None, 8.0, (8, 1)), (10, 8.0, (6, 2))],
    ids=["gqa4", "window-mha", "softcap-mqa", "window-softcap-gqa3"],
)
def test_mixed_step_matches_torch_backend(case, sliding_window, softcap, heads):
    # Two decodes, a chunk after a cached prefix, a fresh prompt, and a one-token chunk of a prompt.
    query_lens = [1, 9, 1, 20, 1]
    context_lens = [37, 30, 5, 20, 18]
    (out, caches), (expected, expected_caches) = _step(
        case, 1, query_lens, context_lens, *heads, 32, sliding_window, softcap
    )
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    # The torch backend computes in dtype (SDPA) where the reference is float32: allow both their errors.
    case.assert_close(out, expected, 2 * case.attention_tol)


@pytest.mark.parametrize("sort", [False, True], ids=["arrival-order", "longest-first"])
def test_decode_step_matches_torch_backend(case, sort, monkeypatch):
    # `sort`: the decode programs start longest context first (what large batches do).
    monkeypatch.setattr(triton_backend, "SORT_MIN_DECODES", 1 if sort else 1 << 30)
    query_lens = [1] * 6
    context_lens = [1, 16, 17, 64, 100, 47]
    (out, caches), (expected, expected_caches) = _step(case, 2, query_lens, context_lens, 8, 2, 32, None, None)
    assert torch.equal(caches[0], expected_caches[0])
    case.assert_close(out, expected, 2 * case.attention_tol)


def test_backend_rejects_block_size_mismatch(case):
    pytest.importorskip("triton")
    meta = AttentionMetadata.build([1], [3], [[0]], 8, case.device)
    x = torch.ones(1, 2, 16, device=case.device, dtype=case.dtype)
    cache = torch.ones(2, 16, 2, 16, device=case.device, dtype=case.dtype)
    with pytest.raises(ValueError, match="block"):
        TritonAttentionBackend().forward(x, x, x, cache, cache, meta, 1.0)
