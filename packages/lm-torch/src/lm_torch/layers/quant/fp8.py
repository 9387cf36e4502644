"""Blocked FP8 linears: DeepSeek-V3 / Qwen3-*-FP8 checkpoints (`quant_method: fp8`), or any float checkpoint
quantized the same way at load (`--quantization fp8`).

Checkpoint layout of a linear with N outputs and K inputs, blocks of (bn, bk) = `weight_block_size` (128, 128):
    weight            [N, K] float8_e4m3fn
    weight_scale_inv  [ceil(N / bn), ceil(K / bk)] float32 (bfloat16 in some checkpoints)
    W[n, k] = float32(weight[n, k]) * weight_scale_inv[n // bn, k // bk]
The last block row and column are partial when bn or bk does not divide N or K. A fused layer ([q | k | v],
[gate | up]) holds each part with its own block grid: the parts are quantized apart, so a part of 192 rows ends in a
partial block and the next starts a new one. The layer therefore keeps one scale row per output while loading
(`weight_scale_inv` [N, ceil(K / bk)]), each copied from its part's block row.

Loading: both tensors reach `load_part` (the loader's `weight_loader` hook) with the part's index and sizes. Under
tensor parallelism a rank reads its rows (column-parallel) or inputs (row-parallel) of the weight and the matching
block rows or columns of the scales; a share that ends inside a block (e.g. 576 inputs split in two, 288 each) is
refused with a ValueError naming the tensor. With `online` (a float checkpoint) the float weight of each part is
quantized whole first (`quantize_blocks`: round to nearest, scale = block amax / 448), exactly as `lm lite fp8`
writes it, then split like a checkpoint's.

After loading (`process_weights_after_loading`), chosen once from the build context:
- CPU (and CUDA without triton): the weight is dequantized once to the compute dtype with the arithmetic above
  (float32 product, one rounding), which is what transformers does on a machine without a GPU, and kept as a dense
  `Linear` (its CPU layout); the float8 tensors are dropped.
- CUDA with triton: the float8 weight stays; the scale rows shrink to the distinct block rows (`scale_blocks`
  [R, ceil(K / bk)] and `scale_rows` [N] int32), and `kernels.fp8_gemm` quantizes the activations per token and
  group of bk inputs and multiplies in float8 with float32 accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lm_torch.distributed.group import TPGroup
from lm_torch.distributed.sharding import TensorLike, materialize, read_shard
from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.layers.linear import Linear, LinearBase
from lm_torch.layers.quant.packed import quant_param

FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
DEFAULT_BLOCK = (128, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def parse_fp8_config(raw: dict[str, Any]) -> tuple[int, int]:
    """The (bn, bk) blocks of an fp8 `quantization_config`; a ValueError naming what lm-torch does not support."""
    fmt = str(raw.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise ValueError(f"fp8 checkpoints with fmt {fmt!r} are not supported (only 'e4m3')")
    scheme = str(raw.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise ValueError(f"fp8 activation_scheme {scheme!r} is not supported (only 'dynamic')")
    block = raw.get("weight_block_size")
    if block is None:
        raise ValueError(
            "quantization_config.quant_method 'fp8' is not supported without weight_block_size (per-tensor scales): "
            "lm-torch runs blocked fp8"
        )
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"fp8 weight_block_size must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q [N, K] float8_e4m3fn, scale [ceil(N / bn), ceil(K / bk)] float32): per block
    scale = amax / 448 (1 for an all-zero block), q = e4m3(clamp(w / scale, +-448)), rounded to nearest."""
    bn, bk = block
    n, k = weight.shape
    rows, cols = _cdiv(n, bn), _cdiv(k, bk)
    padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32, device=weight.device)
    padded[:n, :k] = weight.float()
    blocks = padded.view(rows, bn, cols, bk)
    amax = blocks.abs().amax(dim=(1, 3))  # [rows, cols]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * bn, cols * bk)[:n, :k].contiguous(), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """q [N, K] float8 with block scales [ceil(N / bn), ceil(K / bk)] -> W [N, K] float32."""
    n, k = q.shape
    rows = scale.float().repeat_interleave(block[0], dim=0)[:n]
    return q.float() * rows.repeat_interleave(block[1], dim=1)[:, :k]


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as float32: float dtypes as they are, UE8M0 bytes (uint8) as 2^(b - 127)."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


