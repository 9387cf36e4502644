"""InternVL's image encoder (transformers-native layout): InternViT, pixel shuffle and the projector MLP.

`InternVLVision.forward(pixel_values)` equals transformers' `InternVLModel.get_image_features(pixel_values)` (its
`pooler_output`) for a batch of tiles, each encoded on its own (tiles of several images simply concatenate):
- InternViT: CLS token + patches + absolute positions, pre-norm layers (LayerNorm or RMSNorm, optional qk-norm over
  the whole q/k vector, layer scale `lambda_1`/`lambda_2`);
- the hidden state `vision_feature_layer`: -1 is the tower's `last_hidden_state` (after its final LayerNorm when
  `use_mean_pooling` is off), any other index the raw output of that layer (transformers' `hidden_states`);
- the CLS token is dropped ("default" strategy, the only one whose features form a square grid);
- pixel shuffle with f = 1 / downsample_ratio: each f x f block of the g x g patch grid becomes one token whose
  features are the block's patches concatenated in (row offset, column offset) order -> (g/f)^2 tokens of f*f*D;
- linear_2(act(linear_1(LayerNorm(x)))).

Invariants: only the layers up to the selected one are built and run; the weights of the others, of the unused final
norm and of the mask token are skipped (`skipped_weights`). Tiles must have the tower's `image_size`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lm_torch.models.vision.clip import LlavaProjector, feature_layers
from lm_torch.models.vision.vit import Rule, ViTEncoder, ViTSpec, load_by_rules, pair

_LAYER = r"vision_tower\.encoder\.layer\.(\d+)\."
_TOWER = r"vision_tower.layers.\1."
# Checkpoint names of transformers' InternVLVisionModel -> ours (None: never used at inference).
INTERN_VIT_RULES: tuple[Rule, ...] = (
    (r"vision_tower\.embeddings\.cls_token", "vision_tower.cls"),
    (r"vision_tower\.embeddings\.position_embeddings", "vision_tower.pos"),
    (r"vision_tower\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"vision_tower.patch.\1"),
    (r"vision_tower\.embeddings\.mask_token", None),
    (r"vision_tower\.layernorm\.(weight|bias)", r"vision_tower.post_norm.\1"),
    (_LAYER + r"attention\.([qkv])_proj\.(weight|bias)", _TOWER + r"attn.\2.\3"),
    (_LAYER + r"attention\.projection_layer\.(weight|bias)", _TOWER + r"attn.proj.\2"),
    (_LAYER + r"attention\.([qk])_norm\.weight", _TOWER + r"attn.\2_norm.weight"),
    (_LAYER + r"layernorm_before\.(weight|bias)", _TOWER + r"norm1.\2"),
    (_LAYER + r"layernorm_after\.(weight|bias)", _TOWER + r"norm2.\2"),
    (_LAYER + r"lambda_([12])", _TOWER + r"ls\2"),
    (_LAYER + r"mlp\.(fc[12])\.(weight|bias)", _TOWER + r"\2.\3"),
    # The projector's linears sit under `mlp.` here (the module LLaVA's projector is), at its top in the checkpoint.
    (r"multi_modal_projector\.(linear_[12])\.(weight|bias)", r"multi_modal_projector.mlp.\1.\2"),
)


def intern_vit_spec(vision_config: Any, num_layers: int, post_norm: bool) -> ViTSpec:
    """The encoder of a transformers InternVLVisionConfig, built up to `num_layers` layers."""
    if vision_config.norm_type not in ("layer_norm", "rms_norm"):
        raise ValueError(f"norm_type {vision_config.norm_type!r} is not supported (layer_norm, rms_norm)")
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
        rms_norm=vision_config.norm_type == "rms_norm",
        cls_token=True,
        position_embedding=vision_config.use_absolute_position_embeddings,
        qkv_bias=vision_config.attention_bias,
        qk_norm=vision_config.use_qk_norm,
        layer_scale=True,
        post_norm=post_norm,
    )


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x [B, g*g, D] (row-major grid) -> [B, (g/f)^2, f*f*D], each token an f x f block (row offset, column offset)."""
    b, n, d = x.shape
    g = int(n**0.5)
    if g * g != n or g % factor:
        raise ValueError(f"{n} patches do not form a square grid divisible by {factor}")
    h = g // factor
    blocks = x.reshape(b, h, factor, h, factor, d).permute(0, 1, 3, 2, 4, 5)  # [B, h, h, f_row, f_col, D]
    return blocks.reshape(b, h * h, factor * factor * d)


class InternVLProjector(nn.Module):
    """linear_2(act(linear_1(LayerNorm(x)))): shuffled features [..., f*f*Dv] -> [..., text_hidden]."""

    def __init__(self, in_features: int, text_hidden: int, act: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features, dtype=dtype)  # transformers keeps LayerNorm's default eps here
        self.mlp = LlavaProjector(in_features, text_hidden, act, True, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., text_hidden]."""
        return self.mlp(self.layer_norm(x))


class InternVLVision(nn.Module):
    """pixel_values [tiles, 3, H, W] -> image embeddings [tiles, tokens_per_tile, text_hidden] of an InternVL model."""

    def __init__(self, config: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        vision = config.vision_config
        if config.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}: only default")
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer {config.vision_feature_layer!r}: InternVL selects one layer")
        (self.layer,) = feature_layers(config.vision_feature_layer, vision.num_hidden_layers)
        # -1 means transformers' last_hidden_state, which has the final norm when mean pooling is off.
        self.final_norm = config.vision_feature_layer == -1 and not vision.use_mean_pooling
        self.factor = round(1 / config.downsample_ratio)
        if abs(self.factor * config.downsample_ratio - 1) > 1e-6:
            raise ValueError(f"downsample_ratio {config.downsample_ratio} is not 1 / an integer")
        self.vision_tower = ViTEncoder(intern_vit_spec(vision, self.layer, self.final_norm), dtype)
        in_features = vision.hidden_size * self.factor**2
        self.multi_modal_projector = InternVLProjector(
            in_features, config.text_config.hidden_size, config.projector_hidden_act, dtype
        )
        self.skipped_weights: set[str] = set()
        self._qkv_parts: dict[str, set[str]] = {}  # q/k/v checkpoint tensors seen per fused qkv

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, H, W] -> [tiles, (g/f)^2, text_hidden]."""
        (x,) = self.vision_tower(pixel_values, (self.layer,))  # [tiles, 1 + g*g, Dv]
        if self.vision_tower.post_norm is not None:
            x = self.vision_tower.post_norm(x)
        x = pixel_shuffle(x[:, 1:], self.factor)  # [tiles, (g/f)^2, f*f*Dv]
        return self.multi_modal_projector(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load `vision_tower.*`/`multi_modal_projector.*` tensors; returns our names filled (see `skipped_weights`)."""
        unused = () if self.final_norm else ("vision_tower.post_norm.",)
        loaded, skipped = load_by_rules(
            self, self.vision_tower, weights, INTERN_VIT_RULES, unused, qkv_parts=self._qkv_parts
        )
        self.skipped_weights |= skipped
        return loaded
