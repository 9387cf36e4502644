"""LLaVA (llava-1.5 and checkpoints of its layout): a Llama-family language model and a CLIP or SigLIP tower.

Each image is one `(1, 3, H, W)` item at the tower's `image_size`; its features (`LlavaVision`: selected hidden
states, CLS dropped under the "default" strategy, then the projector MLP) fill its `item.length` placeholder tokens
in order. `encode` runs the tower once over all the step's images.

Checkpoint names, all accepted: transformers 5's `save_pretrained` (`language_model.model.*`,
`language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`), the hub's current layout
(`model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`, `model.multi_modal_projector.*`) and the
original llava-hf one (`vision_tower.vision_model.*`). Tower and projector tensors reach `LlavaVision.load_weights`
with their `vision_tower.` / `multi_modal_projector.` prefix kept (it maps those names itself).

Invariant: the word embeddings are tied as the whole config says (`tie_word_embeddings` of the LLaVA config, which
transformers ties by), not as the text config alone does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lm_torch.layers.context import BuildContext
from lm_torch.models.base import CausalLM
from lm_torch.models.llama import LlamaForCausalLM
from lm_torch.models.vision.clip import LlavaVision
from lm_torch.models.vlm import VisionLanguageModel
from lm_torch.multimodal import MMItem

# Checkpoint prefixes (after an optional leading "model.") of the tower and projector tensors.
TOWER_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def build_text_model(
    config: Any, max_positions: int, ctx: BuildContext, family: str, model_types: tuple[str, ...]
) -> CausalLM:
    """Our model for a multimodal checkpoint's text config (`LlamaForCausalLM` for `model_types`), its embeddings
    tied as the whole config (`config.multimodal_config`) says."""
    if config.model_type not in model_types:
        supported = ", ".join(model_types)
        raise ValueError(f"{family} with a {config.model_type!r} language model is not supported ({supported})")
    config.tie_word_embeddings = bool(
        getattr(config.multimodal_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    )
    return LlamaForCausalLM(config, max_positions, ctx)


class LlavaForConditionalGeneration(VisionLanguageModel):
    """LLaVA-1.5: a Llama, Mistral or Qwen2 language model with `LlavaVision` (see the module docstring)."""

    #: text_config model types served by our `LlamaForCausalLM`.
    text_model_types: tuple[str, ...] = ("llama", "mistral", "qwen2")

    def build_language_model(self, config: Any, max_positions: int, ctx: BuildContext) -> CausalLM:
        """The Llama-family text model of the checkpoint's text_config."""
        return build_text_model(config, max_positions, ctx, type(self).__name__, self.text_model_types)

    def build_vision(self, config: Any, ctx: BuildContext) -> nn.Module:
        """The CLIP / SigLIP tower and projector (replicated on every rank)."""
        return LlavaVision(config, dtype=ctx.dtype)

    def encode(self, items: Sequence[MMItem]) -> list[torch.Tensor]:
        """Each image's features [item.length, hidden]: one tower call over the images stacked in item order."""
        device = next(self.vision.parameters()).device
        pixels = torch.cat([torch.as_tensor(item.pixel_values) for item in items])  # [images, 3, H, W]
        if pixels.shape[0] != len(items):
            raise ValueError(f"{len(items)} images hold {pixels.shape[0]} pixel arrays: each must be (1, 3, H, W)")
        features = self.vision(pixels.to(device, non_blocking=True))  # [images, tokens, hidden]
        for item in items:
            if item.length != features.shape[1]:
                raise ValueError(f"an image gives {features.shape[1]} features, its span holds {item.length} tokens")
        return list(features.unbind(0))

    def route_weight(self, name: str) -> tuple[str, str]:
        """Tower and projector tensors go to the vision part under their own prefix; the rest as the base routes."""
        local = name.removeprefix("model.")
        if local.startswith(TOWER_PREFIXES):
            return "vision", local
        return super().route_weight(name)
