"""`VisionLanguageModel`: one of our language models with a vision tower whose output fills placeholder tokens.

The language model is the family's text model (built from the checkpoint's `text_config`) and keeps its paged
attention, rotary and sharding; the tower (and its projector) is replicated on every tensor-parallel rank and runs
outside the paged cache. A step that computes an item's placeholder span gets the item's embeddings (from
`encode`, or the runner's encoder cache) in `MultimodalStep`; `forward` writes them over the token embeddings of
those rows before the first decoder layer. Steps without images take the text model's path unchanged (CUDA graphs
included). A model whose images attend bidirectionally within themselves (`bidirectional_images`: Gemma 3) gets, in
steps that compute an image, the attention rule `StepMetadata.key_limits` from the runner.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lm_torch.distributed.sharding import materialize
from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.models.base import CausalLM
from lm_torch.multimodal import MMItem


@dataclass
class MultimodalStep:
    """A step's image features: `rows` [n] int64, the step's token rows (in the flattened batch) of placeholder
    tokens; `embeds` [n, hidden] their features, in the order of `rows`. `key_limits` [num_tokens] int32, for a model
    with `bidirectional_images`: the step's `StepMetadata.key_limits` (an image's rows see up to the span's end)."""

    rows: torch.Tensor
    embeds: torch.Tensor
    key_limits: torch.Tensor | None = None


class VisionLanguageModel(CausalLM):
    """A text model (`language_model`) and a vision tower (`vision`). Subclasses build both (`build_language_model`,
    `build_vision`), encode items (`encode`) and map checkpoint names (`route_weight`)."""

    #: Prefixes of the vision tower's checkpoint tensors (stripped before the tower's own `load_weights`).
    vision_prefixes: tuple[str, ...] = ()
    #: Prefixes of the language model's tensors that name its modules `model.*` once replaced by "model.".
    language_prefixes: tuple[str, ...] = ("model.language_model.", "language_model.model.")
    #: Whether an item's placeholder tokens attend each other bidirectionally in prefill (causal elsewhere).
    bidirectional_images: bool = False

    def __init__(self, config: Any, max_positions: int, ctx: BuildContext | None = None) -> None:
        ctx = context_or_current(ctx)
        super().__init__(config, ctx)
        self.multimodal_config = config.multimodal_config
        self.language_model = self.build_language_model(config, max_positions, ctx)
        self.vision = self.build_vision(self.multimodal_config, ctx)
        # The text model's modules, under the names the runner and `CausalLM` use.
        self.embed_tokens = self.language_model.embed_tokens
        self.lm_head = self.language_model.lm_head
        self.layers = self.language_model.layers

    def build_language_model(self, config: Any, max_positions: int, ctx: BuildContext) -> CausalLM:
        """The text model, built from `config` (the checkpoint's text_config)."""
        raise NotImplementedError

    def build_vision(self, config: Any, ctx: BuildContext) -> nn.Module:
        """The vision tower and projector, from the whole multimodal config."""
        raise NotImplementedError

    def encode(self, items: Sequence[MMItem]) -> list[torch.Tensor]:
        """Each item's features [item.length, hidden] in the language model's dtype: one batched tower call."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[Any],
        attn: Any,
        mm: MultimodalStep | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """The text model's forward pass with `mm`'s features over the placeholder rows' token embeddings."""
        if mm is None:
            return self.language_model(input_ids, positions, kv_caches, attn)
        embeds = self.embed_input_ids(input_ids)  # [num_tokens, hidden]
        embeds = embeds.index_copy(0, mm.rows, mm.embeds.to(embeds.dtype))
        return self.language_model(input_ids, positions, kv_caches, attn, inputs_embeds=embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        """The token embeddings the text model's first layer takes (image features replace some rows as they are)."""
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor, for_argmax: bool = False) -> torch.Tensor:
        """The text model's logits (see `CausalLM.compute_logits`)."""
        return self.language_model.compute_logits(hidden, for_argmax)

    def route_weight(self, name: str) -> tuple[str, str]:
        """("vision" | "language", the name the part's `load_weights` takes) for a checkpoint tensor name."""
        for prefix in self.vision_prefixes:
            if name.startswith(prefix):
                return "vision", name[len(prefix) :]
        for prefix in self.language_prefixes:
            if name.startswith(prefix):
                return "language", "model." + name[len(prefix) :]
        if name.startswith("language_model."):  # our own name (dummy weights loaded by name)
            return "language", name[len("language_model.") :]
        if name.startswith("vision."):
            return "vision", name[len("vision.") :]
        return "language", name

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Route each checkpoint tensor to the tower or the text model; returns our parameter names loaded. The text
        model's tensors stream through (they are most of the checkpoint); the tower's are kept until the end."""
        vision: list[tuple[str, Any]] = []

        def language() -> Iterable[tuple[str, Any]]:
            for name, tensor in weights:
                part, local = self.route_weight(name)
                if part == "vision":  # replicated on every rank: the whole tensor (read now if it is lazy)
                    vision.append((local, materialize(tensor)))
                else:
                    yield local, tensor

        loaded = {f"language_model.{n}" for n in self.language_model.load_weights(language())}
        if vision:
            tower: Any = self.vision  # every tower class has `load_weights`
            loaded |= {f"vision.{n}" for n in tower.load_weights(vision)}
        return loaded
