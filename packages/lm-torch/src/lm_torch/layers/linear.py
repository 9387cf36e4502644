"""Dense linear layers whose kernel path (`LinearMethod`) is chosen once, at construction, from the device and dtype.

`make_linear` is the one place a model gets its linears: a quantized layer (`lm_torch.layers.quant`) where the
checkpoint quantizes that projection, else a `Linear` holding [out, in] weights as the checkpoint stores them and a
method:

- `TorchLinearMethod`: `torch.nn.functional.linear` (CUDA in float32, CUDA without triton);
- `CpuSplitLinearMethod`: the CPU layout below;
- `SmallBatchLinearMethod` (`layers.cuda_linear`): half precision on CUDA with triton, Triton GEMV/GEMMs for the
  few-row inputs of decode steps.

Each method may turn the loaded weight into its own layout once, in `process_weights_after_loading` (the loader
calls it after the weights are in).

The CPU layout: batch-1 decoding on the CPU is matrix-vector products bound by how fast the weights stream from
memory. With MKL, `x @ W^T` reads faster with `W^T` stored input-major ([in, out]) than with `W` stored [out, in],
and a product with few rows runs on one core while `bmm` spreads its batch over the cores. So the weight is stored
as `num_splits` contiguous input-major column blocks, [num_splits, in, out / num_splits], one per core, and `bmm`
computes the blocks side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lm_torch.layers.context import HALF_TYPES, BuildContext, context_or_current

if TYPE_CHECKING:
    from lm_torch.kernels.w4a16 import QKVRotary


class LinearBase(nn.Module):
    """What every linear layer offers the model code besides `forward(x)`: fused variants that return None where
    they do not apply (the caller then runs the plain product), and the after-loading hook."""

    in_features: int
    out_features: int
    #: Whether `forward_qkv_rotary` can apply at all (decided once the weights are loaded).
    can_fold_qkv_rotary: bool = False

    def forward_gated(self, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """act(gate) * up of this fused [gate | up] layer in one launch, or None where that does not apply."""
        return None

    def forward_qkv_rotary(self, x: torch.Tensor, rope: QKVRotary) -> torch.Tensor | None:
        """This [q | k | v] layer for one token with the rotary embedding and the KV-cache write folded in, or None."""
        return None

    def process_weights_after_loading(self) -> None:
        """Turn the checkpoint's layout into the one the forward uses (once, after loading)."""


class LinearMethod:
    """How a dense `Linear` computes: its weight layout after loading, and its forward."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Turn `layer.weight` ([out, in]) into this method's layout."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W^T + bias for x [..., in] -> [..., out]."""
        raise NotImplementedError

    def apply_gated(self, layer: Linear, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """act(gate) * up of a fused [gate | up] layer in one launch, or None where this method has no such path."""
        return None


class TorchLinearMethod(LinearMethod):
    """`torch.nn.functional.linear` on the checkpoint's [out, in] weight."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """F.linear(x, W, bias)."""
        return F.linear(x, layer.weight, layer.bias)


def split_input_major(weight: torch.Tensor, num_splits: int) -> torch.Tensor:
    """weight [out, in] -> its transpose as `num_splits` contiguous column blocks [num_splits, in, out / num_splits]
    (one block if `num_splits` does not divide out)."""
    out_features, in_features = weight.shape
    if num_splits < 1 or out_features % num_splits:
        num_splits = 1
    return weight.detach().t().reshape(in_features, num_splits, -1).permute(1, 0, 2).contiguous()


def split_matmul(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ the weight held as `blocks` [S, in, out / S] (+ bias) -> [..., out]."""
    num_splits, in_features, part = blocks.shape
    out_features = num_splits * part
    flat = x.reshape(-1, in_features)
    rows = flat.shape[0]
    if num_splits == 1:
        out = flat @ blocks[0]
    else:
        out = torch.bmm(flat.expand(num_splits, rows, in_features), blocks)
        # [S, rows, out / S] -> [rows, out]: a view for one row, a copy otherwise.
        out = out.permute(1, 0, 2).reshape(rows, out_features)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out_features)


