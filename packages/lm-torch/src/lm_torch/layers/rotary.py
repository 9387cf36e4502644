"""Rotary position embeddings with every scaling type transformers defines, from a cos/sin table.

The inverse frequencies come from transformers' own rope functions (default, linear, llama3, yarn, longrope, ...)
so that our positions match the reference implementation for every model family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lm_torch.layers.context import BuildContext, context_or_current


def rope_inverse_frequencies(
    config: Any, layer_type: str | None = None, max_positions: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2 or rotary_dim // 2], attention scaling) for `config` (a transformers config).

    Two rope types depend on the sequence length in transformers, which a fixed table cannot; we decide once from
    `max_positions` (the longest sequence the engine will run):
    - longrope (Phi-3): transformers uses `short_factor` while the sequence fits `original_max_position_embeddings`
      and `long_factor` beyond. We use the long factors for every position iff `max_positions` exceeds the original
      length, so results match transformers exactly when the session fits the original length, or when sequences are
      longer than it; a long-context session's short prompts get the long factors.
    - dynamic NTK: up to `max_position_embeddings` it leaves the frequencies unscaled, so a session that fits is
      exact; beyond, the frequencies would change with every sequence's length, which we refuse.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Phi-3 style configs keep the factor in rope_parameters, older ones on the config.
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        dim = int(head_dim * factor)
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    if rope_type == "dynamic" and (max_positions is None or max_positions > config.max_position_embeddings):
        raise ValueError(
            "dynamic NTK rope scaling depends on each sequence's length beyond max_position_embeddings "
            f"({config.max_position_embeddings}) and is not supported there; use a session_len within it"
        )
    kwargs: dict = {"layer_type": layer_type} if layer_type is not None else {}
    if rope_type == "longrope" and max_positions is not None:
        kwargs["seq_len"] = max_positions
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
    return inv_freq, float(scaling)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q and k by position, from a table computed once up to `max_positions`.

    On CUDA with triton the kernel of `kernels.rotary` rotates in place (`forward_triton`), elsewhere plain torch
    (`forward_native`); the path is bound in `__init__`.

    Multimodal rotary (Qwen2-VL's M-RoPE, a config whose rope parameters have `mrope_section`): positions may be
    [3, num_tokens] (temporal, height, width), and frequency band j of the rotary half takes its angle from the
    position of section s(j) (`mrope_section` counts the bands of each section). A step with such positions builds
    its own [num_tokens, rotary_dim] cos/sin rows and rotates token t by row t, through the same kernels. Where the
    three positions are equal (text) this is plain rotary at that position, so one-dimensional positions still work.
    """

    cos: torch.Tensor  # [max_positions, rotary_dim] float32
    sin: torch.Tensor

    def __init__(
        self, config: Any, max_positions: int, layer_type: str | None = None, ctx: BuildContext | None = None
    ) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        self.allow_pdl = ctx.kernels.pdl
        self._forward = self.forward_triton if ctx.runs_triton else self.forward_native
        inv_freq, scaling = rope_inverse_frequencies(config, layer_type, max_positions)
        # transformers' rope functions return CPU tensors; the tables belong where the model is being built, and
        # stay float32 whatever the default dtype is while it is built.
        inv_freq = inv_freq.to(torch.get_default_device(), torch.float32)
        # The same float32 arithmetic as transformers: position * inv_freq, then cos/sin, then the scaling.
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)  # [max_positions, rotary_dim]
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)
        self.rotary_dim = emb.shape[-1]
        params = getattr(config, "rope_parameters", None) or {}
        section = params.get("mrope_section") if isinstance(params, dict) else None
        self.mrope_section: torch.Tensor | None = None  # [rotary_dim] int64: the position row of each column
        if section:
            if sum(section) * 2 != self.rotary_dim:
                raise ValueError(f"mrope_section {section} does not cover the rotary half ({self.rotary_dim // 2})")
            half = torch.repeat_interleave(torch.arange(len(section)), torch.tensor(section))
            self.mrope_section = torch.cat((half, half)).to(inv_freq.device)

    def step_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row positions [num_tokens], cos [num_tokens, rotary_dim], sin) of multimodal positions [3, num_tokens]:
        token t is rotated by row t of the step's own tables."""
        if self.mrope_section is None:
            raise ValueError("three-row positions need a multimodal rotary (mrope_section in the rope parameters)")
        num_tokens = positions.shape[1]
        index = self.mrope_section.view(1, 1, -1).expand(1, num_tokens, -1)  # [1, T, rotary_dim]
        cos = self.cos[positions].gather(0, index)[0]  # [3, T, rotary_dim] -> [T, rotary_dim]
        sin = self.sin[positions].gather(0, index)[0]
        rows = torch.arange(num_tokens, device=positions.device)
        return rows, cos, sin

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if positions.dim() == 2:
            return self.step_tables(positions)
        return positions, self.cos, self.sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) rotated by `positions` [num_tokens]; q: [num_tokens, num_heads, head_dim], k with num_kv_heads."""
        return self._forward(positions, q, k)

    def forward_triton(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In place, in float32 from the float32 tables (the torch code rounds cos/sin to q's dtype first, as
        transformers does: identical in float32, within a unit of the last place in bf16/fp16)."""
        from lm_torch.kernels.rotary import apply_rotary

        rows, cos, sin = self._tables(positions)
        return apply_rotary(rows, q, k, cos, sin, allow_pdl=self.allow_pdl)

    def forward_native(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch computation (new tensors)."""
        rows, cos_table, sin_table = self._tables(positions)
        cos = cos_table[rows].to(q.dtype)[:, None, :]
        sin = sin_table[rows].to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)

    def rotate_and_store(
        self,
        positions: torch.Tensor,  # [num_tokens]
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens]: flat cache slot of each token, negative = padding
        k_scales_zeros: torch.Tensor | None = None,  # a quantized cache's (scale, zero) per slot and head
        v_scales_zeros: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotate q and k in place and write the rotated k and v into the paged cache (quantized if it is): one
        Triton kernel (CUDA only; see `kernels.rotary.apply_rotary`). Returns q."""
        from lm_torch.kernels.rotary import apply_rotary

        rows, cos, sin = self._tables(positions)
        apply_rotary(
            rows,
            q,
            k,
            cos,
            sin,
            v=v,
            k_cache=k_cache,
            v_cache=v_cache,
            slot_mapping=slot_mapping,
            k_scales_zeros=k_scales_zeros,
            v_scales_zeros=v_scales_zeros,
            allow_pdl=self.allow_pdl,
        )
        return q


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
