"""Linear layers that take Triton kernels for the few-row inputs of decode steps on CUDA.

A small-batch step reads every weight once for a few rows, so its linear layers are bound by memory bandwidth.
cuBLASLt runs one row at 2.1-2.9 TB/s on an H100 (split-K kernels and a reduction for the square and tall-K shapes);
`kernels.gemv.gemv` at 2.4-3.1 TB/s (`benchmarks/RESULTS.md`). From 2 to `SMALL_BATCH_MAX_ROWS` rows the kernel
of the GEMM tuning table runs (`kernels.gemm.gemm_launch`: the skinny or the tiled Triton GEMM, or cuBLAS on the
transposed problem), where it has one for the shape. Everything else (more rows, shapes the table leaves to
cuBLAS, other dtypes and devices) goes to `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HALF_TYPES = (torch.bfloat16, torch.float16)
# The most rows the Triton kernels take (a decode graph's largest bucket by default); cuBLAS above.
SMALL_BATCH_MAX_ROWS = 256


class SmallBatchLinear(nn.Linear):
    """nn.Linear whose one-row half-precision CUDA inputs go through `kernels.gemv.gemv`, and inputs of up to
    `SMALL_BATCH_MAX_ROWS` rows through the GEMM the tuning table names for the shape, if any."""

    def _small_rows(self, x: torch.Tensor) -> int:
        """x's row count where the Triton kernels may take it (1 to `SMALL_BATCH_MAX_ROWS` half-precision rows on
        CUDA, in the weight's dtype), else 0."""
        rows = x.numel() // self.in_features
        if rows <= SMALL_BATCH_MAX_ROWS and x.is_cuda and x.dtype in HALF_TYPES and self.weight.dtype == x.dtype:
            return rows
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._small_rows(x)
        if rows:
            from lm_torch.kernels.gemm import gemm_launch
            from lm_torch.kernels.gemv import gemv

            flat = x.reshape(rows, self.in_features).contiguous()
            if rows == 1:
                y = gemv(flat, self.weight)  # [1, out]
            elif (launch := gemm_launch(rows, self.out_features, self.in_features)) is not None:
                kernel, kwargs = launch
                y = kernel(flat, self.weight, **kwargs)
            else:
                return F.linear(x, self.weight, self.bias)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def forward_gated(self, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """act(gate) * up of this fused [gate | up] layer in one launch, where the tuning table has the tiled GEMM
        with the activation for this many rows (`layers.activation.gated_projection` asks); None elsewhere."""
        rows = self._small_rows(x)
        if rows < 2 or self.bias is not None:
            return None
        from lm_torch.kernels.gemm import gemm_launch

        launch = gemm_launch(rows, self.out_features, self.in_features, act)
        if launch is None:
            return None
        kernel, kwargs = launch
        y = kernel(x.reshape(rows, self.in_features).contiguous(), self.weight, **kwargs)
        return y.view(*x.shape[:-1], self.out_features // 2)


def use_small_batch_linears(model: nn.Module) -> int:
    """Give every plain half-precision nn.Linear of a loaded CUDA model the small-batch path (same parameters, shared
    ties included); returns how many. Quantized and other linear modules are left as they are."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.weight.dtype not in HALF_TYPES or not module.weight.is_cuda:
            continue
        if module.weight.stride(1) != 1:
            continue
        replacement = SmallBatchLinear(module.in_features, module.out_features, bias=False, device="meta")
        replacement.weight = module.weight
        replacement.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        count += 1
    return count


@torch.inference_mode()
def warm_up_gemms(model: nn.Module, token_counts: list[int]) -> int:
    """Run every distinct (weight shape, dtype) of the model's CUDA linear layers once for each of `token_counts`
    rows, so that cuBLAS has chosen its kernels before the first request (a new shape costs ~1.6 ms of host time
    on an H100: see `step_inputs.eager_token_bucket`). Returns the number of products run."""
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
