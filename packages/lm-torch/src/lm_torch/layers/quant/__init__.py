"""Quantized checkpoints: read `quantization_config`, put quantized linears in the model, finish them after loading.

Supported `quant_method`s: "awq" (AutoAWQ GEMM, 4-bit), "gptq" (AutoGPTQ / GPTQModel, 2/4/8-bit, with or without
act-order) and "smooth_quant" (LMDeploy's W8A8, int8 or float8_e4m3fn). The linears of the decoder layers are
replaced; embeddings and the LM head stay in floating point, as these formats leave them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lm_torch.layers.quant.w8a8 import W8A8Linear
from lm_torch.layers.quant.weight_only import AWQLinear, GPTQLinear

SUPPORTED_METHODS = ("awq", "gptq", "smooth_quant")
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


def parse_quant_config(hf_config) -> QuantConfig | None:
    """The checkpoint's QuantConfig, None for a floating-point checkpoint; a ValueError naming what is unsupported."""
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        return None
    raw = raw if isinstance(raw, dict) else raw.to_dict()
    method = str(raw.get("quant_method", "")).lower()
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
    raise ValueError(
        f"quantization_config.quant_method {method!r} is not supported by lm-torch ({', '.join(SUPPORTED_METHODS)})"
    )


def make_linear(quant: QuantConfig, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    """The quantized module standing in for `linear` (same in/out features and bias)."""
    args = (linear.in_features, linear.out_features, linear.bias is not None)
    device = linear.weight.device
    with torch.device(device):
        if quant.method == "awq":
            return AWQLinear(*args, quant.group_size, dtype=dtype)
        if quant.method == "gptq":
            return GPTQLinear(*args, quant.group_size, quant.bits, quant.zero_offset, dtype=dtype)
        return W8A8Linear(*args, quant.quant_dtype, dtype)


def quantize_model(model: nn.Module, quant: QuantConfig, dtype: torch.dtype) -> int:
    """Replace the nn.Linear modules of `model.layers` by quantized ones; returns how many."""
    count = 0
    for name, module in list(model.layers.named_modules()):
        if not isinstance(module, nn.Linear) or _not_converted(name, quant.modules_to_not_convert):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.layers.get_submodule(parent_name) if parent_name else model.layers
        setattr(parent, child, make_linear(quant, module, dtype))
        count += 1
    return count


def finish_loading(model: nn.Module) -> None:
    """Let each quantized module prepare its run-time form once the weights are in."""
    for module in model.modules():
        if isinstance(module, AWQLinear | GPTQLinear | W8A8Linear):
            module.finish_loading()


def _not_converted(name: str, skipped: tuple[str, ...]) -> bool:
    if not skipped:
        return False
    leaf = name.rpartition(".")[2]
    names = {name, leaf, *_FUSED_PARTS.get(leaf, ())}
    return any(entry == n or entry in name for entry in skipped for n in names)


__all__ = ["AWQLinear", "GPTQLinear", "QuantConfig", "W8A8Linear", "finish_loading", "parse_quant_config"]
