"""Gated activations on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm_torch.kernels import runs_triton

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def gated_activation(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, for gate_up: [..., 2 * intermediate]; one Triton kernel on CUDA."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if runs_triton(gate_up):
        from lm_torch.kernels.activation import gated_activation as fused

        return fused(gate_up, act)
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


def gated_projection(linear, x: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up of a fused [gate | up] linear layer applied to x. A quantized layer whose kernel can fold the
    activation into its last step (`forward_gated`, the one-row W4A16 GEMV) does so: one launch instead of two."""
    fused = getattr(linear, "forward_gated", None)
    if fused is not None:
        out = fused(x, act)
        if out is not None:
            return out
    return gated_activation(linear(x), act)
