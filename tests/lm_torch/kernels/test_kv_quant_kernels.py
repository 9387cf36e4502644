"""Quantized KV caches (`quant_policy` 8 and 4) in the Triton kernels: the KV store and the fused rotary store
write the codes, scales and zeros of the plain-torch reference; decode and prefill attention over the codes equal
the reference attention over the dequantized cache."""

from __future__ import annotations

import math

import pytest
import torch

from lm_torch.kernels import reference
from lm_torch.kv_quant import allocate_kv_cache, scales_dtype

POLICIES = [pytest.param(8, id="int8"), pytest.param(4, id="int4")]

try:  # without triton every test here skips (conftest's `case`); a kernel of the tests' own needs it at import
    import triton
    import triton.language as tl

    from lm_torch.kernels.decode_attention import _codes_operand
    from lm_torch.kernels.kv_cache import codes_to
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _codes_to_kernel(src, dst, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(dst + i, codes_to(tl.load(src + i), dst.dtype.element_ty))

    @triton.jit
    def _codes_operand_kernel(src, dst, N: tl.constexpr, PART: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(dst + i, _codes_operand(tl.load(src + i), dst.dtype.element_ty, PART))


def _assert_codes_match(case, cache, scales_zeros, expected_cache, expected_scales_zeros, policy):
    """Scales and zeros equal the reference's up to the last bit; codes may differ by one where a value sits on a
    rounding boundary (the kernel's float32 reciprocal and FMAs against torch's), at most 1% of them; the values
    they dequantize to then differ by at most one step."""
    tol = 1e-6 if case.dtype == torch.float32 else 1e-3
    torch.testing.assert_close(scales_zeros.float().cpu(), expected_scales_zeros.float().cpu(), atol=tol, rtol=tol)
    got = reference.dequantize_cache(cache, scales_zeros, policy).cpu()
    want = reference.dequantize_cache(expected_cache, expected_scales_zeros, policy).cpu()
    step = expected_scales_zeros[..., :1].float().cpu()
    assert ((got - want).abs() <= step * 1.001 + tol).all()
    assert (cache != expected_cache).float().mean() <= 0.01


def _quantized(case, num_blocks, block_size, num_kv_heads, head_dim, policy, seed):
    """A quantized cache filled with the codes of random values (every slot, used or not), and its reference copy."""
    gen = torch.Generator().manual_seed(seed)
    cache = allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, policy, case.dtype, case.device)
    num_slots = num_blocks * block_size
    k = case.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    v = case.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    slots = torch.arange(num_slots, device=case.device)
    reference.store_kv_cache_quantized(k, v, *cache, slots, policy)
    return cache


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(1, 16), (3, 24), (8, 32)])
def test_store_quantizes_each_slot(case, policy, num_kv_heads, head_dim):
    from lm_torch.kernels.kv_cache import store_kv_cache

    gen = torch.Generator().manual_seed(num_kv_heads * 100 + head_dim + policy)
    num_blocks, block_size, num_tokens = 6, 16, 13
    cache = allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, policy, case.dtype, case.device)
    assert cache.k_scales_zeros.dtype == scales_dtype(case.dtype)
    expected = [t.clone() for t in cache]
    # k and v as views into one projection output (strided tokens), a head with a wide range, one constant head.
    qkv = case.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen)
    qkv[:, :, 0] *= 20
    qkv[5, 1, -1] = 0.5
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[4] = -1  # a padding row: written nowhere
    slot_mapping = slots.to(case.device)

    reference.store_kv_cache_quantized(k, v, *expected, slot_mapping, policy)
    store_kv_cache(k, v, *cache[:2], slot_mapping, *cache[2:])

    for got, want, name in zip(cache, expected, ("k", "v", "k scales", "v scales"), strict=True):
        # Slots not written keep their zeros.
        assert torch.equal(
            got.flatten(0, 1)[~_written(slots, num_blocks * block_size)],
            want.flatten(0, 1)[~_written(slots, num_blocks * block_size)],
        ), name
    _assert_codes_match(case, cache.k, cache.k_scales_zeros, expected[0], expected[2], policy)
    _assert_codes_match(case, cache.v, cache.v_scales_zeros, expected[1], expected[3], policy)


