"""Rotary embedding from `RotaryEmbedding`'s tables, for every rope type lm-torch supports, in both pairings."""

from __future__ import annotations

import pytest
import torch

from lm_torch.kernels import reference
from lm_torch.layers.rotary import RotaryEmbedding

MAX_POSITIONS = 96
BASE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _config(rope_type: str):
    """A transformers config (head_dim 32) whose rope has the given scaling type."""
    from transformers import LlamaConfig, Phi3Config

    theta = {"rope_theta": 10000.0}
    if rope_type == "longrope":
        # Partial rotary (rotary_dim 16 of head_dim 32), long factors (96 positions > original 32).
        rope = {
            "rope_type": "longrope",
            **theta,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 1.8, 2.0, 2.2, 2.5],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 9.0, 10.0, 12.0, 16.0],
        }
        return Phi3Config(**BASE, original_max_position_embeddings=32, rope_parameters=rope)
    rope = {
        "default": {"rope_type": "default", **theta},
        "linear": {"rope_type": "linear", **theta, "factor": 4.0},
        "dynamic": {"rope_type": "dynamic", **theta, "factor": 2.0},
        "llama3": {
            "rope_type": "llama3",
            **theta,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        "yarn": {"rope_type": "yarn", **theta, "factor": 4.0, "original_max_position_embeddings": 32},
    }[rope_type]
    config = LlamaConfig(**BASE, rope_parameters=rope)
    if rope_type == "dynamic":
        config.max_position_embeddings = MAX_POSITIONS  # dynamic NTK is exact only within its range
    return config


@pytest.mark.parametrize("rope_type", ["default", "linear", "dynamic", "llama3", "yarn", "longrope"])
def test_rotary_neox_matches_layer(case, rope_type):
    from lm_torch.kernels.rotary import apply_rotary

    rope = RotaryEmbedding(_config(rope_type), MAX_POSITIONS).to(case.device)
    gen = torch.Generator().manual_seed(len(rope_type))
    num_tokens = 9
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(case.device)
    # q and k as views into one projection output (strided tokens), rotated in place.
    qkv = case.randn(num_tokens, 8, 32, generator=gen)
    q, k = qkv[:, :4], qkv[:, 4:6]
    expected_q, expected_k = rope(positions, q.clone(), k.clone())
    reference_q = reference.rotary(positions, q, rope.cos, rope.sin)
    reference_k = reference.rotary(positions, k, rope.cos, rope.sin)
    untouched = qkv[:, 6:].clone()

    out_q, out_k = apply_rotary(positions, q, k, rope.cos, rope.sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    case.assert_close(q, reference_q, case.elementwise_tol)
    case.assert_close(k, reference_k, case.elementwise_tol)
    # The layer rounds cos/sin and each product to dtype: a few more roundings than the kernel's one.
    case.assert_close(q, expected_q, 3 * case.elementwise_tol)
    case.assert_close(k, expected_k, 3 * case.elementwise_tol)
    assert torch.equal(qkv[:, 6:], untouched)


@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rotary_gptj_matches_reference(case, rotary_dim):
    from lm_torch.kernels.rotary import apply_rotary

    gen = torch.Generator().manual_seed(rotary_dim)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.arange(MAX_POSITIONS).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(case.device), emb.sin().to(case.device)
    positions = torch.randint(0, MAX_POSITIONS, (7,), generator=gen).to(case.device)
    q = case.randn(7, 3, 32, generator=gen)
    k = case.randn(7, 1, 32, generator=gen)
    original_q = q.clone()
    expected_q = reference.rotary(positions, q, cos, sin, is_neox=False)
    expected_k = reference.rotary(positions, k, cos, sin, is_neox=False)
    apply_rotary(positions, q, k, cos, sin, is_neox=False)
    case.assert_close(q, expected_q, case.elementwise_tol)
    case.assert_close(k, expected_k, case.elementwise_tol)
    # gptj rotates adjacent pairs, neox halves: on the same input they differ, so the flag is honoured.
    neox = reference.rotary(positions, original_q, cos, sin, is_neox=True)
    assert not torch.allclose(neox.float(), expected_q.float(), atol=1e-2)


@pytest.mark.parametrize(("rope_type", "is_neox"), [("llama3", True), ("longrope", True), ("default", False)])
def test_rotary_fused_with_the_kv_store(case, rope_type, is_neox):
    """One launch rotates q and k in place and writes the rotated k and v at each token's slot, as the rotary
    reference followed by the KV-store reference would; padding rows (slot -1) write nothing. longrope rotates
    16 of 32 features: the rest of k goes to the cache as it is."""
    from lm_torch.kernels.rotary import apply_rotary

    rope = RotaryEmbedding(_config(rope_type), MAX_POSITIONS).to(case.device)
    gen = torch.Generator().manual_seed(5)
    num_tokens, block_size, num_blocks = 6, 4, 5
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(case.device)
    qkv = case.randn(num_tokens, 8, 32, generator=gen)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    slots = torch.tensor([3, 17, -1, 0, 9, -1], device=case.device)
    k_cache = case.randn(num_blocks, block_size, 2, 32, generator=gen)
    v_cache = case.randn(num_blocks, block_size, 2, 32, generator=gen)
    expected_q = reference.rotary(positions, q, rope.cos, rope.sin, is_neox)
    expected_k = reference.rotary(positions, k, rope.cos, rope.sin, is_neox)
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    reference.store_kv_cache(expected_k.to(case.dtype), v, expected_k_cache, expected_v_cache, slots)

    apply_rotary(
        positions, q, k, rope.cos, rope.sin, is_neox, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots
    )
    case.assert_close(q, expected_q, case.elementwise_tol)
    case.assert_close(k, expected_k, case.elementwise_tol)
    case.assert_close(k_cache, expected_k_cache, case.elementwise_tol)
    assert torch.equal(v_cache, expected_v_cache)  # v is copied, not computed
    with pytest.raises(ValueError, match="slot_mapping"):
        apply_rotary(positions, q, k, rope.cos, rope.sin, v=v, k_cache=k_cache, v_cache=v_cache)
