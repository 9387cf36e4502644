"""`VisionInputs`: a model's request media, from the sources a request names to the engine's multimodal items.

lm-core's pipeline calls it for a prompt that holds images or videos: `process` loads every source under the
`MediaPolicy` (refusing the request as a whole past the policy's per-prompt limit) and preprocesses it with the
family's processor; `expand_prompt` turns the chat template's markers into the placeholder tokens; `items` finds
each item's placeholders in the token ids and returns the `EngineRequest.multimodal` entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lm_core.multimodal import MediaRef, MultimodalItem
from lm_vl.media import MediaError, MediaPolicy, load_image, load_video
from lm_vl.processors.base import VisionItem, VisionProcessor, load_processor, placeholder_spans


class VisionInputs:
    """Media loading and preprocessing for the model at `model_path` (its config.json names the family)."""

    def __init__(
        self,
        model_path: str | Path,
        policy: MediaPolicy | None = None,
        device: torch.device | str | None = None,
        video_frames: int = 8,
    ) -> None:
        """`device`: where resizing and normalisation run (default: the CPU); `video_frames`: frames sampled from a
        video file or frame list."""
        self.processor: VisionProcessor = load_processor(model_path)
        self.policy = policy if policy is not None else MediaPolicy()
        self.device = device
        self.video_frames = video_frames

    def process(self, refs: Sequence[MediaRef]) -> list[VisionItem]:
        """Load and preprocess each of a request's media, in order; MediaError (400/422) names the field."""
        limit = self.policy.limit_per_prompt
        if len(refs) > limit:
            raise MediaError(
                f"the prompt holds {len(refs)} images and videos, more than the limit of {limit}",
                code="too_many_items",
                param=refs[limit].where,
            )
        for modality, most in (self.policy.limit_per_modality or {}).items():
            mine = [ref for ref in refs if ref.modality == modality]
            if len(mine) > most:
                raise MediaError(
                    f"the prompt holds {len(mine)} {modality}s, more than the limit of {most}",
                    code="too_many_items",
                    param=mine[most].where,
                )
        items: list[VisionItem] = []
        for ref in refs:
            try:
                if ref.modality == "video":
                    frames = load_video(ref.source, self.policy, num_frames=self.video_frames)
                    items.append(self.processor.preprocess_video(frames, self.device))
                else:
                    items.append(self.processor.preprocess(load_image(ref.source, self.policy), self.device))
            except MediaError as error:
                status = error.status_code
                raise MediaError(error.message, code=error.code, status_code=status, param=ref.where) from None
            except ValueError as error:  # the family cannot take this item (a video for an image-only model, ...)
                raise MediaError(f"{ref.where}: {error}", code="unsupported_media", param=ref.where) from None
        return items

    def expand_prompt(self, text: str, items: list[VisionItem]) -> str:
        """The rendered prompt with each marker replaced by its item's placeholder tokens."""
        return self.processor.expand_prompt(text, items)

    def items(
        self, token_ids: list[int], items: list[VisionItem], token_to_id: Callable[[str], int | None]
    ) -> list[dict[str, Any]]:
        """The `EngineRequest.multimodal` entries of `items` in the tokenized prompt `token_ids`."""
        spans = placeholder_spans(token_ids, items, self.processor.placeholder_ids(token_to_id))
        return [
            MultimodalItem(item.modality, offset, length, item.pixel_values, item.meta, item.content_hash).as_dict()
            for item, (offset, length) in zip(items, spans, strict=True)
        ]
