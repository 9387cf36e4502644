"""Tiny random checkpoints of every family lm-lite supports, with the default model's tokenizer.

Each has the default model's vocabulary (so its tokenizer makes the calibration samples), 64 hidden units, GQA with
4 query heads over 2 KV heads, and norm weights and biases moved away from their init so that a misplaced scale
shows. InternLM2 has no transformers class: its checkpoint is a random Llama written under InternLM2's names.
Shared by tests/lm_lite and tests/integration (which loads this file by path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 49152
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.05,
    "pad_token_id": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_multimodal",
    "phi3",
    "internlm2",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def _config_and_class(family: str):
    import transformers as tf

    if family in ("llama", "internlm2"):
        return tf.LlamaConfig(**TINY, attention_bias=family == "internlm2"), tf.LlamaForCausalLM
    if family == "mistral":
        return tf.MistralConfig(**TINY), tf.MistralForCausalLM
    if family == "qwen2":
        return tf.Qwen2Config(**TINY, tie_word_embeddings=True), tf.Qwen2ForCausalLM
    if family == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=24), tf.Qwen3ForCausalLM
    if family == "gemma":
        return tf.GemmaConfig(**TINY, head_dim=16, hidden_act="gelu_pytorch_tanh"), tf.GemmaForCausalLM
    if family == "gemma2":
        return tf.Gemma2Config(
            **TINY, head_dim=16, sliding_window=32, attn_implementation="eager"
        ), tf.Gemma2ForCausalLM
    if family == "gemma3":
        return _gemma3_text(), tf.Gemma3ForCausalLM
    if family == "gemma3_multimodal":
        vision = tf.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        config = tf.Gemma3Config(
            text_config=_gemma3_text().to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
            image_token_index=VOCAB - 1,
        )
        return config, tf.Gemma3ForConditionalGeneration
    if family == "phi3":
        return tf.Phi3Config(**TINY), tf.Phi3ForCausalLM
    raise ValueError(family)


def _gemma3_text():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**TINY, head_dim=16, sliding_window=32, layer_types=["sliding_attention", "full_attention"])


def make_tiny(family: str, path: Path, tokenizer_dir: Path) -> Path:
    """Write a tiny `family` checkpoint (safetensors, config.json, the tokenizer) into `path`; returns `path`."""
    path.mkdir(parents=True, exist_ok=True)
    config, model_class = _config_and_class(family)
    torch.manual_seed(0)
    model = _perturbed(model_class(config))
    if family == "internlm2":
        _save_internlm2(model, path)
    else:
        model.save_pretrained(path)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def _save_internlm2(llama, path: Path) -> None:
    from safetensors.torch import save_file

    config = llama.config
    kv, heads = config.num_key_value_heads, config.num_attention_heads
    head_dim, q_per_kv = config.hidden_size // heads, heads // kv
    renames = {
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state, out = llama.state_dict(), {}
    for name, tensor in state.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            k = state[name.replace("q_proj", "k_proj")]
            v = state[name.replace("q_proj", "v_proj")]
            rest = tensor.shape[1:]
            grouped = torch.cat(
                [
                    tensor.reshape(kv, q_per_kv, head_dim, *rest),
                    k.reshape(kv, 1, head_dim, *rest),
                    v.reshape(kv, 1, head_dim, *rest),
                ],
                dim=1,
            )
            out[name.replace("self_attn.q_proj", "attention.wqkv")] = grouped.reshape(-1, *rest).contiguous()
            continue
        for old, new in renames.items():
            name = name.replace(f".{old}.", f".{new}.")
        name = name.replace("model.embed_tokens.", "model.tok_embeddings.").replace("lm_head.", "output.")
        out[name] = tensor.contiguous()
    save_file(out, str(path / "model.safetensors"))
    config_json = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        **{k: TINY[k] for k in TINY if k != "initializer_range"},
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "bias": True,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config_json))


def make_engine_llama(path: Path, tokenizer_dir: Path, max_position_embeddings: int = 1024) -> Path:
    """A random 2-layer Llama (4 heads over 2 KV heads: tp 2 splits both) over the tokenizer of `tokenizer_dir`,
    with larger weights than `make_tiny`'s (initializer range 0.2) so that greedy choices are rarely near ties: for
    tests that compare whole generations between engine setups. Writes into `path`; returns it."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
