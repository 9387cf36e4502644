"""GPTQ (Frantar et al. 2022) of one decoder layer.

Each linear is quantized one input column at a time; the rounding error of a column is spread over the columns not
yet quantized, weighted by the inverse Hessian of the layer's reconstruction error, H = 2/n sum x x^T over the
calibration inputs x. Columns go in blocks of 128 whose updates to the later columns are applied once per block
("lazy batch" updates). Options: act-order (columns by decreasing diag(H), so the inputs with the most energy are
fixed first; groups then follow that order and `g_idx` records each column's group), damping (a fraction of
mean(diag(H)) added to the diagonal so the Cholesky factorisation exists), symmetric or asymmetric grids.
Groups of a layer are quantized in execution order, each with Hessians from inputs computed by the already-quantized
groups before it ("true sequential").
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass

import torch
from torch import nn

from lm_lite.families import Family
from lm_lite.model_io import linear_at
from lm_lite.quant_math import QuantizedWeight, quant_params, quantize_with
from lm_lite.walker import LayerWalker

BLOCK_SIZE = 128


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQ options: weight bits, group size (-1: one group per row), symmetric grid, act-order and Hessian damping."""

    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.01


class _Stop(Exception):
    pass


@torch.no_grad()
def quantize_layer(
    walker: LayerWalker, index: int, family: Family, settings: GPTQSettings
) -> dict[str, QuantizedWeight]:
    """GPTQ every linear of layer `index` (weights become their dequantized values); move the walker on."""
    quantized: dict[str, QuantizedWeight] = {}
    with walker.layer_on_device(index) as layer:
        for group in family.groups:
            hessian = _hessian(walker, index, linear_at(layer, group.linears[0]))
            # The linears of a group read the same input and GPTQ treats rows independently, so they are quantized
            # as one matrix: one column loop, and with act-order one column order, so their g_idx agree and loaders
            # can fuse them (q/k/v, gate/up).
            linears = [linear_at(layer, name) for name in group.linears]
            stacked = gptq(torch.cat([linear.weight.data for linear in linears]), hessian, settings)
            del hessian
            start = 0
            for name, linear in zip(group.linears, linears, strict=True):
                rows = slice(start, start + linear.out_features)
                start += linear.out_features
                q = QuantizedWeight(
                    qweight=stacked.qweight[rows],
                    scales=stacked.scales[rows],
                    zeros=stacked.zeros[rows],
                    bits=stacked.bits,
                    group_size=stacked.group_size,
                    g_idx=stacked.g_idx,
                    bias=None if linear.bias is None else linear.bias.data.float().cpu(),
                )
                linear.weight.data = q.dequantize().to(device=linear.weight.device, dtype=linear.weight.dtype)
                quantized[name] = q
        walker.advance(index)
    return quantized


def _hessian(walker: LayerWalker, index: int, linear: nn.Linear) -> torch.Tensor:
    """2/n sum x x^T [in, in] float32 over every calibration token reaching `linear`; stops the layer there."""
    state = {"h": torch.zeros(linear.in_features, linear.in_features, device=walker.device), "n": 0}

    def hook(_module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        n, m = state["n"], x.shape[0]
        state["h"].mul_(n / (n + m))
        x = x * (2.0 / (n + m)) ** 0.5
        state["h"].addmm_(x.t(), x)
        state["n"] = n + m
        raise _Stop  # nothing after this linear is needed

    handle = linear.register_forward_pre_hook(hook)
    layer = walker.layers[index]
    try:
        for hidden, kwargs in walker.batches(index):
            with suppress(_Stop):
                layer(hidden, **kwargs)
    finally:
        handle.remove()
    return state["h"]


def gptq(weight: torch.Tensor, hessian: torch.Tensor, settings: GPTQSettings) -> QuantizedWeight:
    """Quantize weight [out, in] against hessian [in, in]; the result lives on the CPU."""
    w = weight.float().clone()
    h = hessian.clone()
    out_features, in_features = w.shape
    size = in_features if settings.group_size == -1 else settings.group_size
    dead = torch.diag(h) == 0  # inputs that are always zero: any value works, choose 0
    h[dead, dead] = 1
    w[:, dead] = 0
    # Stable: equal diagonals (dead inputs, repeated features) keep their order on every device.
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if settings.desc_act else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h_inv = _inverse_cholesky(h, settings.damp_percent)

    q = torch.zeros_like(w)
    num_groups = in_features // size
    scales = torch.zeros(out_features, num_groups, device=w.device)
    zeros = torch.zeros(out_features, num_groups, device=w.device)
    for start in range(0, in_features, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, in_features)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % size == 0:
                # The group's grid comes from its columns as they are now, after the updates so far.
                current = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :size]
                scale, zero = quant_params(current, settings.bits, settings.sym, include_zero=True)
                if not settings.sym:
                    zero = zero.clamp(min=1)  # the GPTQ v1 layout cannot store 0 (see packing.pack_gptq)
                scales[:, column // size], zeros[:, column // size] = scale, zero
            scale, zero = scales[:, column // size], zeros[:, column // size]
            values = quantize_with(block[:, i : i + 1], scale, zero, settings.bits)[:, 0]
            q[:, column] = values
            err = (block[:, i] - (values - zero) * scale) / h_block[i, i]
            block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ h_inv[start:end, end:]

    g_idx = torch.arange(in_features, device=w.device) // size
    if perm is not None:
        inverse = torch.argsort(perm)
        q, g_idx = q[:, inverse], g_idx[inverse]
    return QuantizedWeight(
        qweight=q.to(torch.int32).cpu(),
        scales=scales.cpu(),
        zeros=zeros.to(torch.int32).cpu(),
        bits=settings.bits,
        group_size=settings.group_size,
        g_idx=g_idx.to(torch.int32).cpu() if perm is not None else None,
    )


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; more damping if H is not positive definite in float32."""
    diagonal = torch.arange(h.shape[0], device=h.device)
    damp = damp_percent * torch.mean(torch.diag(h))
    for _ in range(6):
        damped = h.clone()
        damped[diagonal, diagonal] += damp
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            return torch.linalg.cholesky(inverse, upper=True)
        # Public (torch.linalg's documentation lists it) though torch's stubs leave it out of `__all__`.
        except torch.linalg.LinAlgError:  # pyright: ignore[reportPrivateImportUsage]
            damp *= 10
    raise ValueError("the calibration Hessian is not positive definite even after heavy damping")
