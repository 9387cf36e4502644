"""LLaVA's image encoder: a CLIP (or SigLIP) vision tower and the two-layer `multi_modal_projector` MLP.

`LlavaVision.forward(pixel_values)` equals transformers' `LlavaModel.get_image_features(pixel_values)` (its
`pooler_output`, stacked): the tower's hidden state `vision_feature_layer` (transformers' `hidden_states` indexing:
0 is the embeddings after CLIP's pre-norm, negative counts from the last layer's output), or the hidden states of a
list of layers concatenated along the features; minus the first token under the "default" select strategy (CLIP's
CLS; SigLIP has none, but transformers drops its first patch all the same), kept under "full"; then
linear_2(act(linear_1(x))).

Invariants: only the layers up to the deepest selected one are built and run; the tower's `post_layernorm` (CLIP:
of the pooled CLS; SigLIP: of the last layer) never reaches the features, so it and the layers not built are
skipped when loading (`skipped_weights`). Images must have the tower's `image_size` (no position interpolation).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lm_torch.models.vision.vit import Rule, ViTEncoder, ViTSpec, activation, load_by_rules, pair

# Checkpoint names of a CLIP or SigLIP vision tower (after `normalize_name`) -> ours (None: never used).
CLIP_RULES: tuple[Rule, ...] = (
    (r"vision_tower\.embeddings\.patch_embedding\.(weight|bias)", r"vision_tower.patch.\1"),
    (r"vision_tower\.embeddings\.class_embedding", "vision_tower.cls"),
    (r"vision_tower\.embeddings\.position_embedding\.weight", "vision_tower.pos"),
    (r"vision_tower\.pre_layrnorm\.(weight|bias)", r"vision_tower.pre_norm.\1"),
    (r"vision_tower\.post_layernorm\.(weight|bias)", r"vision_tower.post_norm.\1"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"vision_tower.layers.\1.norm\2.\3"),
    (
        r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)",
        r"vision_tower.layers.\1.attn.\2.\3",
    ),
    (
        r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
        r"vision_tower.layers.\1.attn.proj.\2",
    ),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vision_tower.layers.\1.\2.\3"),
    (r"vision_tower\.head\..*", None),  # SigLIP's attention-pooling head
)
_TOWER_TYPES = ("clip_vision_model", "siglip_vision_model")


def clip_spec(vision_config: Any, num_layers: int, post_norm: bool) -> ViTSpec:
    """The encoder of a transformers CLIPVisionConfig or SiglipVisionConfig, built up to `num_layers` layers."""
    is_clip = vision_config.model_type == "clip_vision_model"
    return ViTSpec(
        hidden_size=vision_config.hidden_size,
        num_heads=vision_config.num_attention_heads,
        intermediate_size=vision_config.intermediate_size,
        num_layers=num_layers,
        total_layers=vision_config.num_hidden_layers,
        image_size=pair(vision_config.image_size),
        patch_size=pair(vision_config.patch_size),
        act=vision_config.hidden_act,
        norm_eps=vision_config.layer_norm_eps,
        num_channels=vision_config.num_channels,
        cls_token=is_clip,
        patch_bias=not is_clip,
        pre_norm=is_clip,
        post_norm=post_norm,
    )


def feature_layers(layer: int | Iterable[int], total_layers: int) -> tuple[int, ...]:
    """Hidden-state numbers (0..total_layers) of transformers' `vision_feature_layer`, negatives resolved."""
    layers = (layer,) if isinstance(layer, int) else tuple(layer)
    count = total_layers + 1  # the embeddings, then every layer's output
    if not layers or any(not -count <= i < count for i in layers):
        raise ValueError(f"vision_feature_layer {layer!r} is out of range for {total_layers} layers")
    return tuple(i % count for i in layers)


class LlavaVision(nn.Module):
    """pixel_values [B, 3, H, W] -> image embeddings [B, tokens, text_hidden] of a LLaVA model (see the module doc)."""

    def __init__(self, config: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        vision = config.vision_config
        if vision.model_type not in _TOWER_TYPES:
            raise ValueError(f"LLaVA vision tower {vision.model_type!r} is not supported ({', '.join(_TOWER_TYPES)})")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported (default, full)")
        self.drop_first = strategy == "default"
        self.layers = feature_layers(config.vision_feature_layer, vision.num_hidden_layers)
        self.vision_tower = ViTEncoder(clip_spec(vision, max(self.layers), post_norm=False), dtype)
        text_hidden = config.text_config.hidden_size
        bias = getattr(config, "multimodal_projector_bias", True)
        self.multi_modal_projector = LlavaProjector(
            vision.hidden_size * len(self.layers), text_hidden, config.projector_hidden_act, bias, dtype
        )
        self.skipped_weights: set[str] = set()
        self._qkv_parts: dict[str, set[str]] = {}  # q/k/v checkpoint tensors seen per fused qkv

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> [B, tokens, text_hidden]."""
        states = self.vision_tower(pixel_values, self.layers)  # each [B, 1 + N, D] (CLIP) or [B, N, D] (SigLIP)
        if self.drop_first:
            states = [s[:, 1:] for s in states]
        features = states[0] if len(states) == 1 else torch.cat(states, dim=-1)  # [B, tokens, D * len(layers)]
        return self.multi_modal_projector(features)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load `vision_tower.*`/`multi_modal_projector.*` tensors; returns our names filled (see `skipped_weights`)."""
        loaded, skipped = load_by_rules(
            self, self.vision_tower, weights, CLIP_RULES, ("vision_tower.post_norm.",), qkv_parts=self._qkv_parts
        )
        self.skipped_weights |= skipped
        return loaded


class LlavaProjector(nn.Module):
    """linear_2(act(linear_1(x))): vision features [..., in_features] -> [..., text_hidden]."""

    def __init__(self, in_features: int, text_hidden: int, act: str, bias: bool, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, text_hidden, bias=bias, dtype=dtype)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., text_hidden]."""
        return self.linear_2(self.act(self.linear_1(x)))