class CpuSplitLinearMethod(LinearMethod):
    """The CPU layout of the module docstring: `weight` becomes `weight_blocks` [S, in, out / S] after loading."""

    def __init__(self, num_splits: int | None = None) -> None:
        self.num_splits = num_splits

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Replace `weight` [out, in] by `weight_blocks`, one column block per core (torch's thread count now)."""
        splits = self.num_splits or torch.get_num_threads()
        blocks = split_input_major(layer.weight, splits)
        del layer.weight
        layer.weight_blocks = nn.Parameter(blocks, requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """The blocks side by side (`split_matmul`), or F.linear before the weights are processed."""
        blocks = layer._parameters.get("weight_blocks")
        if blocks is None:  # a model used without the loader: the weights were never processed
            return F.linear(x, layer.weight, layer.bias)
        return split_matmul(x, blocks, layer.bias)


def dense_linear_method(ctx: BuildContext) -> LinearMethod:
    """The method of an unquantized linear for `ctx`: CPU split blocks, CUDA half-precision small-batch kernels, or
    F.linear."""
    if ctx.device.type == "cpu":
        return CpuSplitLinearMethod(ctx.cpu_linear_splits)
    if ctx.runs_triton and ctx.dtype in HALF_TYPES:
        from lm_torch.layers.cuda_linear import SmallBatchLinearMethod

        return SmallBatchLinearMethod(ctx.tuning, ctx.kernels.pdl)
    return TorchLinearMethod()


class Linear(nn.Linear, LinearBase):
    """nn.Linear (the checkpoint's [out, in] weight, loaded as it is) computed by the `LinearMethod` chosen at
    construction."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        ctx: BuildContext | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.method = dense_linear_method(context_or_current(ctx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        """x [..., in] -> [..., out]."""
        return self.method.apply(self, x)

    def forward_gated(self, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """act(gate) * up in one launch where the method has one for this input, else None."""
        return self.method.apply_gated(self, x, act)

    def process_weights_after_loading(self) -> None:
        """The method's layout of the loaded weight."""
        self.method.process_weights_after_loading(self)

    def dense_weight(self) -> torch.Tensor:
        """The weight in the [out, in] layout (a copy once the method changed it)."""
        blocks = self._parameters.get("weight_blocks")
        if blocks is None:
            return self.weight
        num_splits, in_features, part = blocks.shape
        return blocks.permute(1, 0, 2).reshape(in_features, num_splits * part).t()


def make_linear(
    ctx: BuildContext | None,
    in_features: int,
    out_features: int,
    bias: bool = False,
    prefix: str | None = None,
    shard: str | None = None,
    padded: bool = False,
) -> LinearBase:
    """The linear layer of one projection: quantized when the checkpoint quantizes it (`prefix`, the module's path
    under the decoder layers, e.g. "0.self_attn.qkv_proj"; None for layers outside them, which stay dense), else a
    dense `Linear` with the method for `ctx`.

    Under tensor parallelism the sizes are this rank's (`lm_torch.distributed.sharding.divide`), and `shard` says
    which of them is split: "column" (output channels; `padded` where the last rank's share runs past the
    checkpoint, the LM head's vocabulary) or "row" (input channels: the caller all-reduces the output, and the bias
    is added by rank 0 alone). The layer's parameters are marked for the loader."""
    ctx = context_or_current(ctx)
    quant = ctx.quant_config
    layer: LinearBase
    if quant is not None and prefix is not None and _quantized(prefix, quant):
        from lm_torch.layers.quant import make_quantized_linear

        layer = make_quantized_linear(quant, in_features, out_features, bias, ctx, shard)
    else:
        layer = Linear(in_features, out_features, bias, ctx)
    if shard is not None and ctx.tp.size > 1:
        mark_linear_shards(layer, shard, padded)
    return layer


def _quantized(prefix: str, quant) -> bool:
    from lm_torch.layers.quant import is_quantized

    return is_quantized(prefix, quant)


def mark_linear_shards(layer: nn.Module, shard: str, padded: bool = False) -> None:
    """Mark a linear's parameters for the loader (see `lm_torch.distributed.sharding`): "column" splits output
    channels (dimension 0 of a dense weight, `output_dim` of a quantized one; a parameter with `output_dim` None,
    GPTQ's g_idx, is whole), "row" splits input channels (dimension 1 of a dense weight, `input_dim` of a quantized
    one) and leaves the bias to rank 0."""
    from lm_torch.distributed.sharding import mark_rank0_only, mark_sharded

    if shard not in ("column", "row"):
        raise ValueError(f"shard must be 'column' or 'row', got {shard!r}")
    for name, param in layer.named_parameters(recurse=False):
        if shard == "column":
            dim = 0 if name == "bias" else getattr(param, "output_dim", 0)
            mark_sharded(param, dim, padded)
        elif name == "bias":
            mark_rank0_only(param)
        else:
            mark_sharded(param, getattr(param, "input_dim", 1))


class SplitInputMajorLinear(nn.Module):
    """y = x @ W^T + bias with W^T held as column blocks [S, in, out / S], built from a loaded nn.Linear (the
    quantized layers' dense CPU copy)."""

    def __init__(self, linear: nn.Linear, num_splits: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        blocks = split_input_major(linear.weight, num_splits)
        self.num_splits = blocks.shape[0]
        self.weight_blocks = nn.Parameter(blocks, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return split_matmul(x, self.weight_blocks, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The weight in nn.Linear's [out, in] layout (a copy)."""
        return self.weight_blocks.permute(1, 0, 2).reshape(self.in_features, self.out_features).t()
