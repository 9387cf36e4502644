"""The LLaVA, Gemma 3 and InternVL image encoders match transformers' `get_image_features` (max abs diff < 1e-5).

Each case builds a tiny transformers VLM (float32, seeded, eager attention) and moves every vision and projector
parameter away from its init (norm weights of 1, zero biases, layer scales, CLS and position embeddings), so that a
misplaced or skipped tensor shows. The model is saved with `save_pretrained`; our module loads the vision and
projector tensors of the saved safetensors and runs on random pixels of 3 images (InternVL: 5 tiles of two images,
compared with transformers run image by image).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from lm_torch.models.vision.clip import LlavaVision
from lm_torch.models.vision.intern_vit import InternVLVision
from lm_torch.models.vision.siglip import Gemma3Vision

TOLERANCE = 1e-5
# bfloat16 (8 mantissa bits) over a few layers: errors of a few percent of the output's scale.
BF16_TOLERANCE = 0.05
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
TEXT = {
    "hidden_size": 48,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,
}
VIT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "patch_size": 14}


def llava_config(tower: str = "clip", layers: int = 3, **overrides: Any) -> LlavaConfig:
    cls = CLIPVisionConfig if tower == "clip" else SiglipVisionConfig
    vision = cls(num_hidden_layers=layers, image_size=28, **VIT)
    kwargs = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", **overrides}
    return LlavaConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**TEXT).to_dict(), **kwargs)


def gemma3_config() -> Gemma3Config:
    vision = SiglipVisionConfig(num_hidden_layers=2, image_size=56, **VIT)
    text = Gemma3TextConfig(head_dim=24, **TEXT)
    return Gemma3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=4)


def internvl_config(layers: int = 2, vision: dict[str, Any] | None = None, **overrides: Any) -> InternVLConfig:
    vision_config = InternVLVisionConfig(num_hidden_layers=layers, image_size=56, **VIT, **(vision or {}))
    return InternVLConfig(
        vision_config=vision_config.to_dict(),
        text_config=Qwen2Config(**TEXT).to_dict(),
        downsample_ratio=0.5,
        **overrides,
    )


def build(cls: type, config: Any, tmp_path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A seeded transformers model with perturbed vision weights, and its saved vision/projector tensors."""
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    return model, {n: t for n, t in saved.items() if n.startswith(VISION_PREFIXES)}