def _written(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    mask = torch.zeros(num_slots, dtype=torch.bool)
    mask[slots[slots >= 0]] = True
    return mask.to(slots.device)


def test_store_rejects_a_cache_that_does_not_fit(case):
    from lm_torch.kernels.kv_cache import store_kv_cache

    gen = torch.Generator().manual_seed(0)
    k = case.randn(3, 2, 32, generator=gen)
    slots = torch.arange(3, device=case.device)
    cache = allocate_kv_cache(4, 16, 2, 32, 8, case.dtype, case.device)
    with pytest.raises(ValueError, match="holds no head_dim"):
        store_kv_cache(k[..., :24].contiguous(), k[..., :24].contiguous(), *cache[:2], slots, *cache[2:])
    with pytest.raises(ValueError, match="scales_zeros"):
        store_kv_cache(k, k, *cache[:2], slots)
    int4 = allocate_kv_cache(4, 16, 2, 32, 4, case.dtype, case.device)
    with pytest.raises(ValueError, match="quantized alike"):
        store_kv_cache(k, k, cache.k, int4.v, slots, cache.k_scales_zeros, int4.v_scales_zeros)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("rope_type", "is_neox"), [("llama3", True), ("longrope", True), ("default", False)])
def test_rotary_fused_with_the_quantized_store(case, policy, rope_type, is_neox):
    """One launch rotates q in place and writes the codes of the rotated k (rounded to k's dtype) and of v, as the
    rotary kernel followed by the quantized store reference would; longrope rotates 16 of 32 features."""
    from lm_torch.kernels.rotary import apply_rotary
    from lm_torch.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(_rope_config(rope_type), MAX_POSITIONS).to(case.device)
    gen = torch.Generator().manual_seed(5 + policy)
    num_tokens, block_size, num_blocks = 6, 4, 5
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(case.device)
    qkv = case.randn(num_tokens, 8, 32, generator=gen)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    slots = torch.tensor([3, 17, -1, 0, 9, -1], device=case.device)
    cache = allocate_kv_cache(num_blocks, block_size, 2, 32, policy, case.dtype, case.device)
    expected = [t.clone() for t in cache]
    expected_q = reference.rotary(positions, q, rope.cos, rope.sin, is_neox)
    # k rotated by the plain rotary kernel (checked against `reference.rotary` in test_rotary.py): in bf16 the two
    # may round a feature one unit apart, which would move a head's scale; the codes must be those of this k.
    rotated_k = apply_rotary(positions, q.clone(), k.clone(), rope.cos, rope.sin, is_neox)[1]
    case.assert_close(rotated_k, reference.rotary(positions, k, rope.cos, rope.sin, is_neox), case.elementwise_tol)
    reference.store_kv_cache_quantized(rotated_k, v, *expected, slots, policy)

    apply_rotary(
        positions,
        q,
        k,
        rope.cos,
        rope.sin,
        is_neox,
        v=v,
        k_cache=cache.k,
        v_cache=cache.v,
        slot_mapping=slots,
        k_scales_zeros=cache.k_scales_zeros,
        v_scales_zeros=cache.v_scales_zeros,
    )
    case.assert_close(q, expected_q, case.elementwise_tol)
    _assert_codes_match(case, cache.k, cache.k_scales_zeros, expected[0], expected[2], policy)
    _assert_codes_match(case, cache.v, cache.v_scales_zeros, expected[1], expected[3], policy)
    assert cache.k_scales_zeros[0, 3].abs().sum() > 0 and cache.k_scales_zeros[0, 2].abs().sum() == 0


MAX_POSITIONS = 96


