"""Qwen2-VL and Qwen2.5-VL: the Qwen2 language model with M-RoPE, and the Qwen vision tower.

Positions (`mrope_positions`): text tokens count up from 0 with equal temporal, height and width positions; the
placeholder tokens of an image or video with merged grid (t, h, w) starting at position p take
(p + t_index * interval, p + h_index, p + w_index), and the text after it resumes at p + max(h, w) (transformers'
`get_rope_index`). Generated tokens take position index + `delta`, where delta = (largest prompt position + 1) -
prompt length: the three positions are equal there, so decode steps use plain one-dimensional rotary (and CUDA
graphs) at the shifted position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lm_torch.layers.context import BuildContext
from lm_torch.models.base import CausalLM
from lm_torch.models.llama import LlamaForCausalLM
from lm_torch.models.vision.qwen2_vl import Qwen2VisionTower
from lm_torch.models.vlm import VisionLanguageModel
from lm_torch.multimodal import MMItem


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    """Also Qwen2_5_VLForConditionalGeneration (the tower reads its version from the vision config)."""

    vision_prefixes = ("model.visual.", "visual.")

    def build_language_model(self, config: Any, max_positions: int, ctx: BuildContext) -> CausalLM:
        """The Qwen2 text model, its rotary multimodal (the text config's `mrope_section`)."""
        return LlamaForCausalLM(config, max_positions, ctx)

    def build_vision(self, config: Any, ctx: BuildContext) -> nn.Module:
        """The Qwen vision tower with its patch merger (replicated on every rank)."""
        return Qwen2VisionTower(config.vision_config, dtype=ctx.dtype, device=ctx.device)

    @property
    def merge_size(self) -> int:
        """Patches merged per side into one language-model token."""
        return int(self.multimodal_config.vision_config.spatial_merge_size)

    def encode(self, items: Sequence[MMItem]) -> list[torch.Tensor]:
        """Each item's rows of one tower call over all of them (patches concatenated in item order)."""
        device = next(self.vision.parameters()).device
        grid = torch.tensor([list(item.meta["grid_thw"]) for item in items], dtype=torch.int64)
        pixels = torch.cat([torch.as_tensor(item.pixel_values) for item in items]).to(device, non_blocking=True)
        out = self.vision(pixels, grid.to(device))  # [sum t*h*w / merge**2, hidden]
        return list(Qwen2VisionTower.split_per_item(out, grid.to(device), self.merge_size))

    def mrope_positions(self, num_prompt_tokens: int, items: Sequence[MMItem]) -> tuple[np.ndarray, int]:
        """([3, num_prompt_tokens] int64 positions of the prompt, delta of the generated tokens' positions)."""
        merge = self.merge_size
        vision = self.multimodal_config.vision_config
        tokens_per_second = float(getattr(vision, "tokens_per_second", 1) or 1)
        versioned = hasattr(vision, "fullatt_block_indexes")  # Qwen2.5-VL spaces video frames in time
        positions = np.empty((3, num_prompt_tokens), dtype=np.int64)
        cursor, current = 0, 0  # next prompt index to fill, the position it starts at
        for item in items:
            text = item.offset - cursor
            positions[:, cursor : item.offset] = np.arange(current, current + text)
            current += text
            t, h, w = (int(v) for v in item.meta["grid_thw"])
            h, w = h // merge, w // merge
            interval = 1.0
            if item.modality == "video" and versioned:
                interval = tokens_per_second * float(item.meta.get("second_per_grid_t", 1.0))
            temporal = (np.arange(t) * interval).astype(np.int64) + current
            grid_t, grid_h, grid_w = np.meshgrid(
                temporal, np.arange(h) + current, np.arange(w) + current, indexing="ij"
            )
            if t * h * w != item.length:
                raise ValueError(f"an item of grid {item.meta['grid_thw']} fills {t * h * w} tokens, not {item.length}")
            positions[:, item.offset : item.end] = np.stack([grid_t.ravel(), grid_h.ravel(), grid_w.ravel()])
            current += max(h, w)
            cursor = item.end
        positions[:, cursor:] = np.arange(current, current + num_prompt_tokens - cursor)
        delta = int(positions.max()) + 1 - num_prompt_tokens if num_prompt_tokens else 0
        return positions, delta
