"""The small-batch `LinearMethod` of half-precision linears on CUDA: Triton kernels for the few-row inputs of decode
steps.

A small-batch step reads every weight once for a few rows, so its linear layers are bound by memory bandwidth. One
row goes to `kernels.gemv.gemv`; from 2 to `SMALL_BATCH_MAX_ROWS` rows the kernel the GEMM tuning table names for
the shape runs (`kernels.gemm.gemm_launch`: the skinny or the tiled Triton GEMM, or cuBLAS on the transposed
problem), where it has one. Everything else (more rows, shapes the table leaves to cuBLAS, other dtypes) goes to
`torch.nn.functional.linear`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lm_torch.layers.context import HALF_TYPES
from lm_torch.layers.linear import LinearMethod

if TYPE_CHECKING:
    from lm_torch.kernels.tuning import TuningTables
    from lm_torch.layers.linear import Linear

# The most rows the Triton kernels take (a decode graph's largest bucket by default); cuBLAS above.
SMALL_BATCH_MAX_ROWS = 256


class SmallBatchLinearMethod(LinearMethod):
    """One-row half-precision CUDA inputs through `kernels.gemv.gemv`, inputs of up to `SMALL_BATCH_MAX_ROWS` rows
    through the GEMM the tuning table names for the shape, if any; F.linear otherwise."""

    def __init__(self, tuning: TuningTables | None = None, allow_pdl: bool = True) -> None:
        from lm_torch.kernels.gemm import gemm_launch
        from lm_torch.kernels.gemv import gemv

        self.tuning = tuning
        self.allow_pdl = allow_pdl
        self._gemm_launch = gemm_launch
        self._gemv = gemv

    @staticmethod
    def _small_rows(layer: Linear, x: torch.Tensor) -> int:
        """x's row count where the Triton kernels may take it (1 to `SMALL_BATCH_MAX_ROWS` half-precision rows on
        CUDA, in the weight's dtype), else 0."""
        rows = x.numel() // layer.in_features
        if rows <= SMALL_BATCH_MAX_ROWS and x.is_cuda and x.dtype in HALF_TYPES and layer.weight.dtype == x.dtype:
            return rows
        return 0

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] through the GEMV, the table's GEMM or cuBLAS."""
        rows = self._small_rows(layer, x)
        if not rows or layer.weight.stride(1) != 1:
            return F.linear(x, layer.weight, layer.bias)
        flat = x.reshape(rows, layer.in_features).contiguous()
        if rows == 1:
            y = self._gemv(flat, layer.weight, allow_pdl=self.allow_pdl)  # [1, out]
        elif (launch := self._gemm_launch(rows, layer.out_features, layer.in_features, tuning=self.tuning)) is not None:
            kernel, kwargs = launch
            y = kernel(flat, layer.weight, allow_pdl=self.allow_pdl, **kwargs)
        else:
            return F.linear(x, layer.weight, layer.bias)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*x.shape[:-1], layer.out_features)

    def apply_gated(self, layer: Linear, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """act(gate) * up of a fused [gate | up] layer in one launch, where the tuning table has the tiled GEMM with
        the activation for this many rows; None elsewhere."""
        rows = self._small_rows(layer, x)
        if rows < 2 or layer.bias is not None or layer.weight.stride(1) != 1:
            return None
        launch = self._gemm_launch(rows, layer.out_features, layer.in_features, act, tuning=self.tuning)
        if launch is None:
            return None
        kernel, kwargs = launch
        y = kernel(x.reshape(rows, layer.in_features).contiguous(), layer.weight, allow_pdl=self.allow_pdl, **kwargs)
        return y.view(*x.shape[:-1], layer.out_features // 2)


@torch.inference_mode()
def warm_up_gemms(model: nn.Module, token_counts: list[int]) -> int:
    """Run every distinct (weight shape, dtype) of the model's CUDA linear layers once for each of `token_counts`
    rows, so that cuBLAS has chosen its kernels before the first request (a new shape costs host time: see
    `step_inputs.eager_token_bucket`). Returns the number of products run."""
    shapes = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_cuda:
            key = (tuple(module.weight.shape), module.weight.dtype, module.bias is not None)
            shapes.setdefault(key, module)
    count = 0
    for module in shapes.values():
        x = torch.zeros(max(token_counts), module.in_features, dtype=module.weight.dtype, device=module.weight.device)
        for n in token_counts:
            F.linear(x[:n], module.weight, module.bias)
            count += 1
    return count
