"""Rotary position embedding applied in place to q and k, one program per token, from precomputed tables; optionally
fused with writing the step's rotated K and V into the paged cache.

The tables are `lm_torch.layers.rotary.RotaryEmbedding`'s `cos`/`sin` buffers ([max_positions, rotary_dim], the
rotary_dim / 2 frequencies written twice), which already carry every scaling type lm-torch supports (linear, dynamic
NTK within its range, llama3, yarn with its attention factor, longrope): the kernel only looks up a token's row by its
position. Features past `rotary_dim` (partial rotary, Phi-3 style) pass through untouched.

Two pairings: neox rotates feature i with i + rotary_dim / 2 (Llama and most HF models); gptj rotates 2i with 2i + 1.
"""

# Triton's type stubs describe host Python, not the @triton.jit language, so these rules are off here:
# reportArgumentType: `tl.constexpr` parameters are typed as the class `constexpr`, so the plain values passed to them
#   are rejected.
# pyright: reportArgumentType=false

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, next_power_of_2, pdl_enabled, pdl_trigger, pdl_wait
from lm_torch.kernels.kv_cache import quantize_store_heads, quantized_cache_args


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_h,
    num_heads,
    c,
    s,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    half,
    IS_NEOX: tl.constexpr,
    copy_ptr,  # where the rotated values also go (the KV cache), with stride_copy_h between heads
    stride_copy_h,
    COPY: tl.constexpr,
):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    pairs = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (pairs < half)
    if IS_NEOX:
        first = pairs
        second = pairs + half
    else:
        first = 2 * pairs
        second = 2 * pairs + 1
    x1 = tl.load(x_ptr + heads * stride_h + first, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + heads * stride_h + second, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    y1 = (a * c - b * s).to(x1.dtype)
    y2 = (b * c + a * s).to(x2.dtype)
    tl.store(x_ptr + heads * stride_h + first, y1, mask=mask)
    tl.store(x_ptr + heads * stride_h + second, y2, mask=mask)
    if COPY:
        tl.store(copy_ptr + heads * stride_copy_h + first, y1.to(copy_ptr.dtype.element_ty), mask=mask)
        tl.store(copy_ptr + heads * stride_copy_h + second, y2.to(copy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(
    src_ptr, stride_src_h, dst_ptr, stride_dst_h, num_heads, lo, hi, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr
):
    """Features [lo, hi) of every head, from a token's row to its cache slot."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < num_heads) & (dims >= lo) & (dims < hi)
    x = tl.load(src_ptr + heads * stride_src_h + dims, mask=mask)
    tl.store(dst_ptr + heads * stride_dst_h + dims, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotated_features(
    x_row, stride_h, heads, features, mask, cos_row, sin_row, half, IS_NEOX: tl.constexpr
):  # [HEADS_PAD, F] float32
    """Features `features` [1, F] of heads `heads` [HEADS_PAD, 1] of a token's row after rotary, computed in
    registers for any set of features (each loads its rotation partner): the quantized store needs a head's halves
    [0, head_dim / 2) and [head_dim / 2, head_dim), which are not the pairs rotary works in. Rounded to x's dtype,
    as the unquantized cache would hold them."""
    if IS_NEOX:
        is_first = features < half
        partner = tl.where(is_first, features + half, features - half)
        pair = tl.where(is_first, features, features - half)
    else:
        is_first = (features % 2) == 0
        partner = tl.where(is_first, features + 1, features - 1)
        pair = features // 2
    rotated = features < 2 * half  # features past rotary_dim (partial rotary) pass through
    x = tl.load(x_row + heads * stride_h + features, mask=mask, other=0.0)
    other = tl.load(x_row + heads * stride_h + partner, mask=mask & rotated, other=0.0).to(tl.float32)
    c = tl.load(cos_row + pair, mask=rotated, other=1.0).to(tl.float32)
    s = tl.load(sin_row + pair, mask=rotated, other=0.0).to(tl.float32)
    a = x.to(tl.float32)
    y = tl.where(is_first, a * c - other * s, a * c + other * s).to(x.dtype)
    return tl.where(rotated, y, x).to(tl.float32)


@triton.jit
def _store_quantized(
    k_row,
    stride_kh,
    v_row,
    stride_vh,
    cos_row,
    sin_row,
    half,
    head_dim,
    num_kv_heads,
    k_dst,  # the token's slot in the uint8 caches
    v_dst,
    stride_kch,
    stride_vch,
    sz_offset,  # the token's slot in the scales_zeros tensors
    k_sz_ptr,
    v_sz_ptr,
    stride_szh,
    K_HEADS_PAD: tl.constexpr,
    HEAD_HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
    QUANT_POLICY: tl.constexpr,
):
    """Rotate a token's k, then quantize it and its v into their cache slot (k's own row is left as it was)."""
    head_half = head_dim // 2
    heads = tl.arange(0, K_HEADS_PAD)
    pairs = tl.arange(0, HEAD_HALF_PAD)
    mask = (heads < num_kv_heads)[:, None] & (pairs < head_half)[None, :]
    lo = pairs[None, :]
    k_lo = _rotated_features(k_row, stride_kh, heads[:, None], lo, mask, cos_row, sin_row, half, IS_NEOX)
    k_hi = _rotated_features(k_row, stride_kh, heads[:, None], lo + head_half, mask, cos_row, sin_row, half, IS_NEOX)
    quantize_store_heads(
        k_lo,
        k_hi,
        heads,
        pairs,
        num_kv_heads,
        head_half,
        k_dst,
        stride_kch,
        k_sz_ptr + sz_offset,
        stride_szh,
        QUANT_POLICY,
    )
    v_src = v_row + heads[:, None] * stride_vh + lo
    v_lo = tl.load(v_src, mask=mask, other=0.0).to(tl.float32)
    v_hi = tl.load(v_src + head_half, mask=mask, other=0.0).to(tl.float32)
    quantize_store_heads(
        v_lo,
        v_hi,
        heads,
        pairs,
        num_kv_heads,
        head_half,
        v_dst,
        stride_vch,
        v_sz_ptr + sz_offset,
        stride_szh,
        QUANT_POLICY,
    )


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
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
    num_heads,
    num_kv_heads,
    half,
    head_dim,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
    STORE: tl.constexpr,  # also write the rotated k and v into the paged cache at the token's slot
    PARTIAL: tl.constexpr,  # rotary_dim < head_dim: features past it are copied to the cache unrotated
    BLOCK_SIZE: tl.constexpr,
    QUANT_POLICY: tl.constexpr,  # with STORE: 0 copies into the cache's dtype, 8/4 quantize to int8/int4
    HEAD_HALF_PAD: tl.constexpr,  # head_dim / 2 padded to a power of two (quantized caches)
    PDL: tl.constexpr,  # launched with programmatic dependent launch: starts early, waits before any load
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_PAD)[None, :]
    c = tl.load(cos_ptr + position * stride_cos + pairs, mask=pairs < half, other=0.0).to(tl.float32)  # [1, HALF_PAD]
    s = tl.load(sin_ptr + position * stride_sin + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    q_row = q_ptr + token * stride_qt
    k_row = k_ptr + token * stride_kt
    _rotate_heads(q_row, stride_qh, num_heads, c, s, Q_HEADS_PAD, HALF_PAD, half, IS_NEOX, q_row, stride_qh, False)
    if STORE:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        # Negative slots are padding rows (a CUDA graph's batch padded to its captured size): nothing to store.
        if QUANT_POLICY != 0:
            if slot >= 0:
                _store_quantized(
                    k_row,
                    stride_kh,
                    v_ptr + token * stride_vt,
                    stride_vh,
                    cos_ptr + position * stride_cos,
                    sin_ptr + position * stride_sin,
                    half,
                    head_dim,
                    num_kv_heads,
                    k_cache_ptr + (slot // BLOCK_SIZE) * stride_kcb + (slot % BLOCK_SIZE) * stride_kcs,
                    v_cache_ptr + (slot // BLOCK_SIZE) * stride_vcb + (slot % BLOCK_SIZE) * stride_vcs,
                    stride_kch,
                    stride_vch,
                    (slot // BLOCK_SIZE) * stride_szb + (slot % BLOCK_SIZE) * stride_szs,
                    k_sz_ptr,
                    v_sz_ptr,
                    stride_szh,
                    K_HEADS_PAD,
                    HEAD_HALF_PAD,
                    IS_NEOX,
                    QUANT_POLICY,
                )
            else:
                _rotate_heads(
                    k_row, stride_kh, num_kv_heads, c, s, K_HEADS_PAD, HALF_PAD, half, IS_NEOX, k_row, stride_kh, False
                )
        elif slot >= 0:
            k_dst = k_cache_ptr + (slot // BLOCK_SIZE) * stride_kcb + (slot % BLOCK_SIZE) * stride_kcs
            v_dst = v_cache_ptr + (slot // BLOCK_SIZE) * stride_vcb + (slot % BLOCK_SIZE) * stride_vcs
            _rotate_heads(
                k_row, stride_kh, num_kv_heads, c, s, K_HEADS_PAD, HALF_PAD, half, IS_NEOX, k_dst, stride_kch, True
            )
            if PARTIAL:
                _copy_heads(k_row, stride_kh, k_dst, stride_kch, num_kv_heads, 2 * half, head_dim, K_HEADS_PAD, DIM_PAD)
            v_row = v_ptr + token * stride_vt
            _copy_heads(v_row, stride_vh, v_dst, stride_vch, num_kv_heads, 0, head_dim, K_HEADS_PAD, DIM_PAD)
        else:
            _rotate_heads(
                k_row, stride_kh, num_kv_heads, c, s, K_HEADS_PAD, HALF_PAD, half, IS_NEOX, k_row, stride_kh, False
            )
    else:
        _rotate_heads(
            k_row, stride_kh, num_kv_heads, c, s, K_HEADS_PAD, HALF_PAD, half, IS_NEOX, k_row, stride_kh, False
        )


def apply_rotary(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim] (any token/head strides, head_dim contiguous)
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [max_positions, rotary_dim]
    sin: torch.Tensor,
    is_neox: bool = True,
    *,
    v: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim], with the caches: stored too
    k_cache: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,  # [num_tokens] int: block * block_size + offset; negative = skip
    k_scales_zeros: torch.Tensor | None = None,  # quantized uint8 caches: [num_blocks, block_size, num_kv_heads, 2]
    v_scales_zeros: torch.Tensor | None = None,
    allow_pdl: bool = True,  # False: never programmatic dependent launch (`KernelConfig.pdl`)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place by each token's position (float32 math) and return them.

    Given `v`, the caches and `slot_mapping`, the same launch also writes the rotated k and v at each token's slot
    (what `kv_cache.store_kv_cache` would do next): one kernel instead of two per layer, and k read once. With
    `*_scales_zeros` the caches are quantized (`lm_torch.kv_quant`): the slot then gets the codes of the rotated k
    (rounded to k's dtype first) and of v, and k itself is not rotated in place (only the cache gets it).
    """
    store = k_cache is not None
    check_cuda_or_interpreter(positions, q, k, cos, sin)
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > q.shape[-1] or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: tables of shape {tuple(cos.shape)} do not fit head_dim {q.shape[-1]}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or positions.shape != (q.shape[0],):
        raise ValueError("apply_rotary: q, k and positions disagree on num_tokens or head_dim")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("apply_rotary: head_dim must be contiguous in q and k, and rotary_dim in the tables")
    if store:
        if v is None or v_cache is None or slot_mapping is None:
            raise ValueError("apply_rotary: storing into the cache needs v, k_cache, v_cache and slot_mapping")
        check_cuda_or_interpreter(v, k_cache, v_cache, slot_mapping)
        policy, sz_args = quantized_cache_args(k_cache, v_cache, k_scales_zeros, v_scales_zeros, k.shape[2])
        if v.shape != k.shape or k_cache.shape[2] != k.shape[1] or v_cache.shape != k_cache.shape:
            raise ValueError(f"apply_rotary: k {tuple(k.shape)}, v {tuple(v.shape)}, cache {tuple(k_cache.shape)}")
        if v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
            raise ValueError("apply_rotary: head_dim must be contiguous in v and the caches")
        if slot_mapping.shape != (q.shape[0],):
            raise ValueError(f"apply_rotary: slot_mapping {tuple(slot_mapping.shape)} for {q.shape[0]} tokens")
    else:
        v, k_cache, v_cache, slot_mapping = k, k, k, positions  # placeholders, never read
        policy, sz_args = 0, (k, k, 0, 0, 0)
    cache_strides = (
        (
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
        )
        if store
        else (0, 0, 0, 0, 0, 0)
    )
    if q.shape[0]:
        half = rotary_dim // 2
        pdl = pdl_enabled(q.device, allow_pdl)
        _rotary_kernel[(q.shape[0],)](
            positions,
            q,
            k,
            cos,
            sin,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            sin.stride(0),
            v.stride(0),
            v.stride(1),
            *cache_strides,
            *sz_args,
            q.shape[1],
            k.shape[1],
            half,
            q.shape[2],
            Q_HEADS_PAD=next_power_of_2(q.shape[1]),
            K_HEADS_PAD=next_power_of_2(k.shape[1]),
            HALF_PAD=next_power_of_2(half),
            DIM_PAD=next_power_of_2(q.shape[2]),
            IS_NEOX=is_neox,
            STORE=store,
            PARTIAL=rotary_dim < q.shape[2],
            BLOCK_SIZE=k_cache.shape[1] if store else 1,
            QUANT_POLICY=policy,
            HEAD_HALF_PAD=next_power_of_2(q.shape[2] // 2),
            PDL=pdl,
            num_warps=4,  # pyright: ignore[reportCallIssue]  # triton launch option
            **({"launch_pdl": True} if pdl else {}),
        )
    return q, k