def reference(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' projected image features, [B, tokens, text_hidden] (LLaVA returns a list of images)."""
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def ours(cls: type, config: Any, weights: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Any:
    module = cls(config, dtype=dtype)
    loaded = module.load_weights(weights.items())
    assert loaded == {n for n, _ in module.named_parameters()}
    return module.eval()


def run(module: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(pixel_values)


def pixels(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def test_save_pretrained_writes_unprefixed_vision_names(tmp_path: Path) -> None:
    """transformers 5 saves `vision_tower.*`, `multi_modal_projector.*` and `language_model.*` (no `model.`)."""
    _, weights = build(LlavaForConditionalGeneration, llava_config(), tmp_path)
    assert "vision_tower.embeddings.class_embedding" in weights
    assert "multi_modal_projector.linear_1.weight" in weights
    saved = load_file(tmp_path / "model.safetensors")
    assert not any(n.startswith("model.") for n in saved)


@pytest.mark.parametrize(
    ("tower", "overrides"),
    [
        ("clip", {}),
        ("clip", {"vision_feature_select_strategy": "full", "vision_feature_layer": -1}),
        ("clip", {"vision_feature_layer": [-3, -2]}),
        ("clip", {"vision_feature_layer": [0, 2], "vision_feature_select_strategy": "full"}),
        ("siglip", {}),
    ],
    ids=["default-2", "full-1", "list", "list-full", "siglip"],
)
def test_llava_matches_transformers(tmp_path: Path, tower: str, overrides: dict[str, Any]) -> None:
    config = llava_config(tower, **overrides)
    model, weights = build(LlavaForConditionalGeneration, config, tmp_path)
    module = ours(LlavaVision, config, weights)
    px = pixels(3, 28)
    expected = reference(model, px)
    assert max_diff(run(module, px), expected) < TOLERANCE
    # Layers past the deepest selected one are neither built nor loaded, nor is the post-norm.
    built = max(i % 4 for i in _as_list(config.vision_feature_layer))  # 3 layers: hidden states 0..3
    assert len(module.vision_tower.layers) == built
    assert "vision_tower.post_layernorm.weight" in module.skipped_weights
    skipped_layers = {int(n.split(".")[3]) for n in module.skipped_weights if ".layers." in n}
    assert skipped_layers == set(range(built, 3))


def _as_list(layer: int | list[int]) -> list[int]:
    return [layer] if isinstance(layer, int) else list(layer)


def test_llava_loads_the_original_checkpoint_layout(tmp_path: Path) -> None:
    """Hub checkpoints keep CLIP's `vision_model.` level; transformers 5 in memory adds `model.` in front."""
    config = llava_config()
    model, weights = build(LlavaForConditionalGeneration, config, tmp_path)
    hub = {n.replace("vision_tower.", "vision_tower.vision_model.", 1): t for n, t in weights.items()}
    in_memory = {"model." + n: t for n, t in weights.items()}
    px = pixels(3, 28)
    expected = reference(model, px)
    for layout in (hub, in_memory):
        assert max_diff(run(ours(LlavaVision, config, layout), px), expected) < TOLERANCE


def test_gemma3_matches_transformers(tmp_path: Path) -> None:
    config = gemma3_config()
    model, weights = build(Gemma3ForConditionalGeneration, config, tmp_path)
    module = ours(Gemma3Vision, config, weights)
    px = pixels(3, 56)
    expected = reference(model, px)
    assert expected.shape == (3, 4, TEXT["hidden_size"])
    assert max_diff(run(module, px), expected) < TOLERANCE
    assert any(n.startswith("vision_tower.head.") for n in module.skipped_weights)  # SigLIP's pooling head


@pytest.mark.parametrize(
    ("layers", "vision", "overrides"),
    [
        (2, {}, {}),
        (2, {"use_mean_pooling": False}, {}),
        (3, {"use_mean_pooling": False}, {"vision_feature_layer": -2}),
        (2, {"use_qk_norm": True, "norm_type": "rms_norm", "attention_bias": True}, {}),
    ],
    ids=["default", "final-norm", "layer-2", "qk-norm-rms"],
)
def test_internvl_matches_transformers(
    tmp_path: Path, layers: int, vision: dict[str, Any], overrides: dict[str, Any]
) -> None:
    config = internvl_config(layers, vision, **overrides)
    model, weights = build(InternVLForConditionalGeneration, config, tmp_path)
    module = ours(InternVLVision, config, weights)
    tiles = pixels(5, 56)  # two images: 2 tiles, then 3
    expected = torch.cat([reference(model, tiles[:2]), reference(model, tiles[2:])])
    assert expected.shape == (5, 4, TEXT["hidden_size"])
    assert max_diff(run(module, tiles), expected) < TOLERANCE
    if overrides:
        assert len(module.vision_tower.layers) == 2
        assert any(".layer.2." in n for n in module.skipped_weights)
        assert "vision_tower.layernorm.weight" in module.skipped_weights


def test_load_weights_errors(tmp_path: Path) -> None:
    config = llava_config()
    _, weights = build(LlavaForConditionalGeneration, config, tmp_path)
    module = LlavaVision(config)
    with pytest.raises(ValueError, match=re.escape("vision_tower.encoder.layers.0.mystery")):
        module.load_weights([("vision_tower.encoder.layers.0.mystery", torch.zeros(1))])
    with pytest.raises(ValueError, match=re.escape("language_model.model.norm.weight")):
        module.load_weights([("language_model.model.norm.weight", torch.zeros(48))])
    name = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=re.escape(name) + ".*shape"):
        module.load_weights([(name, torch.zeros(32, 33))])
    with pytest.raises(ValueError, match=re.escape("multi_modal_projector.linear_1.weight") + ".*shape"):
        module.load_weights([("multi_modal_projector.linear_1.weight", torch.zeros(48, 31))])
    with pytest.raises(ValueError, match=r"layers\.7"):
        module.load_weights([(name.replace("layers.0", "layers.7"), weights[name])])
    with pytest.raises(ValueError, match="pixels"):
        module(pixels(1, 56))


def test_load_weights_tensor_by_tensor_and_by_own_names(tmp_path: Path) -> None:
    """Loading one tensor per call fills everything (fused qkv once q, k and v arrived); so do our own names."""
    config = internvl_config()
    model, weights = build(InternVLForConditionalGeneration, config, tmp_path)
    module = InternVLVision(config)
    reports = [module.load_weights([item]) for item in weights.items()]
    loaded = set().union(*reports)
    assert sum(len(r) for r in reports) == len(loaded)  # a fused qkv is reported once, with its last part
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert loaded == set(params)
    copy = InternVLVision(config)
    assert set().union(*(copy.load_weights([item]) for item in params.items())) == set(params)
    px = pixels(2, 56)
    assert max_diff(run(copy.eval(), px), reference(model, px)) < TOLERANCE


def test_internvl_rejects_unsupported_configs() -> None:
    with pytest.raises(ValueError, match="only default"):
        InternVLVision(internvl_config(vision_feature_select_strategy="full"))


@pytest.mark.parametrize("family", ["llava", "gemma3", "internvl"])
def test_bfloat16_close_to_float32(tmp_path: Path, family: str) -> None:
    cls, hf_cls, config, size = {
        "llava": (LlavaVision, LlavaForConditionalGeneration, llava_config(), 28),
        "gemma3": (Gemma3Vision, Gemma3ForConditionalGeneration, gemma3_config(), 56),
        "internvl": (InternVLVision, InternVLForConditionalGeneration, internvl_config(), 56),
    }[family]
    _, weights = build(hf_cls, config, tmp_path)
    px = pixels(3, size)
    full = run(ours(cls, config, weights), px)
    half = run(ours(cls, config, weights, torch.bfloat16), px)
    assert half.dtype == torch.bfloat16
    assert max_diff(half, full) < BF16_TOLERANCE * max(1.0, full.abs().max().item())
