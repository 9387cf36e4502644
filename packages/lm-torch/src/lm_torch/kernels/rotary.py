"""Rotary position embedding applied in place to q and k, one program per token, from precomputed tables.

The tables are `lm_torch.layers.rotary.RotaryEmbedding`'s `cos`/`sin` buffers ([max_positions, rotary_dim], the
rotary_dim / 2 frequencies written twice), which already carry every scaling type lm-torch supports (linear, dynamic
NTK within its range, llama3, yarn with its attention factor, longrope): the kernel only looks up a token's row by its
position. Features past `rotary_dim` (partial rotary, Phi-3 style) pass through untouched.

Two pairings: neox rotates feature i with i + rotary_dim / 2 (Llama and most HF models); gptj rotates 2i with 2i + 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, next_power_of_2


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, num_heads, c, s, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, half, IS_NEOX: tl.constexpr
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
    tl.store(x_ptr + heads * stride_h + first, (a * c - b * s).to(x1.dtype), mask=mask)
    tl.store(x_ptr + heads * stride_h + second, (b * c + a * s).to(x2.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    num_heads,
    num_kv_heads,
    half,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_PAD)[None, :]
    c = tl.load(cos_ptr + position * stride_cos + pairs, mask=pairs < half, other=0.0).to(tl.float32)  # [1, HALF_PAD]
    s = tl.load(sin_ptr + position * stride_sin + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    q_row = q_ptr + token.to(tl.int64) * stride_qt
    k_row = k_ptr + token.to(tl.int64) * stride_kt
    _rotate_heads(q_row, stride_qh, num_heads, c, s, Q_HEADS_PAD, HALF_PAD, half, IS_NEOX)
    _rotate_heads(k_row, stride_kh, num_kv_heads, c, s, K_HEADS_PAD, HALF_PAD, half, IS_NEOX)


def apply_rotary(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim] (any token/head strides, head_dim contiguous)
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [max_positions, rotary_dim]
    sin: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place by each token's position (float32 math) and return them."""
    check_cuda_or_interpreter(positions, q, k, cos, sin)
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > q.shape[-1] or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: tables of shape {tuple(cos.shape)} do not fit head_dim {q.shape[-1]}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or positions.shape != (q.shape[0],):
        raise ValueError("apply_rotary: q, k and positions disagree on num_tokens or head_dim")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("apply_rotary: head_dim must be contiguous in q and k, and rotary_dim in the tables")
    if q.shape[0]:
        half = rotary_dim // 2
        _rotary_kernel[(q.shape[0],)](
            positions,
            q,
            k,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            sin.stride(0),
            q.shape[1],
            k.shape[1],
            half,
            Q_HEADS_PAD=next_power_of_2(q.shape[1]),
            K_HEADS_PAD=next_power_of_2(k.shape[1]),
            HALF_PAD=next_power_of_2(half),
            IS_NEOX=is_neox,
            num_warps=4,
        )
    return q, k
