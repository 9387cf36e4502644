"""Blocked FP8 linears on CUDA (DeepSeek-V3 / Qwen3-FP8 checkpoints): per-token-group activation quantization and a
GEMM whose scales change every K block.

    activations: s_x[m, g] = max_{k in group g} |x[m, k]| / 448,  x_q[m, k] = e4m3(x[m, k] / s_x[m, g])
    weights:     W[n, k] ~ W_q[n, k] * s_w[row_block[n], k // group]   (`layers.quant.fp8` builds row_block)
    y[m, n] = sum_g (sum_{k in g} x_q[m, k] * W_q[n, k]) * s_x[m, g] * s_w[row_block[n], g] + bias[n]

Groups are `group` (128) inputs wide, the last one partial when K is not a multiple; the weight's K blocks are the
same groups. `row_block[n]` names the scale row of output n ([N] int32), so a fused [q | k | v] weight whose parts
each start a new 128-row block grid (and end in a partial block) needs no padding.

`quantize_per_token_group` is one program per (row, group). The rounding to e4m3 is done in float32 arithmetic
(`_round_to_e4m3`: nearest, ties to even, the value then cast exactly), so the codes equal torch's
`.to(torch.float8_e4m3fn)` bit for bit on the GPU and under the interpreter alike (triton's interpreter truncates
when it casts inexact values to float8). `fp8_block_gemm` multiplies float8 tiles on the tensor cores with float32
accumulation, one BLOCK_K step at a time, and applies both scales to each step's partial sum.
"""

# Triton's type stubs describe host Python, not the @triton.jit language, so these rules are off here:
# reportArgumentType, reportOperatorIssue: `tl` loads and reductions are typed `tensor | tuple`.
# pyright: reportArgumentType=false, reportOperatorIssue=false

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter

FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
_MIN_AMAX = 1e-10  # an all-zero group gets this amax: a tiny scale, zero codes, no division by zero


@triton.jit
def _round_to_e4m3(v):
    """v float32 with |v| <= 448 -> the nearest float8 e4m3 value (ties to even), still float32."""
    biased = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
    biased = tl.maximum(biased, 121)  # below 2^-6 the e4m3 subnormals keep the spacing 2^-9
    # The spacing of 3 mantissa bits at v's exponent, 2^(e - 3), and its reciprocal: powers of two, exact products.
    step = ((biased - 3) << 23).to(tl.float32, bitcast=True)
    inv_step = ((257 - biased) << 23).to(tl.float32, bitcast=True)
    t = v * inv_step
    r = tl.floor(t + 0.5)
    is_tie = (r - t) == 0.5
    is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(is_tie & is_odd, r - 1.0, r) * step


@triton.jit
def _quantize_group_kernel(
    x_ptr, q_ptr, scale_ptr, k, groups, stride_xm, GROUP: tl.constexpr, QMAX: tl.constexpr, MIN_AMAX: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    mask = cols < k
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), 0), MIN_AMAX)
    scale = tl.div_rn(amax, QMAX)
    v = tl.div_rn(x, tl.zeros([GROUP], tl.float32) + scale)
    v = _round_to_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX))
    tl.store(q_ptr + row * k + cols, v.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * groups + group, scale)


