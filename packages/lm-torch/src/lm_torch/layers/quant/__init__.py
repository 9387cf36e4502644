"""Quantized checkpoints: read `quantization_config`, build quantized linears where the checkpoint has them.

Supported `quant_method`s: "awq" (AutoAWQ GEMM, 4-bit), "gptq" (AutoGPTQ / GPTQModel, 2/4/8-bit, with or without
act-order), "smooth_quant" (LMDeploy's W8A8, int8 or float8_e4m3fn) and "fp8" (DeepSeek-V3 / Qwen3-FP8 blocked
float8, `layers.quant.fp8`; also applied at load to a float checkpoint by `ModelConfig.quantization="fp8"`).
`layers.linear.make_linear` builds the decoder layers' linears quantized (`make_quantized_linear`) unless
`modules_to_not_convert` names them; embeddings and the LM head stay in floating point, as these formats leave them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lm_torch.layers.context import BuildContext
from lm_torch.layers.linear import LinearBase
from lm_torch.layers.quant.fp8 import Fp8BlockLinear, parse_fp8_config
from lm_torch.layers.quant.w8a8 import W8A8Linear
from lm_torch.layers.quant.weight_only import AWQLinear, GPTQLinear

SUPPORTED_METHODS = ("awq", "gptq", "smooth_quant", "fp8")
# What `ModelConfig.quantization` can apply at load to a floating-point checkpoint.
ONLINE_METHODS = ("fp8",)
# Our fused modules and the checkpoint projections they hold (for modules_to_not_convert).
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj", "wqkv"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class QuantConfig:
    """The parts of a checkpoint's `quantization_config` that decide the layout."""

    method: str
    bits: int = 4
    group_size: int = 128
    zero_offset: int = 1  # GPTQ v1 stores zero - 1
    quant_dtype: str = "int8"
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    block_size: tuple[int, int] = (128, 128)  # fp8: (output, input) channels per block
    online: bool = False  # quantized at load from a floating-point checkpoint


def parse_quant_config(hf_config: Any, quantization: str | None = None) -> QuantConfig | None:
    """The checkpoint's QuantConfig, None for a floating-point checkpoint; a ValueError naming what is unsupported.

    `quantization` (`ModelConfig.quantization`): a method to apply at load to a floating-point checkpoint; a
    checkpoint already quantized that way is loaded as it is, one quantized otherwise is refused."""
    raw = getattr(hf_config, "quantization_config", None)
    if quantization is not None and quantization not in ONLINE_METHODS:
        raise ValueError(f"quantization {quantization!r} is not supported at load ({', '.join(ONLINE_METHODS)})")
    if raw is None:
        return QuantConfig("fp8", 8, -1, quant_dtype="float8_e4m3fn", online=True) if quantization else None
    raw = raw if isinstance(raw, dict) else raw.to_dict()
    method = str(raw.get("quant_method", "")).lower()
    if quantization is not None and method != quantization:
        raise ValueError(f"quantization={quantization!r} quantizes a floating-point checkpoint; this one is {method!r}")
    skip = tuple(raw.get("modules_to_not_convert") or ())
    if method == "awq":
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ checkpoints of version {version!r} are not supported (only 'gemm')")
        if not raw.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points are not supported")
        bits = int(raw.get("bits", raw.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"AWQ GEMM checkpoints hold 4-bit weights, this one says bits={bits}")
        group = int(raw.get("group_size", raw.get("q_group_size", 128)))
        return QuantConfig("awq", 4, group, modules_to_not_convert=skip)
    if method == "gptq":
        fmt = str(raw.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported ('gptq' or 'gptq_v2')")
        bits = int(raw.get("bits", 4))
        if bits not in (2, 4, 8):
            raise ValueError(f"GPTQ checkpoints with bits={bits} are not supported (2, 4 or 8)")
        offset = 1 if fmt == "gptq" else 0
        return QuantConfig("gptq", bits, int(raw.get("group_size", 128)), offset, modules_to_not_convert=skip)
    if method == "smooth_quant":
        return QuantConfig("smooth_quant", 8, -1, quant_dtype=str(raw.get("quant_dtype", "int8")))
    if method == "fp8":
        skip += tuple(raw.get("ignored_layers") or ())  # vLLM's and SGLang's name for the same list
        return QuantConfig(
            "fp8", 8, -1, quant_dtype="float8_e4m3fn", modules_to_not_convert=skip, block_size=parse_fp8_config(raw)
        )
    raise ValueError(
        f"quantization_config.quant_method {method!r} is not supported by lm-torch ({', '.join(SUPPORTED_METHODS)})"
    )


def is_quantized(prefix: str, quant: QuantConfig) -> bool:
    """Whether the checkpoint quantizes the linear at `prefix` (its path under the decoder layers)."""
    return not _not_converted(prefix, quant.modules_to_not_convert)


def make_quantized_linear(
    quant: QuantConfig, in_features: int, out_features: int, bias: bool, ctx: BuildContext, shard: str | None = None
) -> LinearBase:
    """The quantized layer of one projection (created on the current default device, its scales in `ctx.dtype`).

    `shard` "row" under tensor parallelism: `in_features` is this rank's share, which whole groups must fill."""
    if quant.method == "fp8":  # a share that cuts a block is refused at load, naming the tensor
        return Fp8BlockLinear(in_features, out_features, bias, quant.block_size, ctx, online=quant.online)
    row_shard = (ctx.tp.rank, ctx.tp.size) if shard == "row" and ctx.tp.size > 1 else None
    if row_shard is not None and quant.group_size != -1 and in_features % quant.group_size:
        raise ValueError(
            f"quantization group_size {quant.group_size} does not divide the {in_features} input channels each "
            f"tensor-parallel rank holds (tp {ctx.tp.size}): use a tp that leaves whole groups to each rank"
        )
    if quant.method == "awq":
        return AWQLinear(in_features, out_features, bias, quant.group_size, dtype=ctx.dtype, ctx=ctx)
    if quant.method == "gptq":
        return GPTQLinear(
            in_features,
            out_features,
            bias,
            quant.group_size,
            quant.bits,
            quant.zero_offset,
            dtype=ctx.dtype,
            ctx=ctx,
            row_shard=row_shard,
        )
    return W8A8Linear(
        in_features, out_features, bias, quant.quant_dtype, ctx.dtype, ctx, row_parallel=row_shard is not None
    )


def _not_converted(name: str, skipped: tuple[str, ...]) -> bool:
    if not skipped:
        return False
    leaf = name.rpartition(".")[2]
    names = {name, leaf, *_FUSED_PARTS.get(leaf, ())}
    return any(entry == n or entry in name for entry in skipped for n in names)


__all__ = [
    "AWQLinear",
    "Fp8BlockLinear",
    "GPTQLinear",
    "QuantConfig",
    "W8A8Linear",
    "is_quantized",
    "make_quantized_linear",
    "parse_quant_config",
]
