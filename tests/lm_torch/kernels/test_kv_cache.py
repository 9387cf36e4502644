"""The KV-store kernel writes each token's K/V at its slot, exactly, and nothing else."""

from __future__ import annotations

import pytest
import torch

from lm_torch.kernels import reference


@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(1, 16), (3, 24), (8, 32)])
def test_store_kv_cache_writes_each_slot(case, num_kv_heads, head_dim):
    from lm_torch.kernels.kv_cache import store_kv_cache

    gen = torch.Generator().manual_seed(num_kv_heads * 100 + head_dim)
    num_blocks, block_size, num_tokens = 6, 16, 13
    k_cache = case.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = case.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    # k and v as views into one projection output, as the attention layer hands them over (strided tokens).
    qkv = case.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[4] = -1  # a padding row: written nowhere
    slot_mapping = slots.to(case.device)

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv_cache(k, v, expected_k, expected_v, slot_mapping)
    store_kv_cache(k, v, k_cache, v_cache, slot_mapping)

    # A copy is exact: every slot (written or not) must equal the reference bit for bit.
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[slots[:4].to(case.device)], k[:4])


def test_store_kv_cache_rejects_mismatched_cache(case):
    from lm_torch.kernels.kv_cache import store_kv_cache

    gen = torch.Generator().manual_seed(0)
    k = case.randn(3, 2, 16, generator=gen)
    cache = case.randn(4, 16, 4, 16, generator=gen)
    with pytest.raises(ValueError, match="does not hold"):
        store_kv_cache(k, k, cache, cache.clone(), torch.arange(3, device=case.device))