def _rope_config(rope_type: str):
    """A transformers config with head_dim 32: plain rope, llama3 scaling, or partial longrope (16 of 32 rotated)."""
    from transformers import LlamaConfig, Phi3Config

    base = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if rope_type == "longrope":
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 1.8, 2.0, 2.2, 2.5],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 9.0, 10.0, 12.0, 16.0],
        }
        return Phi3Config(**base, original_max_position_embeddings=32, rope_parameters=rope)
    if rope_type == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return LlamaConfig(**base, rope_parameters=rope)
    return LlamaConfig(**base, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _attention_inputs(case, paged_batch, seed, query_lens, context_lens, num_heads, num_kv_heads, head_dim, policy):
    """A paged batch whose cache is quantized: the kernels read `cache`, the reference its dequantized values."""
    batch = paged_batch(case, seed, query_lens, context_lens, num_heads, num_kv_heads, head_dim)
    num_blocks, block_size = batch.k_cache.shape[:2]
    cache = allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, policy, case.dtype, case.device)
    slots = torch.arange(num_blocks * block_size, device=case.device)
    flat = (num_blocks * block_size, num_kv_heads, head_dim)
    reference.store_kv_cache_quantized(batch.k_cache.view(flat), batch.v_cache.view(flat), *cache, slots, policy)
    batch.k_cache = reference.dequantize_cache(cache.k, cache.k_scales_zeros, policy)
    batch.v_cache = reference.dequantize_cache(cache.v, cache.v_scales_zeros, policy)
    return batch, cache


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 4, 32), (8, 2, 32), (6, 2, 48)])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("convert", [0, 1, 2])
def test_decode_over_quantized_cache(case, paged_batch, policy, num_heads, num_kv_heads, head_dim, num_splits, convert):
    # `convert`: how the codes become dot operands (arithmetic after the shared-memory trip, or PTX before it for
    # V, or for K and V); on the CPU all three are the plain conversion.
    from lm_torch.kernels.decode_attention import decode_attention

    context_lens = [1, 17, 50, 33]
    batch, cache = _attention_inputs(
        case, paged_batch, num_heads + num_splits, [1] * 4, context_lens, num_heads, num_kv_heads, head_dim, policy
    )
    scale = 1 / math.sqrt(head_dim)
    out = decode_attention(
        batch.q,
        cache.k,
        cache.v,
        batch.block_tables,
        batch.query_start_loc,
        batch.context_lens_tensor,
        scale,
        max_context_len=max(context_lens),
        num_splits=num_splits,
        out=torch.full_like(batch.q, float("nan")),
        k_scales_zeros=cache.k_scales_zeros,
        v_scales_zeros=cache.v_scales_zeros,
        convert=convert,
    )
    expected = reference.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.query_lens, batch.context_lens, batch.block_tables, scale
    )
    case.assert_close(out, expected, case.attention_tol)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("sliding_window", "softcap"), [(None, None), (20, None), (7, 10.0)])
