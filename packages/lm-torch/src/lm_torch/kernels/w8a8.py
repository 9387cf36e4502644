"""W8A8 linears on CUDA (SmoothQuant checkpoints): per-token dynamic activation quantization and an int8 GEMM.

    s_x[m] = max_k |x[m, k]| / qmax (qmax 127 for int8, 448 for float8 e4m3),  x_q = round(x / s_x)
    y[m, n] = (sum_k x_q[m, k] * W_q[n, k]) * s_x[m] * s_w[n] + bias[n]
`quantize_per_token` is one program per row: a pass for the row's maximum, a pass that divides (IEEE division, so
that the integers equal torch's) and rounds half to even, as torch.round does. `int8_gemm` multiplies on the tensor
cores with int32 accumulation (exact) and applies both scales and the bias in the epilogue, writing the activation
dtype: one launch after the quantization, nothing the host waits on, so CUDA graphs capture both. The weight stays
[N, K] as the checkpoint holds it, K contiguous: the K-major operand that 8-bit tensor-core instructions want.
Float8 checkpoints use the same quantization kernel and `torch._scaled_mm` with row-wise scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, next_power_of_2


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    # A tie (v + 0.5 an integer) rounded up to an odd number goes down to the even one.
    is_tie = (r - v) == 0.5
    is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(is_tie & is_odd, r - 1.0, r)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    k,
    stride_xm,
    QMAX: tl.constexpr,
    IS_INT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, k, BLOCK):
        x = tl.load(x_ptr + row * stride_xm + start + cols, mask=start + cols < k, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.div_rn(tl.maximum(tl.max(amax, 0), 1e-7), QMAX)
    tl.store(scale_ptr + row, scale)
    for start in range(0, k, BLOCK):
        mask = start + cols < k
        x = tl.load(x_ptr + row * stride_xm + start + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.div_rn(x, tl.zeros([BLOCK], tl.float32) + scale)
        if IS_INT:
            v = _round_half_even(v)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(q_ptr + row * k + start + cols, v.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    out_ptr,
    m,
    n,
    k,
    stride_om,
    HAS_BIAS: tl.constexpr,
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for start in range(0, k, BLOCK_K):
        cols = start + ks
        k_mask = cols < k
        a = tl.load(
            a_ptr + rows_m[:, None].to(tl.int64) * k + cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0
        )  # [BM, BK] int8
        b = tl.load(
            b_ptr + rows_n[None, :].to(tl.int64) * k + cols[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0
        )  # [BK, BN] int8, K-major
        acc += tl.dot(a, b, out_dtype=tl.int32)
    a_scale = tl.load(a_scale_ptr + rows_m, mask=m_mask, other=0.0)  # [BM] float32
    b_scale = tl.load(b_scale_ptr + rows_n, mask=n_mask, other=0.0)  # [BN] float32
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows_m[:, None].to(tl.int64) * stride_om + rows_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (x_q [M, K] in `dtype` (int8 or float8_e4m3fn), s_x [M, 1] float32)."""
    check_cuda_or_interpreter(x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_per_token: x {tuple(x.shape)} must be [M, K] with contiguous rows")
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"quantize_per_token: dtype {dtype} is not int8 or float8_e4m3fn")
    m, k = x.shape
    x_q = torch.empty((m, k), dtype=dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(2048, next_power_of_2(k))
        _quantize_per_token_kernel[(m,)](
            x,
            x_q,
            scale,
            k,
            x.stride(0),
            QMAX=127.0 if dtype == torch.int8 else 448.0,
            IS_INT=dtype == torch.int8,
            BLOCK=block,
            num_warps=min(8, max(1, block // 256)),  # pyright: ignore[reportCallIssue]  # triton launch option
        )
    return x_q, scale


def int8_gemm(
    x_q: torch.Tensor,  # [M, K] int8, contiguous
    x_scale: torch.Tensor,  # [M, 1] float32
    weight: torch.Tensor,  # [N, K] int8, contiguous
    weight_scale: torch.Tensor,  # [N, 1] float32
    bias: torch.Tensor | None,  # [N] or None
    out_dtype: torch.dtype,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:  # [M, N] in out_dtype
    """(x_q @ weight^T) * x_scale * weight_scale^T + bias, int32 sums on the tensor cores."""
    check_cuda_or_interpreter(x_q, weight)
    if x_q.dtype != torch.int8 or weight.dtype != torch.int8 or x_q.dim() != 2 or weight.dim() != 2:
        raise ValueError("int8_gemm: x_q [M, K] and weight [N, K] must be int8 matrices")
    m, k = x_q.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not (x_q.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"int8_gemm: x_q {tuple(x_q.shape)} and weight {tuple(weight.shape)} must be contiguous")
    if x_scale.numel() != m or weight_scale.numel() != n:
        raise ValueError(f"int8_gemm: {x_scale.numel()} token scales for {m} rows or {weight_scale.numel()} for {n}")
    if block_m is None:
        block_m = 16 if m <= 16 else 64 if m <= 64 else 128
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_gemm_kernel[grid](
        x_q,
        weight,
        x_scale.contiguous(),
        weight_scale.contiguous(),
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]  # triton launch option
    )
    return out


def fp8_linear(
    x_q: torch.Tensor,  # [M, K] float8_e4m3fn
    x_scale: torch.Tensor,  # [M, 1] float32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [N, 1] float32
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [M, N]
    """Row-wise scaled float8 product through torch._scaled_mm (cuBLASLt; bfloat16 out, as row-wise scaling needs)."""
    out = torch._scaled_mm(  # pyright: ignore[reportPrivateImportUsage]  # not in torch's typed exports
        x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.t().contiguous(), out_dtype=torch.bfloat16
    )
    out = out.to(out_dtype)
    return out if bias is None else out + bias
