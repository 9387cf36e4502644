"""W4A16 linears y = x @ W^T with 4-bit weights in groups along the inputs: the AWQ and GPTQ layers on CUDA.

One layout for both formats (`pack_int4` writes it; `layers.quant.weight_only` repacks checkpoints into it once):
    packed [N, K / 8] int32: word j of row n holds inputs 8j .. 8j + 7 of output n, input 8j + t in bits 4t .. 4t + 3;
    scales [K / group, N] and zeros [K / group, N] in the activation dtype (zeros are small integers, exact there):
    W[n, k] = (q[n, k] - zeros[k // group, n]) * scales[k // group, n].
K is the contiguous dimension, as in `kernels.gemv`: a program streams whole words of BLOCK_N rows.

Two kernels:
- `_w4a16_gemv_kernel`, for one input row (batch-1 decode), bound by reading the packed weight (a quarter of the
  bf16 bytes). The nibbles become floats with the exponent trick (bits 0x4B000000 | q are the float 2^23 + q, so one
  OR and one subtraction instead of a slow int-to-float conversion), products accumulate per word in float32, and the
  group's scale multiplies each word's sum once: tiles are viewed [BLOCK_N, groups in tile, words per group, 8].
- `_w4a16_gemm_kernel`, for more rows: each weight tile is dequantized once in registers into the activation dtype
  and multiplied by BLOCK_M rows on the tensor cores (`tl.dot`); small M runs BLOCK_M = 16 with split-K so that
  enough programs stream the weight, large M (prefill) runs big tiles.
Split-K programs add float32 partial sums atomically; without split the result is stored directly (one launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, multiprocessor_count


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    n,
    k,
    k_per_split,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GPT: tl.constexpr,  # groups per tile (1 when the tile is within a group)
    WPG: tl.constexpr,  # words per group in a tile
    ATOMIC: tl.constexpr,
):
    BLOCK_K: tl.constexpr = GPT * WPG * 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < n
    words_per_row = k // 8
    num_groups = k // GROUP
    gi = tl.arange(0, GPT)
    wi = tl.arange(0, WPG)
    ti = tl.arange(0, 8)
    shifts = ti * 4
    first = pid_k * k_per_split
    acc = tl.zeros([BLOCK_N, GPT, WPG], tl.float32)
    for start in range(first, first + k_per_split, BLOCK_K):
        word_idx = start // 8 + gi[:, None] * WPG + wi[None, :]  # [GPT, WPG]
        word_mask = word_idx < words_per_row
        words = tl.load(
            w_ptr + rows[:, None, None].to(tl.int64) * words_per_row + word_idx[None, :, :],
            mask=row_mask[:, None, None] & word_mask[None, :, :],
            other=0,
        )  # [BN, GPT, WPG] int32
        x = tl.load(x_ptr + word_idx[:, :, None] * 8 + ti[None, None, :], mask=word_mask[:, :, None], other=0.0).to(
            tl.float32
        )  # [GPT, WPG, 8]
        groups = start // GROUP + gi  # [GPT]
        gmask = row_mask[:, None] & (groups < num_groups)[None, :]
        offsets = groups[None, :] * n + rows[:, None]  # [BN, GPT]
        s = tl.load(s_ptr + offsets, mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offsets, mask=gmask, other=0.0).to(tl.float32)
        q = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xF
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q, exact
        d = qf - (z + 8388608.0)[:, :, None, None]  # q - zero, exact small integers
        acc += tl.sum(d * x[None, :, :, :], axis=3) * s[:, :, None]
    total = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN]
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, total, mask=row_mask)
    else:
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    m,
    n,
    k,
    stride_xm,
    stride_om,
    k_per_split,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GPT: tl.constexpr,
    WPG: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    BLOCK_K: tl.constexpr = GPT * WPG * 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_mask = rows_m < m
    n_mask = rows_n < n
    words_per_row = k // 8
    num_groups = k // GROUP
    gi = tl.arange(0, GPT)
    wi = tl.arange(0, WPG)
    shifts = tl.arange(0, 8) * 4
    ks = tl.arange(0, BLOCK_K)
    first = pid_k * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(first, first + k_per_split, BLOCK_K):
        word_idx = start // 8 + gi[:, None] * WPG + wi[None, :]  # [GPT, WPG]
        word_mask = word_idx < words_per_row
        words = tl.load(
            w_ptr + rows_n[:, None, None].to(tl.int64) * words_per_row + word_idx[None, :, :],
            mask=n_mask[:, None, None] & word_mask[None, :, :],
            other=0,
        )  # [BN, GPT, WPG] int32
        groups = start // GROUP + gi
        gmask = n_mask[:, None] & (groups < num_groups)[None, :]
        offsets = groups[None, :] * n + rows_n[:, None]  # [BN, GPT]
        s = tl.load(s_ptr + offsets, mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offsets, mask=gmask, other=0.0).to(tl.float32)
        q = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xF
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
        w = (qf - (z + 8388608.0)[:, :, None, None]) * s[:, :, None, None]  # [BN, GPT, WPG, 8]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
        cols = start + ks
        a = tl.load(
            x_ptr + rows_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
            mask=m_mask[:, None] & (cols < k)[None, :],
            other=0.0,
        )  # [BM, BK]
        acc = tl.dot(a, tl.trans(w), acc)
    out_ptrs = out_ptr + rows_m[:, None].to(tl.int64) * stride_om + rows_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _tile_shape(group_size: int, block_k: int) -> tuple[int, int]:
    """(groups per tile, words per group in a tile) for a K step of block_k inputs."""
    if block_k % 8 or (block_k % group_size and group_size % block_k):
        raise ValueError(f"w4a16: block_k {block_k} and group_size {group_size} must divide one another (x8)")
    return max(1, block_k // group_size), min(block_k, group_size) // 8


def _check(x, packed, scales, zeros, group_size) -> tuple[int, int, int]:
    check_cuda_or_interpreter(x, packed, scales, zeros)
    if x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"w4a16: x {tuple(x.shape)} must be [M, K] and packed {tuple(packed.shape)} [N, K/8] int32")
    m, k = x.shape
    n = packed.shape[0]
    if group_size % 8 or k % group_size or packed.shape[1] * 8 != k:
        raise ValueError(f"w4a16: K={k} must be a multiple of group_size {group_size} (a multiple of 8) and of packed")
    groups = k // group_size
    if scales.shape != (groups, n) or zeros.shape != (groups, n):
        raise ValueError(f"w4a16: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must be {(groups, n)}")
    if x.stride(1) != 1 or not (packed.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        raise ValueError("w4a16: x's rows and the packed weight, scales and zeros must be contiguous")
    return m, n, k


def _splits(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def w4a16_gemv(
    x: torch.Tensor,  # [1, K] bf16 / fp16 (float32 under the interpreter)
    packed: torch.Tensor,  # [N, K / 8] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    group_size: int,
    *,
    block_n: int = 16,
    block_k: int = 512,
    num_warps: int = 4,
    split_k: int = 1,
) -> torch.Tensor:  # [1, N] in x's dtype
    """x @ W^T for one row x and a 4-bit grouped weight in the `pack_int4` layout (float32 accumulation)."""
    m, n, k = _check(x, packed, scales, zeros, group_size)
    if m != 1:
        raise ValueError(f"w4a16_gemv: x has {m} rows, expected 1 (w4a16_gemm takes more)")
    gpt, wpg = _tile_shape(group_size, block_k)
    k_per_split, splits = _splits(k, block_k, split_k)
    out = torch.zeros((1, n), dtype=torch.float32, device=x.device) if splits > 1 else x.new_empty((1, n))
    _w4a16_gemv_kernel[(triton.cdiv(n, block_n), splits)](
        x,
        packed,
        scales,
        zeros,
        out,
        n,
        k,
        k_per_split,
        GROUP=group_size,
        BLOCK_N=block_n,
        GPT=gpt,
        WPG=wpg,
        ATOMIC=splits > 1,
        num_warps=num_warps,
    )
    return out.to(x.dtype) if splits > 1 else out


def w4a16_gemm(
    x: torch.Tensor,  # [M, K]
    packed: torch.Tensor,  # [N, K / 8] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    group_size: int,
    *,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
    split_k: int = 1,
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ W^T with the weight tile dequantized in registers and multiplied on the tensor cores."""
    m, n, k = _check(x, packed, scales, zeros, group_size)
    gpt, wpg = _tile_shape(group_size, block_k)
    k_per_split, splits = _splits(k, block_k, split_k)
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if splits > 1 else x.new_empty((m, n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    _w4a16_gemm_kernel[grid](
        x,
        packed,
        scales,
        zeros,
        out,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        k_per_split,
        GROUP=group_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GPT=gpt,
        WPG=wpg,
        ATOMIC=splits > 1,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out.to(x.dtype) if splits > 1 else out


def w4a16_linear(x, packed, scales, zeros, group_size: int) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] with the launch shape `benchmarks/w4a16.py` found fastest for M on an H100:
    the GEMV for one row, the split-K tensor-core kernel for a few rows, large tiles for prefill."""
    m = x.shape[0]
    n = packed.shape[0]
    k = x.shape[1]
    step = 128 if group_size >= 128 else group_size
    if m == 1:
        block_k = 512 if group_size >= 512 or 512 % group_size == 0 else step
        return w4a16_gemv(x, packed, scales, zeros, group_size, block_n=16, block_k=block_k)
    if m <= 16:
        # Enough programs to cover the SMs twice: split K when N alone gives too few tiles.
        tiles = triton.cdiv(n, 64)
        split = max(1, min(k // (4 * step), triton.cdiv(2 * multiprocessor_count(x.device), tiles)))
        return w4a16_gemm(x, packed, scales, zeros, group_size, block_m=16, block_n=64, block_k=step, split_k=split)
    if m <= 64:
        return w4a16_gemm(x, packed, scales, zeros, group_size, block_m=64, block_n=64, block_k=step)
    return w4a16_gemm(x, packed, scales, zeros, group_size, block_m=128, block_n=128, block_k=step, num_warps=8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers in [0, 16) -> [N, K / 8] int32 words, input 8j + t of a row in bits 4t .. 4t + 3 of word j."""
    n, k = q.shape
    if k % 8:
        raise ValueError(f"pack_int4: K={k} is no multiple of 8")
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * 4
    words = (q.view(n, k // 8, 8).to(torch.int64) << shifts).sum(-1)  # [N, K / 8] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
