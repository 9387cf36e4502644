"""`convert_gguf`: one GGUF file in, one Hugging Face model directory out."""

from __future__ import annotations

import json
from pathlib import Path

from lm_core.convert.gguf_model import hf_config, read_gguf, write_hf_weights
from lm_core.convert.gguf_tokenizer import write_hf_tokenizer


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Convert `gguf_path` into `out_dir`: config.json, generation_config.json, tokenizer files and fp32 safetensors.

    Raises `GGUFConversionError` for truncated files and for architectures, tensor types or tokenizers we cannot map.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = read_gguf(gguf_path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config = hf_config(reader, vocab_size=len(tokens.data) if tokens is not None else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer(reader, out_dir, model_max_length=config["max_position_embeddings"])
    write_hf_weights(reader, config, out_dir, progress=progress)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir
