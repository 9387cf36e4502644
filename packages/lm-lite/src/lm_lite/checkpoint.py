"""Writing the quantized model as a standard checkpoint directory.

The directory holds safetensors shards (an index when there are several), the source config.json with a
`quantization_config`, and the source's tokenizer, generation config and other small files. Every tensor that is not
a quantized linear keeps its name; a quantized linear's `weight` is replaced by its format's tensors:
    awq:          qweight, qzeros, scales (, bias)        (`packing.pack_awq`)
    gptq:         qweight, qzeros, scales, g_idx (, bias) (`packing.pack_gptq`)
    smooth_quant: weight (int8 / float8_e4m3fn), scale [out, 1] float32 (, bias), LMDeploy's layout
InternLM2 goes back to its own names, with q, k and v merged into `wqkv` before packing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from lm_lite.model_io import INTERNLM2_RENAMES, merge_internlm2_qkv
from lm_lite.packing import pack_awq, pack_gptq
from lm_lite.quant_math import QuantizedWeight
from lm_lite.smooth import W8Weight

MAX_SHARD_BYTES = 4 << 30
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_NOT_COPIED_NAMES = {
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    ".lm-deploy-complete",
}


def save_dtype(config: dict) -> torch.dtype:
    """float16 or bfloat16 as the source declares; float16 for a float32 source (AutoAWQ/GPTQ's convention)."""
    declared = str(config.get("torch_dtype") or config.get("dtype") or "float16").removeprefix("torch.")
    return torch.bfloat16 if declared == "bfloat16" else torch.float16


def write_checkpoint(
    work_dir: Path,
    model: nn.Module,
    source_dir: Path,
    config: dict,
    quantized: dict[str, QuantizedWeight | W8Weight],
    quant_method: str,
    quantization_config: dict,
) -> Path:
    """Write the checkpoint; `quantized` maps qualified linear names (transformers' modules) to their weights."""
    dtype = save_dtype(config)
    state: dict[str, torch.Tensor] = {}
    tied = _tied_head(model, config)
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in quantized or (tied and name == "lm_head.weight"):
            continue
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if config.get("architectures", [None])[0] == "InternLM2ForCausalLM":
        state, quantized = _to_internlm2(state, quantized, config)
    for module, weight in quantized.items():
        for key, tensor in _format_tensors(weight, quant_method).items():
            state[f"{module}.{key}"] = tensor
    _save_shards(work_dir, {k: v.contiguous().cpu() for k, v in state.items()})

    out_config = dict(config)
    out_config["quantization_config"] = quantization_config
    out_config.pop("dtype", None)
    out_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (work_dir / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    _copy_side_files(source_dir, work_dir)
    return work_dir


def _format_tensors(weight: QuantizedWeight | W8Weight, quant_method: str) -> dict[str, torch.Tensor]:
    if isinstance(weight, QuantizedWeight):
        if quant_method == "awq":
            return pack_awq(weight)
        if quant_method == "gptq":
            return pack_gptq(weight)
        raise ValueError(f"quant_method {quant_method!r} has no layout for grouped integer weights")
    tensors = {"weight": weight.weight, "scale": weight.scale.float()}
    if weight.bias is not None:
        tensors["bias"] = weight.bias.half()
    return tensors


def _tied_head(model: nn.Module, config: dict) -> bool:
    text = config.get("text_config") or config
    if not text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)):
        return False
    head = getattr(model, "lm_head", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    return head is not None and get_embeddings is not None and head.weight is get_embeddings().weight


def _to_internlm2(state: dict, quantized: dict, config: dict):
    """Llama names -> InternLM2 names; q/k/v merged into wqkv (rows regrouped per KV head)."""
    reverse = [(new, old) for old, new in INTERNLM2_RENAMES.items()]

    def rename(name: str) -> str:
        for new, old in reverse:
            if name.startswith(new) or new in name:
                return name.replace(new, old, 1)
        return name

    out_state = {rename(k): v for k, v in state.items()}
    out_quantized = {}
    for name, weight in quantized.items():
        if name.endswith(".self_attn.q_proj"):
            base = name.removesuffix(".q_proj")
            parts = [weight, quantized[f"{base}.k_proj"], quantized[f"{base}.v_proj"]]
            out_quantized[base.replace(".self_attn", ".attention") + ".wqkv"] = _merge_rows(parts, config)
        elif not name.endswith((".self_attn.k_proj", ".self_attn.v_proj")):
            out_quantized[rename(name + ".")[:-1]] = weight
    return out_state, out_quantized


def _merge_rows(parts: list[QuantizedWeight | W8Weight], config: dict) -> QuantizedWeight | W8Weight:
    """q, k, v weights of one kind -> one wqkv weight, each row tensor regrouped per KV head."""

    def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = tensors
        return merge_internlm2_qkv(q, k, v, config)

    def merge_bias(biases: list[torch.Tensor | None]) -> torch.Tensor | None:
        present = [b for b in biases if b is not None]
        return merge(present) if present else None

    w8 = [p for p in parts if isinstance(p, W8Weight)]
    if w8:
        return W8Weight(
            weight=merge([p.weight for p in w8]),
            scale=merge([p.scale for p in w8]),
            bias=merge_bias([p.bias for p in w8]),
        )
    grouped = [p for p in parts if isinstance(p, QuantizedWeight)]
    first = grouped[0]
    return QuantizedWeight(
        qweight=merge([p.qweight for p in grouped]),
        scales=merge([p.scales for p in grouped]),
        zeros=merge([p.zeros for p in grouped]),
        bits=first.bits,
        group_size=first.group_size,
        g_idx=first.g_idx,  # shared: q, k and v were quantized with one Hessian (gptq.quantize_layer)
        bias=merge_bias([p.bias for p in grouped]),
    )


def _save_shards(work_dir: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], work_dir / "model.safetensors", metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, work_dir / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (work_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(source_dir: Path, work_dir: Path) -> None:
    """Tokenizer, generation config, chat template, remote code: every small file that is not weights or config."""
    for path in source_dir.iterdir():
        if not path.is_file() or path.name in _NOT_COPIED_NAMES:
            continue
        if path.suffix in _NOT_COPIED:
            continue
        shutil.copy2(path, work_dir / path.name)