@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr,  # [M, K] float8
    a_scale_ptr,  # [M, groups] float32
    b_ptr,  # [N, K] float8
    b_scale_ptr,  # [R, groups] float32
    b_row_ptr,  # [N] int32: scale row of each output
    bias_ptr,
    out_ptr,
    m,
    n,
    k,
    groups,
    stride_om,
    HAS_BIAS: tl.constexpr,
    GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    m_mask = rows_m < m
    n_mask = rows_n < n
    scale_rows = tl.load(b_row_ptr + rows_n, mask=n_mask, other=0).to(tl.int64)  # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + ks
        k_mask = cols < k
        a = tl.load(
            a_ptr + rows_m[:, None].to(tl.int64) * k + cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )  # [BM, BK] float8
        b = tl.load(
            b_ptr + rows_n[None, :].to(tl.int64) * k + cols[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0.0
        )  # [BK, BN] float8, K-major
        group = start // GROUP_K
        a_scale = tl.load(a_scale_ptr + rows_m.to(tl.int64) * groups + group, mask=m_mask, other=0.0)  # [BM]
        b_scale = tl.load(b_scale_ptr + scale_rows * groups + group, mask=n_mask, other=0.0)  # [BN]
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows_m[:, None].to(tl.int64) * stride_om + rows_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def quantize_per_token_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (x_q [M, K] float8_e4m3fn, s_x [M, ceil(K / group)] float32), one scale per row and group."""
    check_cuda_or_interpreter(x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_per_token_group: x {tuple(x.shape)} must be [M, K] with contiguous rows")
    if group < 16 or group & (group - 1):
        raise ValueError(f"quantize_per_token_group: group {group} must be a power of two >= 16")
    m, k = x.shape
    groups = triton.cdiv(k, group)
    x_q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m and k:
        _quantize_group_kernel[(m, groups)](
            x,
            x_q,
            scale,
            k,
            groups,
            x.stride(0),
            GROUP=group,
            QMAX=FP8_MAX,
            MIN_AMAX=_MIN_AMAX,
            num_warps=min(4, max(1, group // 64)),  # pyright: ignore[reportCallIssue]  # triton launch option
        )
    return x_q, scale


def fp8_block_gemm(
    x_q: torch.Tensor,  # [M, K] float8_e4m3fn, contiguous
    x_scale: torch.Tensor,  # [M, ceil(K / group)] float32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn, contiguous
    weight_scale: torch.Tensor,  # [R, ceil(K / group)] float32
    weight_rows: torch.Tensor,  # [N] int32: the scale row of each output
    bias: torch.Tensor | None,  # [N] or None
    out_dtype: torch.dtype,
    group: int = 128,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:  # [M, N] in out_dtype
    """y = x W^T from the codes and scales of both (module docstring), float32 sums on the tensor cores."""
    check_cuda_or_interpreter(x_q, weight)
    if x_q.dtype != torch.float8_e4m3fn or weight.dtype != torch.float8_e4m3fn or x_q.dim() != 2 or weight.dim() != 2:
        raise ValueError("fp8_block_gemm: x_q [M, K] and weight [N, K] must be float8_e4m3fn matrices")
    m, k = x_q.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not (x_q.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"fp8_block_gemm: x_q {tuple(x_q.shape)} and weight {tuple(weight.shape)} must be contiguous")
    groups = triton.cdiv(k, group)
    if x_scale.shape != (m, groups) or weight_scale.dim() != 2 or weight_scale.shape[1] != groups:
        raise ValueError(
            f"fp8_block_gemm: scales {tuple(x_scale.shape)} and {tuple(weight_scale.shape)} do not have the "
            f"{groups} groups of {group} inputs that K={k} makes"
        )
    if weight_rows.shape != (n,):
        raise ValueError(f"fp8_block_gemm: weight_rows {tuple(weight_rows.shape)} must name one scale row per output")
    block_k = group if block_k is None else block_k
    if group % block_k:
        raise ValueError(f"fp8_block_gemm: block_k {block_k} must divide the group {group}")
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if not m:
        return out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_gemm_kernel[grid](
        x_q,
        x_scale.contiguous(),
        weight,
        weight_scale.contiguous(),
        weight_rows,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        groups,
        out.stride(0),
        HAS_BIAS=bias is not None,
        GROUP_K=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]  # triton launch option
    )
    return out


def fp8_block_linear(
    x: torch.Tensor,  # [M, K] float, contiguous rows
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [R, ceil(K / group)] float32
    weight_rows: torch.Tensor,  # [N] int32
    bias: torch.Tensor | None,
    group: int = 128,
) -> torch.Tensor:  # [M, N] in x's dtype
    """The blocked FP8 linear: `quantize_per_token_group`, then `fp8_block_gemm` writing x's dtype."""
    x_q, x_scale = quantize_per_token_group(x, group)
    return fp8_block_gemm(x_q, x_scale, weight, weight_scale, weight_rows, bias, x.dtype, group)
