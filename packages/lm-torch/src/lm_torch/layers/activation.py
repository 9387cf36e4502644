"""Gated activations on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def gated_activation(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, for gate_up: [..., 2 * intermediate]."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up
