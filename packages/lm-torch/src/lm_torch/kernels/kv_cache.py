"""Write a step's new K/V into the paged cache, one program per token; quantized to int8 or int4 on the way when the
cache is (`quant_policy`, layout in `lm_torch.kv_quant`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, next_power_of_2
from lm_torch.kv_quant import cache_quant_policy


@triton.jit
def quantize_store_heads(
    x_lo,  # [HEADS_PAD, HALF_PAD] float32: features j of each head...
    x_hi,  # ...and j + half_dim (the two halves an int4 byte holds)
    heads,  # [HEADS_PAD] head indices
    pairs,  # [HALF_PAD] feature indices j
    num_heads,
    half_dim,
    dst_ptr,  # the token's cache slot (uint8), heads stride_dst_h apart
    stride_dst_h,
    sz_ptr,  # the token's (scale, zero) slot, heads stride_sz_h apart
    stride_sz_h,
    QUANT_POLICY: tl.constexpr,  # 8: int8, 4: int4
):
    """Quantize one token's rows (asymmetric, one scale and zero per head) and store codes, scales and zeros."""
    head_mask = heads < num_heads
    mask = head_mask[:, None] & (pairs < half_dim)[None, :]
    high = tl.maximum(tl.max(tl.where(mask, x_lo, float("-inf")), 1), tl.max(tl.where(mask, x_hi, float("-inf")), 1))
    low = tl.minimum(tl.min(tl.where(mask, x_lo, float("inf")), 1), tl.min(tl.where(mask, x_hi, float("inf")), 1))
    # Padding heads (all masked) would give inf - inf: give them a range of 0 instead (their stores are masked).
    high = tl.where(head_mask, high, 0.0)
    low = tl.where(head_mask, low, 0.0)
    levels = 255.0 if QUANT_POLICY == 8 else 15.0
    # Rounded to their stored dtype first: the codes are computed against what dequantization will use.
    scale = ((high - low) / levels).to(sz_ptr.dtype.element_ty).to(tl.float32)
    zero = low.to(sz_ptr.dtype.element_ty).to(tl.float32)
    inverse = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)  # constant row: all codes 0
    code_lo = tl.minimum(tl.maximum(tl.floor((x_lo - zero[:, None]) * inverse[:, None] + 0.5), 0.0), levels)
    code_hi = tl.minimum(tl.maximum(tl.floor((x_hi - zero[:, None]) * inverse[:, None] + 0.5), 0.0), levels)
    code_lo = code_lo.to(tl.uint8)
    code_hi = code_hi.to(tl.uint8)
    dst = dst_ptr + heads[:, None] * stride_dst_h + pairs[None, :]
    if QUANT_POLICY == 8:
        tl.store(dst, code_lo, mask=mask)
        tl.store(dst + half_dim, code_hi, mask=mask)
    else:
        tl.store(dst, code_lo | (code_hi << 4), mask=mask)
    sz = sz_ptr + heads * stride_sz_h
    tl.store(sz, scale.to(sz_ptr.dtype.element_ty), mask=head_mask)
    tl.store(sz + 1, zero.to(sz_ptr.dtype.element_ty), mask=head_mask)


@triton.jit
def unpack_codes(codes, QUANT_POLICY: tl.constexpr):
    """A loaded tile of cache codes [BLOCK_N, F] (uint8) as (codes of features j, codes of features j + F): an int4
    byte holds both, low nibble first; for int8 the second is the first again."""
    if QUANT_POLICY == 4:
        return codes & 15, codes >> 4
    else:
        return codes, codes


