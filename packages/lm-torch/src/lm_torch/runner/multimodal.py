"""A step's image inputs: the vision features of the placeholder rows it computes, and M-RoPE positions.

`StepMedia.prepare(batch, states, host)` runs on every step of a vision-language model (and costs nothing for
text-only rows):
- each item whose span a row computes in this step (spans are never split: `lm_torch.multimodal.clamp_chunk`) gets
  its features from the encoder cache or from one batched `model.encode` call over the step's missing items;
- under M-RoPE (`model.mrope_positions`), prompt rows of a request with items take their three-row positions
  from the request's table, so the step passes [3, num_tokens] positions to the model; generated tokens of such a
  request are shifted by its delta in the one-row positions the model reads (`host.positions`, after the KV slots
  were computed from the real positions), which keeps decode steps on the text path and its CUDA graphs;
- a model with `bidirectional_images` (Gemma 3) gets the step's `key_limits` with its features: every row sees up to
  its own position, except an item's placeholder rows, which see up to the item's end (all of the span is in the
  step, so the limit never passes the step's context).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lm_torch.models.vlm import MultimodalStep
from lm_torch.multimodal import EncoderCache, MMItem
from lm_torch.runner.inputs import HostStep
from lm_torch.runner.state import RequestState
from lm_torch.scheduler import ScheduledBatch


class StepMedia:
    """The runner's image side: the encoder cache and the per-request M-RoPE tables."""

    def __init__(self, model: Any, device: torch.device, cache_tokens: int) -> None:
        self.model = model
        self.device = device
        self.uses_mrope = hasattr(model, "mrope_positions")
        self.bidirectional = bool(getattr(model, "bidirectional_images", False))
        self.cache = EncoderCache(cache_tokens)
        self.num_encoded = 0  # items run through the tower (cache misses)

    def prepare(
        self, batch: ScheduledBatch, states: Sequence[RequestState], host: HostStep
    ) -> tuple[MultimodalStep | None, np.ndarray | None]:
        """(features of the step's placeholder rows or None, [3, num_tokens] positions or None); shifts the one-row
        positions of generated tokens under M-RoPE in `host` (see the module docstring)."""
        rows: list[tuple[int, MMItem]] = []
        three_rows: list[tuple[int, int, int, RequestState]] = []  # (first row, start, count, state)
        for i, state in enumerate(states):
            start, count = batch.starts[i], batch.num_new_tokens[i]
            first = int(host.query_start_loc[i])
            if state.mm_items and start < state.num_prompt_tokens:
                for item in state.mm_items:
                    if item.offset >= start + count:
                        break
                    if item.end <= start:
                        continue
                    if item.offset < start or item.end > start + count:
                        raise RuntimeError(f"a step splits the span of an item of request {state.request_id!r}")
                    rows.append((first + item.offset - start, item))
            if self.uses_mrope and state.mm_items:
                if state.mrope is None:
                    state.mrope, state.rope_delta = self.model.mrope_positions(state.num_prompt_tokens, state.mm_items)
                if start < state.num_prompt_tokens:
                    three_rows.append((first, start, count, state))
                elif state.rope_delta:
                    host.positions[first : first + count] += state.rope_delta
        positions = self._three_row_positions(host, three_rows) if three_rows else None
        if not rows:
            return None, positions
        mm = self._features(rows)
        if self.bidirectional:
            mm.key_limits = self._key_limits(batch, host, rows)
        return mm, positions

    def _key_limits(self, batch: ScheduledBatch, host: HostStep, rows: list[tuple[int, MMItem]]) -> torch.Tensor:
        """[num_tokens] int32 on the device: each row's exclusive key bound, its item's end for placeholder rows."""
        lens = np.asarray(host.query_lens, dtype=np.int64)
        starts = np.asarray(batch.starts, dtype=np.int64)
        # A row's index in its sequence (its KV slot's position), plus one: what it sees causally.
        limits = np.arange(host.num_tokens) + np.repeat(starts - host.query_start_loc[:-1], lens) + 1
        for first, item in rows:
            limits[first : first + item.length] = item.end
        return torch.from_numpy(limits.astype(np.int32)).to(self.device, non_blocking=True)

    def _three_row_positions(self, host: HostStep, rows: list[tuple[int, int, int, RequestState]]) -> np.ndarray:
        positions = np.repeat(host.positions[None, :], 3, axis=0)  # [3, num_tokens]: text rows as they are
        for first, start, count, state in rows:
            assert state.mrope is not None
            prompt = min(count, state.num_prompt_tokens - start)
            positions[:, first : first + prompt] = state.mrope[:, start : start + prompt]
            positions[:, first + prompt : first + count] += state.rope_delta  # generated tokens in the same row
        return positions

    def _features(self, rows: list[tuple[int, MMItem]]) -> MultimodalStep:
        missing: dict[str, MMItem] = {}
        found: dict[str, torch.Tensor] = {}
        for _, item in rows:
            if item.content_hash in found or item.content_hash in missing:
                continue
            cached = self.cache.get(item.content_hash)
            if cached is None:
                missing[item.content_hash] = item
            else:
                found[item.content_hash] = cached
        if missing:
            items = list(missing.values())
            for item, embeds in zip(items, self.model.encode(items), strict=True):
                if embeds.shape[0] != item.length:
                    raise RuntimeError(f"the vision tower gave {embeds.shape[0]} rows for a span of {item.length}")
                found[item.content_hash] = embeds
                self.cache.put(item.content_hash, embeds)
            self.num_encoded += len(items)
        index = torch.cat([torch.arange(first, first + item.length) for first, item in rows])
        embeds = torch.cat([found[item.content_hash] for _, item in rows])
        return MultimodalStep(index.to(self.device, non_blocking=True), embeds)
