"""Gemma 3's image encoder: a SigLIP vision tower and Gemma 3's multi-modal projector.

`Gemma3Vision.forward(pixel_values)` equals transformers' `Gemma3Model.get_image_features(pixel_values)` (its
`pooler_output`): every SigLIP layer runs, then `post_layernorm`; the patch grid (p x p, p = image_size //
patch_size) is average-pooled in k x k blocks down to t x t = `mm_tokens_per_image` tokens (k = p // t), each
normalised by a Gemma RMSNorm (x / rms(x) * (1 + w), in float32) and multiplied by `mm_input_projection_weight`
[vision_hidden, text_hidden] (stored transposed to a Linear's weight).

Invariants: tokens stay in row-major order of the pooled grid; SigLIP has no CLS token; its attention-pooling
`head`, when the checkpoint has one, is never run and its weights are skipped (`skipped_weights`). Images must have
the tower's `image_size`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lm_torch.models.vision.clip import CLIP_RULES, clip_spec
from lm_torch.models.vision.vit import RMSNorm, ViTEncoder, load_by_rules


class Gemma3Projector(nn.Module):
    """Average-pool to `mm_tokens_per_image`, Gemma RMSNorm, project: [B, p*p, Dv] -> [B, t*t, Dt]."""

    def __init__(self, config: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        vision = config.vision_config
        self.patches_per_side = vision.image_size // vision.patch_size
        self.tokens_per_side = int(config.mm_tokens_per_image**0.5)
        if self.tokens_per_side**2 != config.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image {config.mm_tokens_per_image} is not a square")
        self.kernel = self.patches_per_side // self.tokens_per_side
        self.mm_soft_emb_norm = RMSNorm(vision.hidden_size, vision.layer_norm_eps, offset=1.0, dtype=dtype)
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(vision.hidden_size, config.text_config.hidden_size, dtype=dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, p*p, Dv] (row-major patches) -> [B, t*t, Dt]."""
        b, _, d = x.shape
        p, t, k = self.patches_per_side, self.tokens_per_side, self.kernel
        grid = x.transpose(1, 2).reshape(b, d, p, p)  # [B, Dv, p, p]
        pooled = torch.nn.functional.avg_pool2d(grid, kernel_size=k, stride=k)  # [B, Dv, t, t]
        tokens = pooled.reshape(b, d, t * t).transpose(1, 2)  # [B, t*t, Dv]
        return (self.mm_soft_emb_norm(tokens) @ self.mm_input_projection_weight).to(x.dtype)


class Gemma3Vision(nn.Module):
    """pixel_values [B, 3, H, W] -> image embeddings [B, mm_tokens_per_image, text_hidden] of a Gemma 3 model."""

    def __init__(self, config: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        vision = config.vision_config
        if vision.model_type != "siglip_vision_model":
            raise ValueError(f"Gemma 3 vision tower {vision.model_type!r} is not supported (siglip_vision_model)")
        self.vision_tower = ViTEncoder(clip_spec(vision, vision.num_hidden_layers, post_norm=True), dtype)
        self.multi_modal_projector = Gemma3Projector(config, dtype)
        self.skipped_weights: set[str] = set()
        self._qkv_parts: dict[str, set[str]] = {}  # q/k/v checkpoint tensors seen per fused qkv

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> [B, mm_tokens_per_image, text_hidden]."""
        (last,) = self.vision_tower(pixel_values)  # [B, p*p, Dv]
        assert self.vision_tower.post_norm is not None
        return self.multi_modal_projector(self.vision_tower.post_norm(last))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load `vision_tower.*`/`multi_modal_projector.*` tensors; returns our names filled (see `skipped_weights`)."""
        loaded, skipped = load_by_rules(self, self.vision_tower, weights, CLIP_RULES, qkv_parts=self._qkv_parts)
        self.skipped_weights |= skipped
        return loaded