def _read_channels(tensor: TensorLike, dim: int, local: int, block: int, tp: TPGroup, what: str) -> torch.Tensor:
    """This rank's `local` channels along `dim` of a weight; a ValueError when the share ends inside a block."""
    total = tensor.shape[dim]
    if local != total and local % block and total > block:
        raise ValueError(_cut_message(what, dim, f"{local} of its {total}", block, tp))
    return read_shard(tensor, dim, local, tp.rank, tp.size, what=what)


def _read_blocks(tensor: TensorLike, dim: int, local: int, block: int, tp: TPGroup, what: str) -> torch.Tensor:
    """The scale rows (dim 0) or columns (dim 1) covering this rank's `local` channels."""
    total = tensor.shape[dim]
    if _cdiv(local, block) == total:
        return materialize(tensor)  # the whole part, or a share of its one block
    if local % block:
        raise ValueError(_cut_message(what, dim, str(local), block, tp))
    return read_shard(tensor, dim, local // block, tp.rank, tp.size, what=what)


def _cut_message(what: str, dim: int, share: str, block: int, tp: TPGroup) -> str:
    kind = "outputs" if dim == 0 else "inputs"
    return (
        f"{what}: tensor parallel {tp.size} gives each rank {share} {kind}, which cuts the float8 checkpoint's "
        f"{block}-wide blocks; use a tp that leaves whole blocks to each rank"
    )


class Fp8BlockLinear(LinearBase):
    """float8_e4m3fn weights with one scale per (bn x bk) block; dense on the CPU, W8A8 Triton kernels on CUDA."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        block: tuple[int, int] = DEFAULT_BLOCK,
        ctx: BuildContext | None = None,
        online: bool = False,
    ) -> None:
        super().__init__()
        self.build_ctx = context_or_current(ctx)
        self.runs_triton = self.build_ctx.runs_triton  # the forward's path, fixed here
        self.in_features, self.out_features = in_features, out_features
        self.block, self.online = (int(block[0]), int(block[1])), online
        self.weight = quant_param(torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn), 0, input_dim=1)
        # One scale row per output while loading; `output_pack`: outputs per row of the checkpoint's scale tensor.
        scales = torch.ones(out_features, _cdiv(in_features, self.block[1]), dtype=torch.float32)
        self.weight_scale_inv = quant_param(scales, 0, self.block[0], optional=online, input_dim=1)
        self.bias = quant_param(torch.zeros(out_features, dtype=self.build_ctx.dtype), 0) if bias else None
        for name in ("weight", "weight_scale_inv"):
            vars(getattr(self, name)).update(weight_loader=self._loader(name))
        self.dense: Linear | None = None
        self.register_buffer("scale_blocks", None)
        self.register_buffer("scale_rows", None)

    def _loader(self, name: str) -> Callable[[TensorLike, int | None, list[int] | None, TPGroup, str], None]:
        def load(tensor: TensorLike, shard: int | None, sizes: list[int] | None, tp: TPGroup, what: str) -> None:
            self.load_part(name, tensor, shard, sizes, tp, what)

        return load

    def load_part(
        self, name: str, tensor: TensorLike, shard: int | None, sizes: list[int] | None, tp: TPGroup, what: str
    ) -> None:
        """Load checkpoint tensor `what` into parameter `name` as fused part `shard` of `sizes` (this rank's outputs
        of each part; None: the whole layer), reading this rank's share of it (module docstring)."""
        sizes = [self.out_features] if sizes is None else sizes
        shard = 0 if shard is None else shard
        start, rows = sum(sizes[:shard]), sizes[shard]
        dim = getattr(self.weight, "tp_dim", None) if tp.size > 1 else None
        with torch.no_grad():
            if name == "weight_scale_inv":
                self._store_scales(tensor, start, rows, dim, tp, what)
            elif self.online:
                q, scale = quantize_blocks(materialize(tensor), self.block)
                self._store_weight(q, start, rows, dim, tp, what)
                self._store_scales(scale, start, rows, dim, tp, what)
            else:
                self._store_weight(tensor, start, rows, dim, tp, what)

    def _store_weight(self, tensor: TensorLike, start: int, rows: int, dim: int | None, tp: TPGroup, what: str) -> None:
        bn, bk = self.block
        if dim == 0:
            part = _read_channels(tensor, 0, rows, bn, tp, what)
        elif dim == 1:
            part = _read_channels(tensor, 1, self.in_features, bk, tp, what)
        else:
            part = materialize(tensor)
        if part.dtype != torch.float8_e4m3fn:
            raise ValueError(
                f"checkpoint tensor {what!r} is {part.dtype}, not float8_e4m3fn: an fp8 checkpoint lists the linears "
                "it leaves in floating point in quantization_config.modules_to_not_convert"
            )
        if tuple(part.shape) != (rows, self.in_features):
            expected = (rows, self.in_features)
            raise ValueError(f"checkpoint tensor {what!r} has shape {tuple(part.shape)}, expected {expected}")
        self.weight.narrow(0, start, rows).copy_(part)

    def _store_scales(self, tensor: TensorLike, start: int, rows: int, dim: int | None, tp: TPGroup, what: str) -> None:
        bn, bk = self.block
        if dim == 0:
            part = _read_blocks(tensor, 0, rows, bn, tp, what)
        elif dim == 1:
            part = _read_blocks(tensor, 1, self.in_features, bk, tp, what)
        else:
            part = materialize(tensor)
        expected = (_cdiv(rows, bn), _cdiv(self.in_features, bk))
        if tuple(part.shape) != expected:
            raise ValueError(
                f"checkpoint tensor {what!r} has shape {tuple(part.shape)}, expected {expected}: the "
                f"{self.block} block scales of a [{rows}, {self.in_features}] weight"
            )
        per_row = scale_values(part)[torch.arange(rows, device=part.device) // bn]  # [rows, ceil(K / bk)]
        self.weight_scale_inv.narrow(0, start, rows).copy_(per_row)

    def dequantized_weight(self) -> torch.Tensor:
        """W [out, in]: float32 from the float8 weight and its scales, or the dense copy (compute dtype)."""
        if self.dense is not None:
            return self.dense.dense_weight()
        # [out, groups]: one scale row per output
        per_row = self.weight_scale_inv if self.scale_rows is None else self.scale_blocks[self.scale_rows.long()]
        return self.weight.float() * per_row.repeat_interleave(self.block[1], dim=1)[:, : self.in_features]

    def process_weights_after_loading(self) -> None:
        """The path chosen at construction (module docstring): a dense copy, or the kernels' scale layout."""
        if self.runs_triton:
            scales = self.weight_scale_inv.data  # [N, groups]: runs of equal rows, one run per block row
            keep = torch.ones(scales.shape[0], dtype=torch.bool, device=scales.device)
            keep[1:] = (scales[1:] != scales[:-1]).any(dim=1)
            self.scale_blocks = scales[keep].contiguous()  # [R, groups]
            self.scale_rows = (keep.cumsum(0) - 1).to(torch.int32)  # [N]
            del self.weight_scale_inv
            return
        ctx = self.build_ctx
        dense = Linear(self.in_features, self.out_features, False, ctx, "meta", ctx.dtype)
        dense.weight = nn.Parameter(self.dequantized_weight().to(ctx.dtype), requires_grad=False)
        dense.process_weights_after_loading()
        self.dense = dense
        del self.weight, self.weight_scale_inv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        if self.dense is not None:
            out = self.dense(x)
        elif self.scale_rows is not None:
            from lm_torch.kernels.fp8_gemm import fp8_block_linear

            flat = x.reshape(-1, self.in_features).contiguous()  # [tokens, in]
            out = fp8_block_linear(flat, self.weight, self.scale_blocks, self.scale_rows, None, self.block[1])
            out = out.view(*x.shape[:-1], self.out_features)
        else:  # used without the loader: the weights were never processed
            out = x @ self.dequantized_weight().to(x.dtype).t()
        return out if self.bias is None else out + self.bias

    def init_dummy(self, generator: torch.Generator) -> None:
        """normal(0, 0.02) weights quantized to float8 blocks (one grid over the whole layer), for benchmarks."""
        device = self.weight.device
        w = torch.empty(self.weight.shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=generator)
        q, scale = quantize_blocks(w, self.block)
        self.weight.data.copy_(q)
        rows = torch.arange(self.out_features, device=device) // self.block[0]
        self.weight_scale_inv.data.copy_(scale[rows])

    def extra_repr(self) -> str:
        """Shape and block size."""
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"
