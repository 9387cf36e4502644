"""Fixtures for lm-core tests: the default model (fetched once per cache) and tiny GGUF files written from
random transformers Llama models, one per GGML tensor type."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# A tiny Llama whose dimensions are multiples of 256, the block size of the K-quants.
TINY_LLAMA = {
    "vocab_size": 384,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from lm_core import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from lm_core.resolve import default_gguf_path

    return default_gguf_path()


def _ggml_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # What llama.cpp's converter does to Q and K: each head's two rotary halves become interleaved pairs.
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _random_k_quant_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """K-quant data with random quants and small, finite fp16 scales (gguf can dequantize but not quantize these)."""
    import gguf

    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale = lambda n: rng.uniform(0.002, 0.02, size=(rows, cols // block_elems, n)).astype(np.float16)  # noqa: E731
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin (fp16), scales[12], qs[128]
        blocks[..., 0:4] = scale(2).view(np.uint8)
    elif qtype == gguf.GGMLQuantizationType.Q6_K:  # ql[128], qh[64], scales[16] (int8), d (fp16)
        blocks[..., 208:210] = scale(1).view(np.uint8)
    else:
        raise ValueError(f"no random generator for {qtype.name}")
    return blocks.reshape(rows, -1)


def write_llama_gguf(model, path: Path, type_name: str, seed: int = 0) -> Path:
    """Write a transformers Llama model as llama.cpp would: GGUF names, permuted Q/K, matrices in `type_name`.

    Norms stay F32 (as llama.cpp keeps them); a byte-level tokenizer of 256 byte tokens plus two control tokens
    makes the file complete.
    """
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    cfg = model.config
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)

    byte_tokens = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_end|>", *byte_tokens]
    tokens += [f"<|unused{i}|>" for i in range(cfg.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * len(byte_tokens) + [5] * (cfg.vocab_size - 2 - len(byte_tokens)))
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            gguf_name = f"blk.{idx}.{layer_names[rest]}"
        else:
            gguf_name = names[name]
        values = tensor.detach().float().numpy()
        if gguf_name.endswith("attn_q.weight"):
            values = _ggml_permute(values, cfg.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            values = _ggml_permute(values, cfg.num_key_value_heads)
        if values.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(values, dtype=np.float32))
        elif type_name in ("Q4_K", "Q6_K"):
            data = _random_k_quant_blocks(*values.shape, qtype, rng)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            data = gguf.quants.quantize(values, qtype)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    """A random-init transformers Llama (fp32) with the TINY_LLAMA config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    # Random init leaves norms at 1.0: perturb them so a mix-up of norm tensors cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return os.environ


@pytest.fixture(scope="session")
def llama_gguf_writer():
    """`write_llama_gguf(model, path, type_name)` (test modules cannot import conftest under importlib mode)."""
    return write_llama_gguf
