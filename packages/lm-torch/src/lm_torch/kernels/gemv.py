"""Matrix-vector product y = x @ W^T for one input row: the linear layers of a batch-1 decode step.

At batch 1 a linear layer reads its whole weight to produce one row, so the time is the weight's bytes over memory
bandwidth. One program takes `block_n` output features and streams their rows of W (contiguous along K, so loads are
16 bytes wide) against x, accumulating products elementwise in float32 and reducing once at the end; `split_k`
programs share each feature's K range and add their partial sums atomically into a float32 buffer.

On an H100 with Llama-3-8B's shapes (`benchmarks/gemv.py`) 16 features x 512 of K per step, 4 warps and no split
were the fastest shape tried for every projection, 4-15% faster than cuBLASLt (which picks split-K kernels plus a
reduction for the square and the tall-K shapes): `layers.cuda_linear.SingleRowLinear` uses it for one-row inputs.
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
    pdl = pdl_enabled(x.device) and splits == 1
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
        num_warps=num_warps,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out.to(x.dtype) if splits > 1 else out
