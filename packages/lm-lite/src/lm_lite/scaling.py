"""Moving per-channel scales between a producing op and the linears it feeds (AWQ and SmoothQuant share this).

For a `ScaleGroup`, a scale vector `s` lives in the producer's output space ("prev space"); the linears' input
channels see it expanded ("input space"): the same vector, except across GQA attention, where value channel
(h, d) feeds the input channels (h * q_per_kv + j, d) of o_proj for every j.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lm_lite.families import ScaleGroup
from lm_lite.model_io import config_field, linear_at, tensor_attr


class GroupGeometry:
    """How one group's prev space maps onto its linears' input space, for one layer's config."""

    def __init__(self, group: ScaleGroup, config: Any) -> None:
        self.group = group
        heads: int = config_field(config, "num_attention_heads")
        self.kv_heads: int = config_field(config, "num_key_value_heads") or heads
        self.q_per_kv = heads // self.kv_heads
        self.head_dim: int = config_field(config, "head_dim") or config_field(config, "hidden_size") // heads
        self.q_size, self.kv_size = heads * self.head_dim, self.kv_heads * self.head_dim
        self.intermediate: int = config_field(config, "intermediate_size")

    @property
    def grouped(self) -> bool:
        """Whether each prev channel (v_proj's, per KV head) feeds several input columns (o_proj's, per query head)."""
        return self.group.gqa and self.q_per_kv > 1

    def to_prev(self, stat: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Input-space statistic [in] -> prev space, combining the query heads that share a KV head."""
        if not self.grouped:
            return stat
        grouped = stat.reshape(self.kv_heads, self.q_per_kv, self.head_dim)
        combined = grouped.mean(dim=1) if reduce == "mean" else grouped.amax(dim=1)
        return combined.reshape(-1)

    def to_input(self, scales: torch.Tensor) -> torch.Tensor:
        """Prev-space scales -> input space."""
        if not self.grouped:
            return scales
        grouped = scales.reshape(self.kv_heads, 1, self.head_dim).expand(self.kv_heads, self.q_per_kv, self.head_dim)
        return grouped.reshape(-1)

    def prev_rows(self) -> slice | None:
        """The rows of a packed producer that feed the group (None: all of them)."""
        if self.group.prev_rows == "v":
            return slice(self.q_size + self.kv_size, self.q_size + 2 * self.kv_size)
        if self.group.prev_rows == "up":
            return slice(self.intermediate, 2 * self.intermediate)
        return None


@torch.no_grad()
def apply_scale(layer: nn.Module, geometry: GroupGeometry, scales: torch.Tensor, norm_offset: float) -> None:
    """Divide the producer's output by `scales` (prev space) and multiply the linears' input columns by them.

    In float arithmetic the layer computes the same function afterwards; only the split between ops changes.
    """
    group = geometry.group
    prev = layer.get_submodule(group.prev)
    scales = scales.float()
    if isinstance(prev, nn.Linear):
        rows = geometry.prev_rows() or slice(None)
        weight = prev.weight.data
        weight[rows] = (weight[rows].float() / scales[:, None]).to(weight.dtype)
        if prev.bias is not None:
            prev.bias.data[rows] = (prev.bias.data[rows].float() / scales).to(prev.bias.dtype)
    else:  # an RMSNorm: y = x / rms(x) * (offset + w)
        weight = tensor_attr(prev, "weight").data
        weight.copy_(((norm_offset + weight.float()) / scales - norm_offset).to(weight.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data.copy_((bias.data.float() / scales).to(bias.dtype))
    columns = geometry.to_input(scales)
    for name in group.linears:
        linear = linear_at(layer, name)
        linear.weight.data = (linear.weight.data.float() * columns[None, :]).to(linear.weight.dtype)
