"""Architecture name (config.json's `architectures`) -> our implementation, imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

# Values are "module:Class" under lm_torch.models, so that only the family in use is imported.
MODEL_REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "llama:LlamaForCausalLM",
    "MistralForCausalLM": "llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "llama:LlamaForCausalLM",
    "GemmaForCausalLM": "gemma:GemmaForCausalLM",
    "Gemma2ForCausalLM": "gemma:GemmaForCausalLM",
    "Gemma3ForCausalLM": "gemma:GemmaForCausalLM",
    "Phi3ForCausalLM": "phi3:Phi3ForCausalLM",
    # Mixture-of-experts models (layers.moe).
    "Qwen2MoeForCausalLM": "qwen_moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "qwen_moe:Qwen3MoeForCausalLM",
    "MixtralForCausalLM": "mixtral:MixtralForCausalLM",
    # Vision-language models: the language model with its vision tower (models.vlm).
    "Qwen2VLForConditionalGeneration": "qwen2_vl:Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl:Qwen2VLForConditionalGeneration",
    "Gemma3ForConditionalGeneration": "gemma3_vl:Gemma3ForConditionalGeneration",
    "LlavaForConditionalGeneration": "llava:LlavaForConditionalGeneration",
    "InternVLForConditionalGeneration": "internvl:InternVLForConditionalGeneration",
    "InternLM2ForCausalLM": "internlm2:InternLM2ForCausalLM",
}


def supported_architectures() -> list[str]:
    """The architecture names lm-torch implements, sorted."""
    return sorted(MODEL_REGISTRY)


def get_model_class(architecture: str, custom_module_map: dict[str, Any] | None = None) -> type:
    """The class for `architecture`; `custom_module_map` entries (a class or "package.module:Class") win."""
    custom = (custom_module_map or {}).get(architecture)
    if custom is not None:
        return _load(custom) if isinstance(custom, str) else custom
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"architecture {architecture!r} is not supported by lm-torch (supported: "
            f"{', '.join(supported_architectures())}); register your own with custom_module_map"
        )
    return _load(f"lm_torch.models.{MODEL_REGISTRY[architecture]}")


def _load(path: str) -> type:
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise ValueError(f"custom_module_map entries must look like 'package.module:Class', got {path!r}")
    return getattr(importlib.import_module(module_name), class_name)
