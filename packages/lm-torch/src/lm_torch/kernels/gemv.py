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

from lm_torch.kernels.common import check_cuda_or_interpreter, tanh


@triton.jit
def _input_chunk(
    x_ptr,
    r_ptr,
    nw_ptr,
    ks,
    k,
    inv_rms,
    offset,
    PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT: tl.constexpr,
    WEIGHT_IN_FLOAT32: tl.constexpr,
):
    """Elements `ks` of the product's input row, as float32, from what the layer before left: x itself (0), the
    RMS-normalised x (+ residual) (1, `inv_rms` given), or act(gate) * up of a [gate | up] row (2). Every rounding
    is the unfused kernels' (`rms_norm`, `activation`), so the fused product computes the same input."""
    mask = ks < k
    if PROLOGUE == 2:
        gate = tl.load(x_ptr + ks, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + k + ks, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            activated = gate / (1.0 + tl.exp(-gate))
        elif ACT == 1:
            activated = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        else:
            activated = 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
        return (activated * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    x = tl.load(x_ptr + ks, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + ks, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(x_ptr.dtype.element_ty).to(tl.float32)  # the residual stream is rounded to the dtype
    if PROLOGUE == 1:
        h = x * inv_rms
        w = tl.load(nw_ptr + ks, mask=mask, other=0.0).to(tl.float32)
        if WEIGHT_IN_FLOAT32:
            x = (h * (offset + w)).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            x = (h.to(x_ptr.dtype.element_ty).to(tl.float32) * w).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    r_ptr,  # PROLOGUE 1 with HAS_RESIDUAL: the residual added to x before the norm
    nw_ptr,  # PROLOGUE 1: the norm's weight
    r_out_ptr,  # PROLOGUE 1 with HAS_RESIDUAL: x + residual is written here (by the first program)
    n,
    k,
    stride_wn,
    k_per_split,
    eps,
    offset,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    PROLOGUE: tl.constexpr,  # 0 none, 1 (add +) RMSNorm, 2 gated activation
    HAS_RESIDUAL: tl.constexpr,
    ACT: tl.constexpr,  # PROLOGUE 2: 0 silu, 1 gelu (erf), 2 gelu (tanh)
    WEIGHT_IN_FLOAT32: tl.constexpr,  # PROLOGUE 1: Gemma's (offset + w) in float32
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    inv_rms = 0.0
    if PROLOGUE == 1:
        # The norm needs the whole row's statistics before any element: one pass over x (8 KB for a 4096-wide
        # model, from L2), then the products recompute each chunk. The first program stores the residual sum.
        squares = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, k, BLOCK_K):
            ks = start + cols
            x = _input_chunk(x_ptr, r_ptr, nw_ptr, ks, k, 0.0, offset, 0, HAS_RESIDUAL, ACT, WEIGHT_IN_FLOAT32)
            squares += x * x
            if HAS_RESIDUAL:
                first_program = (cols * 0 + pid_n + pid_k) == 0  # as a vector: a mask must be one
                tl.store(r_out_ptr + ks, x.to(r_out_ptr.dtype.element_ty), mask=(ks < k) & first_program)
        inv_rms = tl.math.rsqrt(tl.sum(squares, 0) / k + eps)
    first = pid_k * k_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(first, first + k_per_split, BLOCK_K):
        ks = start + cols
        w = tl.load(
            w_ptr + rows[:, None].to(tl.int64) * stride_wn + ks[None, :],
            mask=(rows[:, None] < n) & (ks[None, :] < k),
            other=0.0,
        )
        x = _input_chunk(x_ptr, r_ptr, nw_ptr, ks, k, inv_rms, offset, PROLOGUE, HAS_RESIDUAL, ACT, WEIGHT_IN_FLOAT32)
        acc += w.to(tl.float32) * x[None, :]
    total = tl.sum(acc, 1)  # [BLOCK_N]
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, total, mask=rows < n)
    else:
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=rows < n)


def gemv(
    x: torch.Tensor,  # [1, K]; with `act`: [1, 2 * K], [gate | up]
    weight: torch.Tensor,  # [N, K], K contiguous
    *,
    block_n: int = 16,
    block_k: int = 512,
    num_warps: int = 4,
    split_k: int = 1,
    norm_weight: torch.Tensor | None = None,  # [K]: multiply by the RMS-normalised x instead of x
    residual: torch.Tensor | None = None,  # [1, K]: with norm_weight, normalise x + residual
    eps: float = 1e-6,
    offset: float = 0.0,  # 1.0: Gemma's norm, as `rms_norm`
    act: str | None = None,  # multiply by act(gate) * up of x = [gate | up] instead of x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # [1, N] in x's dtype; with residual also x + residual
    """x @ weight^T for a single row x (float32 accumulation), optionally with the layer before folded in:
    `norm_weight` (and `residual`) computes `linear(rms_norm(x + residual))` and returns it with x + residual, as
    `kernels.rms_norm` and a product would; `act` computes `linear(gated_activation(x, act))`. Folding saves the
    launch of the small kernel and its trip through memory (batch-1 decode: 96 of a step's ~330 launches)."""
    check_cuda_or_interpreter(x, weight)
    n, k = weight.shape if weight.dim() == 2 else (0, -1)
    width = 2 * k if act is not None else k
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [1, K] and [N, K]")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("gemv: K must be the contiguous dimension of x and weight")
    if act is not None and norm_weight is not None:
        raise ValueError("gemv: fold either a norm or an activation, not both")
    if residual is not None and (norm_weight is None or residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError("gemv: residual needs norm_weight and the shape of x")
    if norm_weight is not None and (norm_weight.shape != (k,) or norm_weight.stride(0) != 1):
        raise ValueError(f"gemv: norm_weight {tuple(norm_weight.shape)} does not match K = {k}")
    act_code = 0
    if act is not None:
        from lm_torch.kernels.activation import ACTIVATION_CODES

        if act not in ACTIVATION_CODES:
            raise ValueError(f"gemv: activation {act!r} is not supported")
        act_code = ACTIVATION_CODES[act]
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    out = torch.zeros((1, n), dtype=torch.float32, device=x.device) if splits > 1 else x.new_empty((1, n))
    residual_out = torch.empty_like(x) if residual is not None else x
    _gemv_kernel[(triton.cdiv(n, block_n), splits)](
        x,
        weight,
        out,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else x,
        residual_out,
        n,
        k,
        weight.stride(0),
        k_per_split,
        eps,
        offset,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ATOMIC=splits > 1,
        PROLOGUE=1 if norm_weight is not None else (2 if act is not None else 0),
        HAS_RESIDUAL=residual is not None,
        ACT=act_code,
        WEIGHT_IN_FLOAT32=offset != 0.0,
        num_warps=num_warps,
    )
    out = out.to(x.dtype) if splits > 1 else out
    return (out, residual_out) if residual is not None else out
