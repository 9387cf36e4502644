"""AWQ (activation-aware weight quantization, Lin et al. 2023) of one decoder layer.

For each `ScaleGroup`, a per-input-channel scale s is searched that protects the channels carrying large
activations: the linears become Q(W * s) / s. The candidates are s = x_mean^r / w_mean^(1-r) for r on a grid
(x_mean: mean |activation| per channel; w_mean: mean of |W| relative to its group's max), normalised so that
sqrt(max(s) * min(s)) = 1; the one whose quantized group output (the attention block, the MLP, or the single
linear) is closest in mean squared error to the float output wins, and is folded into the producing op. Then each
linear's weights are clipped per (row, group) to the shrink of their max that minimises the error of that group's
partial products over a sample of tokens, and quantized with asymmetric round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm_lite.families import Family, ScaleGroup
from lm_lite.model_io import linear_at
from lm_lite.quant_math import QuantizedWeight, fake_quantize, quantize_groups
from lm_lite.scaling import GroupGeometry, apply_scale
from lm_lite.walker import LayerWalker

N_GRID = 20
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512
# The scale search runs its group forwards over this many tokens at a time at least (fewer, larger calls; the
# memory is that of the activations of one group, which the search holds anyway).
SEARCH_TOKENS = 4096


@dataclass(frozen=True)
class AWQSettings:
    """AWQ options: weight bits, group size (-1: one group per row), and whether to search scales and clip."""

    bits: int
    group_size: int
    search_scale: bool = True
    clip: bool = True


@torch.no_grad()
def quantize_layer(
    walker: LayerWalker, index: int, family: Family, config, settings: AWQSettings
) -> dict[str, QuantizedWeight]:
    """Scale, clip and quantize layer `index`; its weights become their dequantized values, and the walker moves
    on to the next layer's inputs (computed with the quantized layer)."""
    with walker.layer_on_device(index) as layer:
        group_inputs = _capture_group_inputs(walker, index, layer, family)
        input_scales: dict[str, torch.Tensor] = {}
        for group in family.groups:
            geometry = GroupGeometry(group, config)
            x = group_inputs[group.linears[0]]  # [num_samples, seqlen, in]
            scales = _search_scale(walker, index, layer, geometry, x, settings)
            apply_scale(layer, geometry, scales, family.norm_offset)
            for name in group.linears:
                input_scales[name] = geometry.to_input(scales)
        quantized = {}
        for name in family.linears:
            linear = linear_at(layer, name)
            if settings.clip and name not in family.no_clip:
                group = next(g for g in family.groups if name in g.linears)
                x = group_inputs[group.linears[0]].reshape(-1, linear.in_features)
                _clip(linear, x / input_scales[name].to(x.dtype), settings)
            q = quantize_groups(linear.weight.data, settings.bits, settings.group_size)
            q.bias = None if linear.bias is None else linear.bias.data.float().cpu()
            linear.weight.data = q.dequantize().to(linear.weight.dtype)
            quantized[name] = _to_cpu(q)
        del group_inputs
        walker.advance(index)
    return quantized


