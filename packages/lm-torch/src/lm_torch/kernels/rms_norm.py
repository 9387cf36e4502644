"""RMSNorm fused with the residual add before it: one read of x and the residual, one write of each result.

The rounding follows `lm_torch.layers.norm.RMSNorm` step by step, so the kernel can stand in for it: the sum is
rounded to the activation dtype (it is the residual stream the next layer adds to), the statistics are float32,
Llama rounds the normalised value before the weight, and Gemma (weight stored as w - 1, `offset=1`) scales in
float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, next_power_of_2, pdl_enabled, pdl_trigger, pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    offset,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    WEIGHT_IN_FLOAT32: tl.constexpr,  # Gemma-style: (1 + w) multiplies the float32 value
    PDL: tl.constexpr,  # launched with programmatic dependent launch; lets the next kernel (a GEMV) start early
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    pdl_trigger(PDL)  # the next GEMV may start loading its weights while this runs
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        total = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, total, mask=mask)
        x = total.to(tl.float32)  # the norm sees the rounded sum, as the unfused layer does
    variance = tl.sum(x * x, 0) / hidden
    h = x * tl.math.rsqrt(variance + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # Gemma scales the float32 value by (offset + w); Llama rounds it to the activation dtype first.
    y = h * (offset + w) if WEIGHT_IN_FLOAT32 else h.to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [..., hidden], same shape as x
    offset: float = 0.0,
    *,
    allow_pdl: bool = True,  # False: never programmatic dependent launch (`KernelConfig.pdl`)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual), x + residual); without `residual`, (norm(x), None). New tensors, inputs untouched.

    `offset` 0 is Llama's y = round(x / rms(x)) * w; `offset` 1 is Gemma's y = x / rms(x) * (1 + w) in float32.
    """
    check_cuda_or_interpreter(x, weight)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match hidden size {hidden}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    x2 = x.reshape(-1, hidden)
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    if x2.stride(-1) != 1 or r2.stride(-1) != 1 or weight.stride(0) != 1:
        x2, r2, weight = x2.contiguous(), r2.contiguous(), weight.contiguous()
    out = torch.empty_like(x2)
    residual_out = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0]:
        block = next_power_of_2(hidden)
        pdl = pdl_enabled(x2.device, allow_pdl)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            residual_out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            residual_out.stride(0),
            hidden,
            eps,
            offset,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            WEIGHT_IN_FLOAT32=offset != 0.0,
            PDL=pdl,
            num_warps=min(16, max(1, block // 512)),  # pyright: ignore[reportCallIssue]  # triton launch option
            **({"launch_pdl": True} if pdl else {}),
        )
    out = out.view(x.shape)
    return out, (residual_out.view(x.shape) if residual is not None else None)