def test_decode_over_quantized_cache_far_from_zero(case, paged_batch, policy, sliding_window, softcap):
    """Values offset from 0 give large zeros: the kernel's zero * sum(q) and sum(p * zero) terms carry most of each
    score and output, and soft-capping and the window act on the rebuilt scores."""
    from lm_torch.kernels.decode_attention import decode_attention

    context_lens = [45, 6, 70]
    batch = paged_batch(case, 40 + policy, [1] * 3, context_lens, 8, 2, 32, q_scale=2.0)
    num_blocks, block_size = batch.k_cache.shape[:2]
    cache = allocate_kv_cache(num_blocks, block_size, 2, 32, policy, case.dtype, case.device)
    flat = (num_blocks * block_size, 2, 32)
    k, v = (batch.k_cache * 0.5 + 3.0).view(flat), (batch.v_cache - 4.0).view(flat)
    slots = torch.arange(num_blocks * block_size, device=case.device)
    reference.store_kv_cache_quantized(k, v, *cache, slots, policy)
    k_values = reference.dequantize_cache(cache.k, cache.k_scales_zeros, policy)
    v_values = reference.dequantize_cache(cache.v, cache.v_scales_zeros, policy)
    scale = 1 / math.sqrt(32)
    out = decode_attention(
        batch.q,
        cache.k,
        cache.v,
        batch.block_tables,
        batch.query_start_loc,
        batch.context_lens_tensor,
        scale,
        max_context_len=max(context_lens),
        sliding_window=sliding_window,
        softcap=softcap,
        num_splits=2,
        out=torch.full_like(batch.q, float("nan")),
        k_scales_zeros=cache.k_scales_zeros,
        v_scales_zeros=cache.v_scales_zeros,
    )
    expected = reference.paged_attention(
        batch.q, k_values, v_values, [1] * 3, context_lens, batch.block_tables, scale, sliding_window, softcap
    )
    case.assert_close(out, expected, case.attention_tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_codes_to_is_exact(case, dtype):
    """Every code 0..255 comes out of `codes_to`'s bit tricks as the same integer in bf16, fp16 and float32."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(case.device)
    out = torch.empty(256, dtype=dtype, device=case.device)
    _codes_to_kernel[(1,)](codes, out, N=256)
    assert torch.equal(out.cpu(), torch.arange(256, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("part", [0, 1, 2], ids=["byte", "low-nibble", "high-nibble"])
def test_codes_operand_is_exact(case, dtype, part):
    """The decode kernel's PTX conversion (bf16, fp16 on the GPU; plain on the CPU) gives every byte, or its low or
    high nibble, as the same integer, each in its own place."""
    if dtype != torch.float32 and case.device != "cuda":
        pytest.skip("the bf16 and fp16 conversions are PTX: GPU only")
    codes = torch.arange(256, dtype=torch.int32)
    want = codes if part == 0 else codes & 15 if part == 1 else codes >> 4
    out = torch.empty(256, dtype=dtype, device=case.device)
    _codes_operand_kernel[(1,)](codes.to(torch.uint8).to(case.device), out, N=256, PART=part)
    assert torch.equal(out.cpu(), want.to(dtype))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("sliding_window", "softcap"), [(None, None), (20, None), (7, 10.0)])
def test_prefill_over_quantized_cache(case, paged_batch, policy, sliding_window, softcap):
    from lm_torch.kernels.prefill_attention import prefill_attention, prefill_tiles, tokens_per_tile

    query_lens, context_lens = [5, 7, 40, 1], [5, 30, 40, 9]
    batch, cache = _attention_inputs(case, paged_batch, 3 + policy, query_lens, context_lens, 8, 2, 32, policy)
    scale = 1 / math.sqrt(32)
    per_tile = tokens_per_tile(4, 32)
    tile_seq, tile_first = prefill_tiles(query_lens, per_tile, batch.q.device, skip_single=False)
    out = prefill_attention(
        batch.q,
        cache.k,
        cache.v,
        batch.block_tables,
        batch.query_start_loc,
        batch.context_lens_tensor,
        tile_seq,
        tile_first,
        scale,
        tokens_per_tile=per_tile,
        sliding_window=sliding_window,
        softcap=softcap,
        out=torch.full_like(batch.q, float("nan")),
        k_scales_zeros=cache.k_scales_zeros,
        v_scales_zeros=cache.v_scales_zeros,
    )
    expected = reference.paged_attention(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        query_lens,
        context_lens,
        batch.block_tables,
        scale,
        sliding_window,
        softcap,
    )
    case.assert_close(out, expected, case.attention_tol)


def test_int4_needs_two_tiles_of_16(case, paged_batch):
    from lm_torch.kernels.decode_attention import decode_attention

    batch, cache = _attention_inputs(case, paged_batch, 0, [1], [5], 4, 2, 16, 4)
    with pytest.raises(ValueError, match="head_dim >= 32"):
        decode_attention(
            batch.q,
            cache.k,
            cache.v,
            batch.block_tables,
            batch.query_start_loc,
            batch.context_lens_tensor,
            0.25,
            max_context_len=5,
            k_scales_zeros=cache.k_scales_zeros,
            v_scales_zeros=cache.v_scales_zeros,
        )


@pytest.mark.parametrize("policy", POLICIES)
def test_decode_over_quantized_cache_in_a_cuda_graph(case, paged_batch, policy):
    """Captured once, replayed after the cache and lengths changed: no host sync, no data-dependent allocation."""
    from lm_torch.kernels.decode_attention import decode_attention
    from lm_torch.kernels.kv_cache import store_kv_cache

    if case.device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    batch, cache = _attention_inputs(case, paged_batch, 9, [1] * 3, [40, 8, 70], 8, 2, 64, policy)
    new_kv = case.randn(3, 2, 64, generator=torch.Generator().manual_seed(1))
    slots = torch.zeros(3, dtype=torch.int64, device="cuda")
    out = torch.empty_like(batch.q)

    def step():
        store_kv_cache(new_kv, new_kv, cache.k, cache.v, slots, cache.k_scales_zeros, cache.v_scales_zeros)
        decode_attention(
            batch.q,
            cache.k,
            cache.v,
            batch.block_tables,
            batch.query_start_loc,
            batch.context_lens_tensor,
            0.125,
            max_context_len=128,
            num_splits=2,
            out=out,
            k_scales_zeros=cache.k_scales_zeros,
            v_scales_zeros=cache.v_scales_zeros,
        )

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # Each sequence's newest token goes to its last position; contexts grow by one.
    lens = [41, 9, 71]
    batch.context_lens_tensor.copy_(torch.tensor(lens, dtype=torch.int32))
    block_size = cache.k.shape[1]
    slots.copy_(
        torch.tensor(
            [
                int(batch.block_tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                for i, n in enumerate(lens)
            ]
        )
    )
    graph.replay()
    torch.cuda.synchronize()
    k_values = reference.dequantize_cache(cache.k, cache.k_scales_zeros, policy)
    v_values = reference.dequantize_cache(cache.v, cache.v_scales_zeros, policy)
    expected = reference.paged_attention(batch.q, k_values, v_values, [1] * 3, lens, batch.block_tables, 0.125)
    case.assert_close(out, expected, case.attention_tol)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("sliding_window", "softcap"), [(None, None), (10, 8.0)])
@pytest.mark.parametrize("sort", [False, True], ids=["arrival-order", "longest-first"])
def test_triton_backend_matches_torch_backend_on_quantized_cache(
    case, policy, sliding_window, softcap, sort, monkeypatch
):
    """A whole mixed step (decodes, a chunk after a cached prefix, a fresh prompt) through both backends from the
    same quantized cache: the Triton kernels store what the torch backend stores and attend alike, whether the
    decode programs take the sequences in order or longest context first (what large batches do)."""
    from lm_torch.attention import StepMetadata, TorchAttentionBackend, TritonAttentionBackend, triton_backend

    monkeypatch.setattr(triton_backend, "SORT_MIN_DECODES_QUANTIZED", 1 if sort else 1 << 30)

    gen = torch.Generator().manual_seed(policy)
    query_lens, context_lens = [1, 9, 1, 20, 1], [37, 30, 5, 20, 18]
    used = [-(-ctx // 16) for ctx in context_lens]
    num_blocks = sum(used) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, first = [], 0
    for n in used:
        tables.append(order[first : first + n])
        first += n
    num_heads, num_kv_heads, head_dim = 8, 2, 32
    q = case.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    k = case.randn(sum(query_lens), num_kv_heads, head_dim, generator=gen)
    v = case.randn(sum(query_lens), num_kv_heads, head_dim, generator=gen)
    cache = _quantized(case, num_blocks, 16, num_kv_heads, head_dim, policy, seed=policy)
    results = []
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        caches = [t.clone() for t in cache]
        meta = StepMetadata.build(query_lens, context_lens, tables, 16, case.device)
        out = backend.forward(
            q,
            k,
            v,
            tuple(caches),
            backend.prepare(meta),
            scale=1 / math.sqrt(head_dim),
            sliding_window=sliding_window,
            softcap=softcap,
        )
        results.append((out, caches))
    (out, caches), (expected, expected_caches) = results
    _assert_codes_match(case, caches[0], caches[2], expected_caches[0], expected_caches[2], policy)
    _assert_codes_match(case, caches[1], caches[3], expected_caches[1], expected_caches[3], policy)
    # The torch backend computes in dtype (SDPA) where the reference is float32: allow both their errors.
    case.assert_close(out, expected, 2 * case.attention_tol)
