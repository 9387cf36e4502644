"""InternVL (transformers-native InternVL2.5/3 checkpoints, model_type "internvl"): a Qwen2 or Llama language model
and the InternViT tower with pixel shuffle and projector (`InternVLVision`).

An image is one item of `meta["num_tiles"]` tiles `(tiles, 3, S, S)` at the tower's `image_size` S (its grid tiles,
then a thumbnail when there is more than one); it fills `tokens_per_tile * tiles` placeholder tokens, tile after tile
in order. `encode` runs the tower once over the tiles of all the step's images concatenated, each tile on its own.

Checkpoint names are LLaVA's (`LlavaForConditionalGeneration.route_weight`): the tower and projector tensors keep
their `vision_tower.` / `multi_modal_projector.` prefix, and the word embeddings are tied as the whole config says
(InternVLConfig's `tie_word_embeddings`, True unless the checkpoint says otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lm_torch.layers.context import BuildContext
from lm_torch.models.llava import LlavaForConditionalGeneration
from lm_torch.models.vision.intern_vit import InternVLVision
from lm_torch.multimodal import MMItem


class InternVLForConditionalGeneration(LlavaForConditionalGeneration):
    """InternVL: LLaVA's checkpoint layout with InternViT tiles (see the module docstring)."""

    text_model_types = ("qwen2", "llama")

    def build_vision(self, config: Any, ctx: BuildContext) -> nn.Module:
        """InternViT, pixel shuffle and projector (replicated on every rank)."""
        return InternVLVision(config, dtype=ctx.dtype)

    def encode(self, items: Sequence[MMItem]) -> list[torch.Tensor]:
        """Each image's features [tiles * tokens_per_tile, hidden]: one tower call over every item's tiles."""
        device = next(self.vision.parameters()).device
        tiles = [torch.as_tensor(item.pixel_values) for item in items]  # each [item tiles, 3, S, S]
        for item, pixels in zip(items, tiles, strict=True):
            declared = int(item.meta.get("num_tiles", pixels.shape[0]))
            if pixels.dim() != 4 or pixels.shape[0] != declared:
                raise ValueError(f"an InternVL image of {declared} tiles has pixel values {tuple(pixels.shape)}")
        features = self.vision(torch.cat(tiles).to(device, non_blocking=True))  # [all tiles, tokens_per_tile, hidden]
        per_item = features.split([pixels.shape[0] for pixels in tiles])  # each [item tiles, tokens_per_tile, hidden]
        out = [f.reshape(-1, f.shape[-1]) for f in per_item]  # each [item tiles * tokens_per_tile, hidden]
        for item, embeds in zip(items, out, strict=True):
            if embeds.shape[0] != item.length:
                raise ValueError(f"an image gives {embeds.shape[0]} features, its span holds {item.length} tokens")
        return out