@triton.jit
def codes_to(codes, dtype: tl.constexpr):
    """Integer codes 0..255 (a tile of any integer type) as `dtype`, exactly. For bf16 and fp16 with bit tricks on
    the fast integer and float pipes: a GPU's integer-to-float conversion runs at a quarter of their rate or less,
    and a cache tile is one conversion per element."""
    if dtype == tl.bfloat16:
        # The float32 of bits 0x4B000000 | c is 2^23 + c; minus 2^23 it is c exactly, with its low 16 bits zero, so
        # its high half is c in bf16.
        exact = (codes.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return (exact.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float16:
        # The fp16 of bits 0x6400 | c is 1024 + c (exact: fp16 holds integers to 2048).
        return (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        return codes.to(dtype)


@triton.jit
def load_kv_tile(
    first,
    hi,
    kv_args,
    kv_strides,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FEAT: tl.constexpr,
    QUANT_POLICY: tl.constexpr,
):
    """The K and V tiles [BLOCK_N, FEAT_PAD] of one sequence's positions [first, first + BLOCK_N) below `hi` (rows past
    it 0) through its block table, with a quantized cache's per-token scales and zeros as float32 [BLOCK_N] (zeros of
    no meaning otherwise) and the mask of the valid rows. `kv_args`: (block table row, k cache, v cache, k and v
    (scale, zero) pointers, kv head, feature offsets [FEAT_PAD]); `kv_strides`: the caches' block, slot and head
    strides, then the scales'. Shared by the decode and prefill kernels."""
    table, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, kv_head, dims = kv_args
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_szb, stride_szs, stride_szh = kv_strides
    positions = first + tl.arange(0, BLOCK_N)
    valid = positions < hi
    blocks = tl.load(table + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slots = positions % BLOCK_SIZE
    kv_mask = valid[:, None] & (dims < FEAT)[None, :]
    k = tl.load(
        k_cache_ptr + blocks[:, None] * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh + dims,
        mask=kv_mask,
        other=0,
    )  # [BLOCK_N, FEAT_PAD]
    v = tl.load(
        v_cache_ptr + blocks[:, None] * stride_vb + slots[:, None] * stride_vs + kv_head * stride_vh + dims,
        mask=kv_mask,
        other=0,
    )
    if QUANT_POLICY != 0:
        # (scale, zero) side by side: one load of the pair per token, split in registers.
        pair = (blocks * stride_szb + slots * stride_szs + kv_head * stride_szh)[:, None] + tl.arange(0, 2)[None, :]
        k_scale, k_zero = tl.split(tl.load(k_sz_ptr + pair, mask=valid[:, None], other=0.0).to(tl.float32))
        v_scale, v_zero = tl.split(tl.load(v_sz_ptr + pair, mask=valid[:, None], other=0.0).to(tl.float32))
    else:
        k_scale = tl.zeros([BLOCK_N], tl.float32)
        k_zero = k_scale
        v_scale = k_scale
        v_zero = k_scale
    return k, v, k_scale, k_zero, v_scale, v_zero, valid


@triton.jit
def dequantize_tile(codes, scale, zero, QUANT_POLICY: tl.constexpr):
    """A loaded tile of cache codes [BLOCK_N, F] (uint8) back to float32 values with each row's scale and zero
    [BLOCK_N] (float32): (values, values of the high half) for int4, whose bytes hold features j and j + F; for int8
    the second is the first again. Rows whose scale and zero are 0 come out 0."""
    scale = scale[:, None]
    zero = zero[:, None]
    if QUANT_POLICY == 4:
        low = (codes & 15).to(tl.float32) * scale + zero
        high = (codes >> 4).to(tl.float32) * scale + zero
    else:
        low = codes.to(tl.float32) * scale + zero
        high = low
    return low, high


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,  # cache strides: block, slot within the block, kv head (the head_dim stride is 1)
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    k_sz_ptr,  # quantized caches: [num_blocks, block_size, num_kv_heads, 2] (scale, zero); unused otherwise
    v_sz_ptr,
    stride_szb,
    stride_szs,
    stride_szh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUANT_POLICY: tl.constexpr,  # 0: copy in the cache's dtype, 8: int8, 4: int4
    HALF_PAD: tl.constexpr,  # HEAD_DIM / 2 padded to a power of two (quantized caches)
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # Negative slots are padding rows (a CUDA graph's batch is padded to its captured size): nothing to write.
    if QUANT_POLICY != 0:
        if slot >= 0:
            block = slot // BLOCK_SIZE
            offset = slot % BLOCK_SIZE
            heads = tl.arange(0, HEADS_PAD)
            pairs = tl.arange(0, HALF_PAD)
            half = HEAD_DIM // 2
            mask = (heads < NUM_KV_HEADS)[:, None] & (pairs < half)[None, :]
            sz_offset = block * stride_szb + offset * stride_szs
            k_src = k_ptr + token * stride_kt + heads[:, None] * stride_kh + pairs[None, :]
            k_lo = tl.load(k_src, mask=mask, other=0.0).to(tl.float32)
            k_hi = tl.load(k_src + half, mask=mask, other=0.0).to(tl.float32)
            k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs
            quantize_store_heads(
                k_lo,
                k_hi,
                heads,
                pairs,
                NUM_KV_HEADS,
                half,
                k_dst,
                stride_kch,
                k_sz_ptr + sz_offset,
                stride_szh,
                QUANT_POLICY,
            )
            v_src = v_ptr + token * stride_vt + heads[:, None] * stride_vh + pairs[None, :]
            v_lo = tl.load(v_src, mask=mask, other=0.0).to(tl.float32)
            v_hi = tl.load(v_src + half, mask=mask, other=0.0).to(tl.float32)
            v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs
            quantize_store_heads(
                v_lo,
                v_hi,
                heads,
                pairs,
                NUM_KV_HEADS,
                half,
                v_dst,
                stride_vch,
                v_sz_ptr + sz_offset,
                stride_szh,
                QUANT_POLICY,
            )
    elif slot >= 0:
        heads = tl.arange(0, HEADS_PAD)[:, None]
        dims = tl.arange(0, DIM_PAD)[None, :]
        mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
        k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims
        v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims
        tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] (any strides, head_dim contiguous)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64: block * block_size + offset; negative = skip
    k_scales_zeros: torch.Tensor | None = None,  # quantized uint8 caches: [num_blocks, block_size, num_kv_heads, 2]
    v_scales_zeros: torch.Tensor | None = None,
) -> None:
    """Write token t's K/V at flat slot `slot_mapping[t]` of the caches (cast to the cache dtype, or quantized with
    a scale and zero per head into `*_scales_zeros` when given)."""
    check_cuda_or_interpreter(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"store_kv_cache: k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slot_mapping.shape)}")
    policy, sz_args = quantized_cache_args(k_cache, v_cache, k_scales_zeros, v_scales_zeros, head_dim)
    if k_cache.shape[2] != num_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"store_kv_cache: cache {tuple(k_cache.shape)} does not hold k of {tuple(k.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("store_kv_cache: head_dim must be the contiguous dimension of k, v and the caches")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        *sz_args,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_kv_heads),
        DIM_PAD=next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        QUANT_POLICY=policy,
        HALF_PAD=next_power_of_2(head_dim // 2),
        num_warps=4,  # pyright: ignore[reportCallIssue]  # triton launch option
    )


def quantized_cache_args(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scales_zeros: torch.Tensor | None,
    v_scales_zeros: torch.Tensor | None,
    head_dim: int,
) -> tuple[int, tuple[torch.Tensor, torch.Tensor, int, int, int]]:
    """(quant_policy, the kernels' scale arguments: k and v scales_zeros and their block, slot and head strides).

    Without scales the cache must hold head_dim features in a float dtype, and the arguments are placeholders the
    kernels never read. Raises ValueError on a cache that does not fit `head_dim` and its policy."""
    policy = cache_quant_policy(k_cache, k_scales_zeros, head_dim)
    if policy == 0:
        if k_cache.shape[3] != head_dim:
            raise ValueError(f"KV cache of {k_cache.shape[3]} features per head does not hold head_dim {head_dim}")
        return 0, (k_cache, v_cache, 0, 0, 0)
    assert k_scales_zeros is not None  # cache_quant_policy returns a nonzero policy only with scales
    v_policy = cache_quant_policy(v_cache, v_scales_zeros, head_dim)
    if v_policy != policy or v_scales_zeros is None or v_scales_zeros.stride() != k_scales_zeros.stride():
        raise ValueError("the K and V caches must be quantized alike (same policy, scales_zeros of the same layout)")
    if head_dim % 2:
        raise ValueError(f"quantized KV caches need an even head_dim, got {head_dim}")
    strides = k_scales_zeros.stride()
    return policy, (k_scales_zeros, v_scales_zeros, strides[0], strides[1], strides[2])
