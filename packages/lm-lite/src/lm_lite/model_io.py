"""Loading the float model to quantize with transformers, and finding its decoder layers.

The model is loaded on the CPU; quantization moves one decoder layer at a time to the device (`walker`), so a model
larger than the device's memory can be quantized. InternLM2 has no transformers implementation (its checkpoints ship
remote code, which we do not run): it is loaded as the equivalent `LlamaForCausalLM`, with `wqkv` split into q, k
and v, and written back in its own layout by `checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lm_lite.families import architecture

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Where the decoder layers sit in the transformers model, tried in order (text models, then multimodal Gemma 3).
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers")
INTERNLM2_RENAMES = {
    "model.tok_embeddings.": "model.embed_tokens.",
    "output.": "lm_head.",
    ".attention.wo.": ".self_attn.o_proj.",
    ".attention_norm.": ".input_layernorm.",
    ".ffn_norm.": ".post_attention_layernorm.",
    ".feed_forward.w1.": ".mlp.gate_proj.",
    ".feed_forward.w3.": ".mlp.up_proj.",
    ".feed_forward.w2.": ".mlp.down_proj.",
}


def resolve_device(device: str) -> torch.device:
    """`device` as a torch device; "auto" is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, config: dict, device: torch.device) -> torch.dtype:
    """auto: float32 on the CPU; on a GPU the checkpoint's half type (bfloat16 for a float32 checkpoint)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    declared = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
    return torch.float16 if declared == "float16" else torch.bfloat16


def load_model(model_dir: Path, config: dict, dtype: torch.dtype):
    """(model, tokenizer) on the CPU in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    arch = architecture(config)
    if arch == "InternLM2ForCausalLM":
        model = _load_internlm2(model_dir, config, dtype)
    elif arch == "Gemma3ForConditionalGeneration":
        from transformers import Gemma3ForConditionalGeneration

        model = Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    else:
        # Gemma 2's attention soft-capping is implemented by the eager attention only.
        attn = "eager" if config.get("model_type") == "gemma2" else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model.eval().requires_grad_(False), tokenizer


def config_field(config: Any, key: str) -> Any:
    """`key` of a model config given as a config.json dict or a transformers config object; None when absent."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def linear_at(module: nn.Module, name: str) -> nn.Linear:
    """The `nn.Linear` at dotted path `name` under `module`; TypeError naming it if something else is there."""
    found = module.get_submodule(name)
    if not isinstance(found, nn.Linear):
        raise TypeError(f"{name} is a {type(found).__name__}, not an nn.Linear: lm-lite quantizes linear layers only")
    return found


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """`module.<name>` (a parameter or buffer, such as a norm's weight); TypeError if it is not a tensor."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the decoder layers."""
    for path in _LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise ValueError(f"{type(model).__name__} has no decoder layers at {' or '.join(_LAYER_PATHS)}")


# -- InternLM2 ------------------------------------------------------------------------------------------------------


def _load_internlm2(model_dir: Path, config: dict, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling")
    if scaling:
        rope.update({k: v for k, v in scaling.items() if k not in ("type", "rope_type")})
        rope["rope_type"] = scaling.get("rope_type") or scaling["type"]
    llama_config = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_parameters=rope,
        attention_bias=bool(config.get("bias", False)),
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config)
    state = {}
    for name, tensor in _checkpoint_tensors(model_dir):
        if ".attention.wqkv." in name:
            state.update(split_internlm2_wqkv(name, tensor, llama_config))
            continue
        for old, new in INTERNLM2_RENAMES.items():
            if old in name or name.startswith(old):
                name = name.replace(old, new, 1)
                break
        state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"InternLM2 checkpoint {model_dir} lacks {missing[:3]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(llama_config)  # its buffers were created on meta
    # In place (a module's `to` returns the module itself). The cast: transformers wraps `to` with functools.wraps,
    # which hides its signature from type checkers.
    cast(nn.Module, model).to(dtype)
    return model


def internlm2_head_layout(config: Any) -> tuple[int, int, int]:
    """(num_kv_heads, q_per_kv, head_dim) of an InternLM2 (or its Llama translation) config."""
    heads: int = config_field(config, "num_attention_heads")
    kv_heads: int = config_field(config, "num_key_value_heads") or heads
    hidden_size: int = config_field(config, "hidden_size")
    return kv_heads, heads // kv_heads, hidden_size // heads


def split_internlm2_wqkv(name: str, tensor: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """wqkv rows grouped per KV head ([kv, q_per_kv + 2, head_dim]) -> Llama's q_proj, k_proj, v_proj."""
    kv, q_per_kv, head_dim = internlm2_head_layout(config)
    grouped = tensor.reshape(kv, q_per_kv + 2, head_dim, *tensor.shape[1:])
    parts = {
        "q_proj": grouped[:, :q_per_kv].reshape(kv * q_per_kv * head_dim, *tensor.shape[1:]),
        "k_proj": grouped[:, q_per_kv].reshape(kv * head_dim, *tensor.shape[1:]),
        "v_proj": grouped[:, q_per_kv + 1].reshape(kv * head_dim, *tensor.shape[1:]),
    }
    base, _, param = name.replace(".attention.wqkv.", ".self_attn.").rpartition(".")
    return {f"{base}.{proj}.{param}": part.contiguous() for proj, part in parts.items()}


def merge_internlm2_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config) -> torch.Tensor:
    """The inverse of `split_internlm2_wqkv` along dimension 0 (rows = output channels)."""
    kv, q_per_kv, head_dim = internlm2_head_layout(config)
    rest = q.shape[1:]
    grouped = torch.cat(
        [
            q.reshape(kv, q_per_kv, head_dim, *rest),
            k.reshape(kv, 1, head_dim, *rest),
            v.reshape(kv, 1, head_dim, *rest),
        ],
        dim=1,
    )
    return grouped.reshape(kv * (q_per_kv + 2) * head_dim, *rest)


def _checkpoint_tensors(model_dir: Path):
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is no mapping
                    yield name, f.get_tensor(name)
        return
    for file in sorted(p for p in model_dir.glob("*.bin") if p.name != "training_args.bin"):
        yield from torch.load(file, map_location="cpu", weights_only=True).items()
