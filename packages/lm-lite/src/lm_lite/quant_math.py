"""Group-wise integer quantization of weight matrices: parameters, quantize, dequantize.

A weight W [out, in] is cut along its input dimension into groups of `group_size` columns; each (row, group) gets a
scale and an integer zero point, and W[r, c] is stored as q = clamp(round(W / scale) + zero, 0, 2^bits - 1), read back
as (q - zero) * scale. Scales are rounded to float16 before the integers are computed, because float16 is what the
checkpoint stores: the integers are then exact for the scales a loader reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """One quantized linear in plain (unpacked) form; the checkpoint writers pack it into a format's layout.

    qweight: [out, in] integers in [0, 2^bits); scales: [out, num_groups] float32 holding float16 values;
    zeros: [out, num_groups] integers; g_idx: [in] group of each input column (GPTQ with act-order permutes them),
    None for the plain c // group_size; bias: [out] or None.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def group_index(self) -> torch.Tensor:
        """[in] the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        in_features = self.qweight.shape[1]
        return torch.arange(in_features, device=self.qweight.device) // self.effective_group_size(in_features)

    def effective_group_size(self, in_features: int) -> int:
        """Columns per group for rows of `in_features` columns (-1 means the whole row)."""
        return in_features if self.group_size == -1 else self.group_size

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32: (q - zero) * scale, each column with its group's parameters."""
        out_features = self.qweight.shape[0]
        if self.g_idx is None:  # contiguous groups: broadcast over a [out, groups, group_size] view
            q = self.qweight.float().reshape(out_features, self.scales.shape[1], -1)
            return ((q - self.zeros.float()[..., None]) * self.scales.float()[..., None]).reshape(out_features, -1)
        groups = self.group_index()
        return (self.qweight.float() - self.zeros.float()[:, groups]) * self.scales.float()[:, groups]


def quant_params(
    w: torch.Tensor, bits: int, sym: bool = False, include_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of `w` [rows, k] -> ([rows], [rows]), scale float16-representable.

    Asymmetric: the [min, max] range spread over 2^bits levels (with `include_zero`, as GPTQ does, the range is widened
    to contain 0). Symmetric: scale = 2 * absmax / maxq and the zero point fixed at 2^(bits-1), GPTQ's convention.
    """
    maxq = 2**bits - 1
    w = w.float()
    if sym:
        absmax = w.abs().amax(dim=1).clamp(min=1e-5)
        scale = _fp16_scale(2 * absmax / maxq)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
        return scale, zero
    wmin, wmax = torch.aminmax(w, dim=1)
    if include_zero:
        wmax, wmin = wmax.clamp(min=0), wmin.clamp(max=0)
    scale = _fp16_scale((wmax - wmin).clamp(min=1e-5) / maxq)
    zero = (-torch.round(wmin / scale)).clamp(0, maxq)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers of `w` [rows, k] for per-row `scale`, `zero` [rows] (or [rows, k] broadcastable)."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def quantize_groups(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False, include_zero: bool = False
) -> QuantizedWeight:
    """Round-to-nearest group quantization of w [out, in] (group_size -1: one group per row)."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    if in_features % size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    grouped = w.float().reshape(out_features * (in_features // size), size)
    scale, zero = quant_params(grouped, bits, sym, include_zero)
    q = quantize_with(grouped, scale, zero, bits)
    num_groups = in_features // size
    return QuantizedWeight(
        qweight=q.reshape(out_features, in_features).to(torch.int32),
        scales=scale.reshape(out_features, num_groups),
        zeros=zero.reshape(out_features, num_groups).to(torch.int32),
        bits=bits,
        group_size=group_size,
    )


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> torch.Tensor:
    """w [..., in] quantized and dequantized in its own dtype (what AWQ's searches evaluate).

    The same arithmetic as `quantize_groups(...).dequantize()`, in torch's fused fake-quantize kernel: the searches
    call this hundreds of times per layer.
    """
    size = w.shape[-1] if group_size == -1 else group_size
    grouped = w.float().reshape(-1, size)
    scale, zero = quant_params(grouped, bits, sym)
    out = torch.fake_quantize_per_channel_affine(grouped, scale, zero.to(torch.int32), 0, 0, 2**bits - 1)
    return out.to(w.dtype).reshape(w.shape)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    # Round to what float16 stores; never to zero or below float16's smallest normal, where rounding gets coarse.
    return scale.clamp(min=6.2e-5).half().float()
