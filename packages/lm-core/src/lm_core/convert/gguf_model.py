"""GGUF to Hugging Face conversion: metadata to config.json, tensor names, dequantized fp32 safetensors.

The GGUF layout follows llama.cpp's writer (convert_hf_to_gguf.py), which we undo:
- tensor names are llama.cpp's (`blk.N.attn_q.weight`), mapped back to the transformers names;
- for the `llama` architecture the Q and K projections were permuted from the Hugging Face rotary layout
  (halves) to the interleaved one GGML uses; we permute them back;
- the numpy shape of a GGUF tensor is already row-major (HF order), GGML's `ne` is reversed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from lm_core.errors import GGUFConversionError

if TYPE_CHECKING:  # gguf imports numpy's memmap machinery: loaded when a conversion runs
    from gguf import GGUFReader, ReaderTensor

FloatArray = npt.NDArray[np.float32]

# Tensor types whose dequantization we test against transformers; gguf supports more and we accept them too.
TESTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# safetensors shards are cut near this size so that converting a large model never holds it all in memory.
_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class _Arch:
    hf_architecture: str
    model_type: str
    permute_qk: bool


_ARCHITECTURES = {
    "llama": _Arch("LlamaForCausalLM", "llama", permute_qk=True),
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp derives from the config and that have no place in a transformers checkpoint.
_DERIVED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def read_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file, turning every way a damaged file fails into one `GGUFConversionError`."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # truncated files fail in numpy's memmap or gguf's parser with varied types
        raise GGUFConversionError(f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFConversionError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")
    return reader


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python object (str, number, list), or `default` when absent."""
    entry = reader.fields.get(key)
    if entry is None:
        return default
    return entry.contents()


def gguf_architecture(reader: GGUFReader) -> str:
    """The GGUF file's `general.architecture`; GGUFConversionError if the converter does not support it."""
    arch = field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        supported = ", ".join(sorted(_ARCHITECTURES))
        raise GGUFConversionError(
            f"GGUF architecture {arch!r} is not supported for conversion (supported: {supported})"
        )
    return arch


def hf_config(reader: GGUFReader, vocab_size: int | None) -> dict[str, Any]:
    """config.json for the model in `reader` (transformers' Llama layout)."""
    arch = gguf_architecture(reader)
    spec = _ARCHITECTURES[arch]

    def meta(name: str, default: Any = None) -> Any:
        return field(reader, f"{arch}.{name}", default)

    hidden_size = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "vocab_size": int(vocab_size or meta("vocab_size") or embed.shape[-1]),
        "hidden_size": hidden_size,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", num_heads)),
        "head_dim": int(meta("attention.key_length", hidden_size // num_heads)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": any(t.name.endswith("attn_q.bias") for t in reader.tensors),
        "mlp_bias": False,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(reader, arch, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = field(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    return config


def _rope_scaling(reader: GGUFReader, arch: str, config: dict[str, Any]) -> dict[str, Any] | None:
    kind = field(reader, f"{arch}.rope.scaling.type")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFConversionError(
            "this GGUF carries precomputed rope frequencies (Llama 3.1 style rope_freqs), which the converter does "
            "not map back to rope_scaling yet"
        )
    if kind in (None, "none"):
        return None
    factor = float(field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = field(reader, f"{arch}.rope.scaling.original_context_length", config["max_position_embeddings"])
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(original)}
    raise GGUFConversionError(f"GGUF rope scaling type {kind!r} is not supported for conversion")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The transformers name for a GGUF tensor name, or None for tensors that have no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _DERIVED:
        return None
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFConversionError(f"unknown GGUF tensor {gguf_name!r}: no transformers name for it")


def _unpermute(weight: FloatArray, num_heads: int) -> FloatArray:
    # GGML stores each head's rotary pairs interleaved (x0, x_half, x1, x_half+1, ...); transformers keeps the two
    # halves apart. weight: [num_heads * head_dim, hidden] (or [num_heads * head_dim] for a bias).
    rows = weight.shape[0]
    pairs = np.reshape(weight, (num_heads, rows // num_heads // 2, 2, *weight.shape[1:]))
    return np.reshape(np.swapaxes(pairs, 1, 2), weight.shape)


def dequantize_tensor(tensor: ReaderTensor) -> FloatArray:
    """A GGUF tensor as float32 in transformers' (row-major) shape."""
    import gguf

    try:
        values: npt.NDArray[Any] = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFConversionError(
            f"tensor {tensor.name} has GGML type {tensor.tensor_type.name}, which gguf cannot dequantize"
        ) from None
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return np.ascontiguousarray(np.reshape(values, shape), dtype=np.float32)


def write_hf_weights(reader: GGUFReader, config: dict[str, Any], out_dir: Path, progress: bool = True) -> None:
    """Dequantize every tensor to fp32 and write safetensors shards (with an index when there are several)."""
    # safetensors annotates its arrays as a bare np.ndarray, which strict mode reads as partially unknown.
    from safetensors.numpy import save_file  # pyright: ignore[reportUnknownVariableType]
    from tqdm.auto import tqdm

    spec = _ARCHITECTURES[gguf_architecture(reader)]
    heads_for = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    metadata = {"format": "pt"}
    # Each shard is written as soon as it is full, so memory holds at most one shard; names get their final
    # "-of-N" once N is known.
    parts: list[tuple[Path, list[str], int]] = []
    shard: dict[str, FloatArray] = {}
    shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        part = out_dir / f"part-{len(parts):05d}.safetensors"
        save_file(shard, str(part), metadata=metadata)
        parts.append((part, list(shard), shard_bytes))
        shard, shard_bytes = {}, 0

    for tensor in tqdm(reader.tensors, desc="converting GGUF", unit="tensor", disable=not progress, file=sys.stderr):
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        values = dequantize_tensor(tensor)
        kind = tensor.name.split(".")[-2]
        if spec.permute_qk and kind in heads_for:
            values = _unpermute(values, heads_for[kind])
        if shard and shard_bytes + values.nbytes > _SHARD_BYTES:
            flush()
        shard[name] = values
        shard_bytes += values.nbytes
    flush()

    if len(parts) == 1:
        parts[0][0].rename(out_dir / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, (part, names, _) in enumerate(parts, start=1):
        filename = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.rename(out_dir / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {"total_size": sum(p[2] for p in parts)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