def _capture_group_inputs(walker: LayerWalker, index: int, layer: nn.Module, family: Family):
    """Input of every group's first linear, all samples: {name: [num_samples, seqlen, in]} on the device."""
    firsts = {group.linears[0]: layer.get_submodule(group.linears[0]) for group in family.groups}
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in firsts}

    def hook(_module, args, name):
        chunks[name].append(args[0].detach())

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in firsts.items()]
    try:
        walker.forward(index)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def _group_forward(layer: nn.Module, group: ScaleGroup, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    if group.inspect is None:
        return layer.get_submodule(group.linears[0])(x)
    module = layer.get_submodule(group.inspect)
    if group.inspect.endswith("attn"):
        return module(hidden_states=x, **kwargs)[0]
    return module(x)


def _search_scale(
    walker: LayerWalker, index: int, layer: nn.Module, geometry: GroupGeometry, x: torch.Tensor, settings
) -> torch.Tensor:
    """The best prev-space scales of one group (see the module docstring)."""
    group = geometry.group
    linears = [linear_at(layer, name) for name in group.linears]
    x_mean = geometry.to_prev(x.abs().float().reshape(-1, x.shape[-1]).mean(dim=0))
    w_mean = geometry.to_prev(_relative_weight_mean(linears, settings.group_size))
    ratios = [r / N_GRID for r in range(N_GRID)] if settings.search_scale else [0.5]
    if len(ratios) == 1:
        return _candidate(x_mean, w_mean, ratios[0])
    kwargs = walker.layer_kwargs[index]
    batch = max(walker.batch_size, SEARCH_TOKENS // x.shape[1])
    reference = [_group_forward(layer, group, x[s : s + batch], kwargs) for s in range(0, x.shape[0], batch)]
    originals = [linear.weight.data.clone() for linear in linears]
    best, best_loss = _candidate(x_mean, w_mean, ratios[0]), float("inf")
    for ratio in ratios:
        scales = _candidate(x_mean, w_mean, ratio)
        columns = geometry.to_input(scales).to(x.device)
        for linear, weight in zip(linears, originals, strict=True):
            scaled = weight.float() * columns[None, :]
            linear.weight.data = (fake_quantize(scaled, settings.bits, settings.group_size) / columns).to(weight.dtype)
        loss = 0.0
        for ref, start in zip(reference, range(0, x.shape[0], batch), strict=True):
            out = _group_forward(layer, group, x[start : start + batch], kwargs)
            loss += (out.float() - ref.float()).pow(2).sum().item()
        if loss < best_loss:
            best, best_loss = scales, loss
    for linear, weight in zip(linears, originals, strict=True):
        linear.weight.data = weight
    return best


def _candidate(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    return torch.nan_to_num(scales, nan=1.0, posinf=1.0)


def _relative_weight_mean(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| / max |W| of its quantization group: [in]."""
    weight = torch.cat([linear.weight.data.float() for linear in linears])
    size = weight.shape[1] if group_size == -1 else group_size
    grouped = weight.abs().reshape(-1, size)
    relative = grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)
    return relative.reshape(weight.shape).mean(dim=0)


def _clip(linear: nn.Linear, x: torch.Tensor, settings: AWQSettings) -> None:
    """Clip linear's weights per (row, group) to the max that best preserves the group's partial products."""
    weight = linear.weight.data.float()
    out_features, in_features = weight.shape
    size = in_features if settings.group_size == -1 else settings.group_size
    step = max(1, x.shape[0] // CLIP_TOKENS)
    x = x[::step].float().reshape(-1, in_features // size, size)  # [tokens, groups, size]
    # Rows in chunks keep the [rows, tokens, groups] products within a few hundred MB.
    chunk = max(1, (64 << 20) // max(1, x.shape[0] * x.shape[1]))
    best_max = []
    for start in range(0, out_features, chunk):
        w = weight[start : start + chunk].reshape(-1, in_features // size, size)  # [rows, groups, size]
        reference = torch.einsum("tgk,rgk->rtg", x, w)
        original_max = w.abs().amax(dim=-1, keepdim=True)  # [rows, groups, 1]
        best = original_max.clone()
        best_err = torch.full_like(original_max, float("inf"))
        for step_index in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            max_val = original_max * (1 - step_index / CLIP_GRID)
            clipped = torch.clamp(w, -max_val, max_val)
            q = fake_quantize(clipped.reshape(-1, size), settings.bits, size).reshape(w.shape)
            err = (torch.einsum("tgk,rgk->rtg", x, q) - reference).pow(2).mean(dim=1)[..., None]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, max_val, best)
        best_max.append(best)
        del reference
    max_val = torch.cat(best_max)  # [out, groups, 1]
    clipped = torch.clamp(weight.reshape(out_features, -1, size), -max_val, max_val).reshape(weight.shape)
    linear.weight.data = clipped.to(linear.weight.dtype)


def _to_cpu(q: QuantizedWeight) -> QuantizedWeight:
    q.qweight, q.scales, q.zeros = q.qweight.cpu(), q.scales.cpu(), q.zeros.cpu()
    return q
