"""Dense linear layers laid out for the CPU's matrix-vector products.

Batch-1 decoding on the CPU is nothing but matrix-vector products, bound by how fast the weights stream from memory.
Two facts of MKL on the 2-core CI machine shape the layout (`benchmarks/RESULTS.md` has the numbers):

- `x @ W^T` with `W^T` stored input-major ([in, out]) reads about 1.5x faster than `W` stored [out, in];
- a product with few rows runs on one core, while `bmm` spreads its batch over the cores.

So each weight is stored as `num_splits` contiguous input-major column blocks, [num_splits, in, out / num_splits], one
per core, and `bmm` computes the blocks side by side: the 30 layers of SmolLM2 (425 MB) stream at about 32 GB/s
instead of 22, and a batch-1 decode step of SmolLM2 takes 22 ms instead of 35.
Weights load in the checkpoint's layout; `use_cpu_linears` converts the loaded model once.
"""

from __future__ import annotations

import torch
from torch import nn


class SplitInputMajorLinear(nn.Module):
    """y = x @ W^T + bias, with W^T held as `num_splits` contiguous column blocks: weight_blocks [S, in, out / S]."""

    def __init__(self, linear: nn.Linear, num_splits: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if num_splits < 1 or self.out_features % num_splits:
            num_splits = 1
        self.num_splits = num_splits
        weight_t = linear.weight.detach().t()  # [in, out]
        blocks = weight_t.reshape(self.in_features, num_splits, -1).permute(1, 0, 2).contiguous()
        self.weight_blocks = nn.Parameter(blocks, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if self.num_splits == 1:
            out = flat @ self.weight_blocks[0]
        else:
            out = torch.bmm(flat.expand(self.num_splits, rows, self.in_features), self.weight_blocks)
            # [S, rows, out / S] -> [rows, out]: a view for one row, a copy otherwise.
            out = out.permute(1, 0, 2).reshape(rows, self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight in nn.Linear's [out, in] layout (a copy)."""
        return self.weight_blocks.permute(1, 0, 2).reshape(self.in_features, self.out_features).t()


def use_cpu_linears(model: nn.Module, num_splits: int | None = None) -> None:
    """Replace every nn.Linear of a loaded model by a SplitInputMajorLinear holding the same weights.

    `num_splits` defaults to torch's intra-op thread count: one column block per core.
    """
    splits = num_splits or torch.get_num_threads()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, SplitInputMajorLinear(module, splits))
