"""Gemma 3 as a vision-language model: the Gemma 3 language model (`models.gemma`) and its SigLIP tower with the
Gemma 3 projector (`models.vision.siglip.Gemma3Vision`), equal to transformers' `Gemma3ForConditionalGeneration`.

Invariants, each as transformers has them:
- token embeddings are scaled by sqrt(hidden_size) first; an image's features (`mm_tokens_per_image` rows from the
  projector) then replace its placeholder rows unscaled;
- during prefill an image's placeholder tokens attend each other bidirectionally (`bidirectional_images`: the runner
  gives them the span's end as `StepMetadata.key_limits`); every other token attends causally, and sliding-window
  layers still cut each token's keys to its window (transformers' AND(window, OR(causal, same image)));
- positions are plain one-dimensional ones (no M-RoPE); steps without images take the text model's path unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lm_torch.layers.context import BuildContext
from lm_torch.models.base import CausalLM
from lm_torch.models.gemma import _VISION_PREFIXES, GemmaForCausalLM
from lm_torch.models.vision.siglip import Gemma3Vision
from lm_torch.models.vlm import VisionLanguageModel
from lm_torch.multimodal import MMItem


class Gemma3ForConditionalGeneration(VisionLanguageModel):
    """Gemma 3 (4B and larger): images through SigLIP and the projector into the Gemma 3 language model."""

    bidirectional_images = True

    def build_language_model(self, config: Any, max_positions: int, ctx: BuildContext) -> CausalLM:
        """The Gemma 3 text model (from the checkpoint's text_config)."""
        return GemmaForCausalLM(config, max_positions, ctx)

    def build_vision(self, config: Any, ctx: BuildContext) -> nn.Module:
        """SigLIP and the Gemma 3 projector (replicated on every tensor-parallel rank)."""
        return Gemma3Vision(config, dtype=ctx.dtype)

    def encode(self, items: Sequence[MMItem]) -> list[torch.Tensor]:
        """Each image's [mm_tokens_per_image, hidden] features, from one tower call over all of them."""
        device = next(self.vision.parameters()).device
        pixels = torch.cat([torch.as_tensor(item.pixel_values) for item in items])  # [B, 3, H, W]
        out = self.vision(pixels.to(device, non_blocking=True))  # [B, mm_tokens_per_image, hidden]
        return list(out.unbind(0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        """Gemma's scaled token embeddings (image features are written over them unscaled)."""
        assert isinstance(self.language_model, GemmaForCausalLM)
        return self.language_model.embed_input_ids(input_ids)

    def route_weight(self, name: str) -> tuple[str, str]:
        """The tower's and projector's tensors keep their names (`Gemma3Vision.load_weights` reads them); the rest
        as `VisionLanguageModel.route_weight`."""
        if name.startswith(_VISION_PREFIXES):
            return "vision", name
        return super().route_weight(name)
