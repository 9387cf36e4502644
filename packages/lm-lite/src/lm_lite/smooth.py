"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights, then int8 (or fp8) weights.

Activations of LLMs have a few channels with values 10-100x the rest, which per-token int8 quantization cannot
represent next to the small ones. For each `ScaleGroup`, s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) divides input
channel j of the activations (folded into the producing norm or linear) and multiplies the weights' column j: with
alpha = 0.5 both sides end up with similar ranges. Weights are then quantized per output channel, symmetric: int8
(scale = absmax / 127) or float8 e4m3 (scale = absmax / 448). At run time the engine quantizes activations per token
and dynamically (`lm_torch.layers.quant.w8a8`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm_lite.families import Family
from lm_lite.model_io import linear_at
from lm_lite.scaling import GroupGeometry, apply_scale

QUANT_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
_QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}


@dataclass
class W8Weight:
    """weight [out, in] int8 or float8_e4m3fn; scale [out, 1] float32: W = weight * scale."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32: weight * scale."""
        return self.weight.float() * self.scale


@torch.no_grad()
def smooth_layer(layer: nn.Module, family: Family, config, absmax: dict[str, torch.Tensor], alpha: float) -> None:
    """Apply SmoothQuant scales to every group of one layer; `absmax` maps linear names to input absmax [in]."""
    for group in family.groups:
        geometry = GroupGeometry(group, config)
        act = geometry.to_prev(absmax[group.linears[0]].float().to(_device(layer)), reduce="max")
        weights = torch.cat([linear_at(layer, n).weight.data.float() for n in group.linears])
        w_max = geometry.to_prev(weights.abs().amax(dim=0), reduce="max")
        scales = (act.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        apply_scale(layer, geometry, scales, family.norm_offset)


def quantize_w8(linear: nn.Linear, quant_dtype: str) -> W8Weight:
    """Per-output-channel symmetric quantization of a linear's weight."""
    weight = linear.weight.data.float()
    scale = (weight.abs().amax(dim=1, keepdim=True) / _QMAX[quant_dtype]).clamp(min=1e-8)
    if quant_dtype == "int8":
        q = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
    else:
        q = (weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    bias = None if linear.bias is None else linear.bias.data.float().cpu()
    return W8Weight(weight=q.cpu(), scale=scale.cpu(), bias=bias)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
