"""Matrix-vector product y = x @ W^T for one input row: the linear layers of a batch-1 decode step.

At batch 1 a linear layer reads its whole weight to produce one row, so the time is the weight's bytes over memory
bandwidth. One program takes `block_n` output features and streams their rows of W (contiguous along K, so loads are
16 bytes wide) against x, accumulating products elementwise in float32 and reducing once at the end; `split_k`
programs share each feature's K range and add their partial sums atomically into a float32 buffer.

The default launch (16 features x 512 of K per step, 4 warps, no split) is the fastest shape `benchmarks/gemv.py`
found for Llama-3-8B's projections; `layers.cuda_linear.SmallBatchLinearMethod` uses it for one-row inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, pdl_enabled, pdl_trigger, pdl_wait


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    n,
    k,
    stride_wn,
    k_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch: the first tile of W loads before the wait
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    first = pid_k * k_per_split
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    # W is never written: its first tile may load while the kernel before this one still runs. x (its output) and
    # everything else only after that kernel has finished.
    ks = first + cols
    w = tl.load(w_rows + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < k), other=0.0)
    pdl_wait(PDL)
    pdl_trigger(PDL)
    x = tl.load(x_ptr + ks, mask=ks < k, other=0.0)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for start in range(first + BLOCK_K, first + k_per_split, BLOCK_K):
        ks = start + cols
        w = tl.load(w_rows + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < k), other=0.0)
        x = tl.load(x_ptr + ks, mask=ks < k, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    total = tl.sum(acc, 1)  # [BLOCK_N]
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, total, mask=rows < n)
    else:
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=rows < n)


def gemv(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [N, K], K contiguous
    *,
    block_n: int = 16,
    block_k: int = 512,
    num_warps: int = 4,
    split_k: int = 1,
    allow_pdl: bool = True,  # False: never programmatic dependent launch (`KernelConfig.pdl`)
) -> torch.Tensor:  # [1, N] in x's dtype
    """x @ weight^T for a single row x (float32 accumulation)."""
    check_cuda_or_interpreter(x, weight)
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [1, K] and [N, K]")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("gemv: K must be the contiguous dimension of x and weight")
    n, k = weight.shape
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    out = torch.zeros((1, n), dtype=torch.float32, device=x.device) if splits > 1 else x.new_empty((1, n))
    # With split-K the kernel adds into the zeroed buffer: the zeroing launch comes between (no early start).
    pdl = pdl_enabled(x.device, allow_pdl) and splits == 1
    _gemv_kernel[(triton.cdiv(n, block_n), splits)](
        x,
        weight,
        out,
        n,
        k,
        weight.stride(0),
        k_per_split,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ATOMIC=splits > 1,
        PDL=pdl,
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        **({"launch_pdl": True} if pdl else {}),
    )
    return out.to(x.dtype) if splits > 1 else out


@triton.jit
def _skinny_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    m,
    n,
    k,
    stride_xm,
    stride_wn,
    stride_om,
    k_per_split,
    BLOCK_M: tl.constexpr,  # the rows, padded to a power of two >= 16 (a dot's smallest operand)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,  # N a multiple of BLOCK_N and K of BLOCK_K: no masks on W
    ATOMIC: tl.constexpr,
    PDL: tl.constexpr,
):
    # W is the dot's first operand ([BLOCK_N, BLOCK_K] from memory, the features along the MMA's M) and the few rows
    # of x its second: the tensor cores take a tile of 64+ features, so padding x's rows costs no extra weight reads.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    features = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    first = pid_k * k_per_split
    w_rows = w_ptr + features[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + rows[None, :] * stride_xm
    ks = first + cols
    if EVEN:
        w = tl.load(w_rows + ks[None, :])
    else:
        w = tl.load(w_rows + ks[None, :], mask=(features[:, None] < n) & (ks[None, :] < k), other=0.0)
    pdl_wait(PDL)  # W is never written, so its first tile loads before the kernel before this one has finished
    pdl_trigger(PDL)
    x_t = tl.load(x_rows + ks[:, None], mask=(rows[None, :] < m) & (ks[:, None] < k), other=0.0)  # [BLOCK_K, BLOCK_M]
    acc = tl.dot(w, x_t)  # [BLOCK_N, BLOCK_M] float32
    for start in range(first + BLOCK_K, first + k_per_split, BLOCK_K):
        ks = start + cols
        if EVEN:
            w = tl.load(w_rows + ks[None, :])
        else:
            w = tl.load(w_rows + ks[None, :], mask=(features[:, None] < n) & (ks[None, :] < k), other=0.0)
        x_t = tl.load(x_rows + ks[:, None], mask=(rows[None, :] < m) & (ks[:, None] < k), other=0.0)
        acc = tl.dot(w, x_t, acc)
    dst = out_ptr + rows[None, :] * stride_om + features[:, None]
    mask = (rows[None, :] < m) & (features[:, None] < n)
    if ATOMIC:
        tl.atomic_add(dst, acc, mask=mask)
    else:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


def check_rows_and_weight(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """The operands of a few-row product x @ W^T (`skinny_gemm`, `gemm.tiled_gemm`): [M >= 1, K] and [N, K], K
    contiguous in both, on CUDA or under the interpreter; a ValueError naming the kernel otherwise."""
    check_cuda_or_interpreter(x, weight)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or x.shape[0] < 1:
        raise ValueError(f"{name}: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [M, K] and [N, K]")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"{name}: K must be the contiguous dimension of x and weight")


def skinny_gemm(
    x: torch.Tensor,  # [M, K], M small (a decode step's rows)
    weight: torch.Tensor,  # [N, K], K contiguous
    *,
    block_n: int = 64,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
    split_k: int = 1,
    allow_pdl: bool = True,  # False: never programmatic dependent launch (`KernelConfig.pdl`)
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ weight^T for a few rows on the tensor cores, streaming W once (float32 accumulation)."""
    check_rows_and_weight("skinny_gemm", x, weight)
    m, k = x.shape
    n = weight.shape[0]
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    even = n % block_n == 0 and k % k_per_split == 0
    # With split-K the programs add into a zeroed float32 buffer.
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if splits > 1 else x.new_empty((m, n))
    pdl = pdl_enabled(x.device, allow_pdl) and splits == 1
    _skinny_kernel[(triton.cdiv(n, block_n), splits)](
        x,
        weight,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        k_per_split,
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN=even,
        ATOMIC=splits > 1,
        PDL=pdl,
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]  # triton launch option
        **({"launch_pdl": True} if pdl else {}),
    )
    return out.to(x.dtype) if splits > 1 else out
