"""A summary of a local Hugging Face model directory: config, tokenizer, chat template and weights."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np

from lm_core.errors import ModelResolutionError

_NUMPY_DTYPES = ("F64", "F32", "F16")
SAMPLE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def json_object(value: object) -> dict[str, Any]:
    """`value` if it is a JSON object (a dict), else an empty one: for optional sections of a config.json."""
    return cast(dict[str, Any], value) if isinstance(value, dict) else {}


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence the model at `config` (a config.json) was made for: max_position_embeddings, or the
    context its rope scaling extends to (factor x original_max_position_embeddings) when that is longer."""
    config = config.get("text_config") or config
    limit = config.get("max_position_embeddings")
    scaling = json_object(config.get("rope_scaling"))
    original, factor = scaling.get("original_max_position_embeddings"), scaling.get("factor")
    if isinstance(original, int) and isinstance(factor, (int, float)) and factor > 1:
        limit = max(limit or 0, int(original * factor))
    return limit if isinstance(limit, int) and limit > 0 else None


def check_session_len(model_path: str | Path, session_len: int | None) -> None:
    """A ValueError when `session_len` exceeds the context length in `model_path`'s config.json (weights unread)."""
    if session_len is None:
        return
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return
    limit = context_length(json.loads(config_file.read_text()))
    if limit is not None and session_len > limit:
        raise ValueError(
            f"session_len {session_len} exceeds the model's context length {limit} (config.json); pass at most {limit}"
        )


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (all shards), or an error naming what is missing."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelResolutionError(f"{path} holds no .safetensors weights")
    return files


def inspect_model(path: Path, load_weights: bool = True) -> dict[str, Any]:
    """Load config, tokenizer and (optionally) every weight tensor of `path`, returning a printable summary."""
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    config: dict[str, Any] = json.loads((path / "config.json").read_text())
    # transformers' tokenizer classes are resolved at run time: typed as what they are here, dynamic.
    tokenizer: Any = cast(Any, AutoTokenizer).from_pretrained(path)
    summary: dict[str, Any] = {
        "architecture": ",".join(config.get("architectures", ["?"])),
        "layers": config.get("num_hidden_layers"),
        "hidden size": config.get("hidden_size"),
        "attention heads": f"{config.get('num_attention_heads')} (kv {config.get('num_key_value_heads')})",
        "vocabulary": len(tokenizer),
        "context length": config.get("max_position_embeddings"),
    }
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(SAMPLE_MESSAGES, add_generation_prompt=True, tokenize=False)
        summary["chat template"] = f"yes ({len(tokenizer(prompt, add_special_tokens=False)['input_ids'])} tokens)"
    else:
        summary["chat template"] = "none in the tokenizer (pass one by name)"
    if not load_weights:
        return summary

    num_params = 0
    dtypes: Counter[str] = Counter()
    bits = _packed_bits(config)
    quantized = isinstance(config.get("quantization_config"), dict)
    files = weight_files(path)
    with tqdm(total=len(files), desc="loading weights", unit="file", file=sys.stderr) as bar:
        for file in files:
            opened: Any = safe_open(file, framework="numpy")  # safetensors' reader has no type stubs
            with opened as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is no mapping
                    info = f.get_slice(name)
                    shape: list[int] = info.get_shape()
                    dtype: str = info.get_dtype()
                    size = int(np.prod(shape))
                    # numpy has no bfloat16: such tensors are counted from their header, not read
                    if dtype in _NUMPY_DTYPES and not np.isfinite(f.get_tensor(name)).all():
                        raise ModelResolutionError(f"{file.name}: tensor {name} holds NaN or infinite values")
                    num_params += _parameters_in(name, dtype, size, quantized, bits)
                    dtypes[dtype] += size
            bar.update(1)
    summary["parameters"] = f"{num_params / 1e6:.1f}M"
    summary["weight dtype"] = ", ".join(dtypes)
    quant = json_object(config.get("quantization_config"))
    if quant.get("quant_method"):
        details = ", ".join(f"{k} {quant[k]}" for k in ("bits", "group_size") if quant.get(k) is not None)
        summary["quantization"] = f"{quant['quant_method']} ({details})" if details else str(quant["quant_method"])
    return summary


# Tensors of a quantized checkpoint that describe the quantization (scales, zero points, group order), not
# parameters of the model (AWQ, GPTQ, LMDeploy's smooth_quant, compressed-tensors' names).
_QUANT_METADATA_SUFFIXES = (
    ".qzeros",
    ".scales",
    ".scale",
    ".g_idx",
    ".weight_scale",
    ".weight_scale_inv",
    ".input_scale",
    ".weight_zero_point",
)


def _packed_bits(config: dict[str, Any]) -> int | None:
    """The bits per weight packed into int32 words (`qweight`) of a GPTQ/AWQ checkpoint, else None."""
    quant = json_object(config.get("quantization_config"))
    if quant.get("quant_method") in ("awq", "gptq"):
        bits = quant.get("bits", quant.get("w_bit"))
        return bits if isinstance(bits, int) and 0 < bits < 32 else None
    return None


def _parameters_in(name: str, dtype: str, size: int, quantized: bool, packed_bits: int | None) -> int:
    """How many model parameters a stored tensor holds: a packed `qweight` holds 32 / bits per int32 word, and
    a quantized checkpoint's scales and zero points hold none."""
    if quantized and name.endswith(_QUANT_METADATA_SUFFIXES):
        return 0
    if packed_bits is not None and name.endswith(".qweight") and dtype == "I32":
        return size * 32 // packed_bits
    return size
