"""Gated activations on a fused [gate | up] projection, their path (torch or Triton) chosen at construction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.layers.linear import LinearBase

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def gated_activation(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up in plain torch, for gate_up: [..., 2 * intermediate] -> [..., intermediate]."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


class GatedActivation(nn.Module):
    """act(gate) * up: one Triton kernel on CUDA with triton, plain torch elsewhere (bound in `__init__`)."""

    def __init__(self, act: str, ctx: BuildContext | None = None) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        ctx = context_or_current(ctx)
        self.act = act
        self.allow_pdl = ctx.kernels.pdl
        self._forward = self.forward_triton if ctx.runs_triton else self.forward_native

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [..., 2 * intermediate] -> [..., intermediate]."""
        return self._forward(gate_up)

    def forward_native(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The torch computation."""
        return gated_activation(gate_up, self.act)

    def forward_triton(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The Triton kernel (`kernels.activation`)."""
        from lm_torch.kernels.activation import gated_activation as fused

        return fused(gate_up, self.act, allow_pdl=self.allow_pdl)

    def extra_repr(self) -> str:
        """The activation's name."""
        return self.act


def gated_projection(linear: LinearBase, x: torch.Tensor, activation: GatedActivation) -> torch.Tensor:
    """act(gate) * up of a fused [gate | up] linear layer applied to x: in one launch where the layer's kernel can
    fold the activation into its last step for this input (`LinearBase.forward_gated`), else the product and then
    `activation`."""
    fused = linear.forward_gated(x, activation.act)
    if fused is not None:
        return fused
    return activation(linear(x))
