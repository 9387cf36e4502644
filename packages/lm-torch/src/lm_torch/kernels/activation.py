"""Gated activations, act(gate) * up, on a fused [gate | up] projection: one read of each half, one write."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, pdl_enabled, pdl_trigger, pdl_wait, tanh

# Names as `lm_torch.layers.activation.ACTIVATIONS` (HF configs' `hidden_act`) -> the kernel's ACT code.
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2}


@triton.jit
def _gated_activation_kernel(
    x_ptr,
    out_ptr,
    intermediate,
    stride_x,
    stride_o,
    ACT: tl.constexpr,  # 0 silu, 1 gelu (erf), 2 gelu (tanh approximation)
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch; lets the next kernel (a GEMV) start early
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    pdl_trigger(PDL)
    pdl_wait(PDL)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (activate(gate, ACT) * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def activate(gate, ACT: tl.constexpr):
    """act(gate) in float32 for an ACT code of `ACTIVATION_CODES` (also the W4A16 GEMV's gated epilogue)."""
    if ACT == 0:
        activated = gate / (1.0 + tl.exp(-gate))
    elif ACT == 1:
        activated = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi) * (x + 0.044715 x^3)
        activated = 0.5 * gate * (1.0 + tanh(inner))
    return activated


def gated_activation(gate_up: torch.Tensor, act: str, *, allow_pdl: bool = True) -> torch.Tensor:
    """act(gate) * up for gate_up: [..., 2 * intermediate] (gate first); returns [..., intermediate]."""
    if act not in ACTIVATION_CODES:
        raise ValueError(f"activation {act!r} is not supported (supported: {', '.join(ACTIVATION_CODES)})")
    check_cuda_or_interpreter(gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gated_activation: last dimension {gate_up.shape[-1]} is not [gate | up]")
    intermediate = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, gate_up.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((x.shape[0], intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0] and intermediate:
        block = min(1024, triton.next_power_of_2(intermediate))
        pdl = pdl_enabled(x.device, allow_pdl)
        _gated_activation_kernel[(x.shape[0], triton.cdiv(intermediate, block))](
            x,
            out,
            intermediate,
            x.stride(0),
            out.stride(0),
            ACT=ACTIVATION_CODES[act],
            BLOCK=block,
            PDL=pdl,
            num_warps=4,  # pyright: ignore[reportCallIssue]  # triton launch option
            **({"launch_pdl": True} if pdl else {}),
        )
    return out.view(*gate_up.shape[:-1], intermediate)
