"""Phi-3 (and Phi-3.5, Phi-4-mini, which share the architecture name): Llama's decoder, stored pre-fused.

The checkpoint already holds `self_attn.qkv_proj` ([q | k | v] rows) and `mlp.gate_up_proj` ([gate | up] rows), the
layouts our Llama modules use, so those tensors load as they are. The rest is configuration that `LlamaForCausalLM`
and `RotaryEmbedding` read: a sliding window on every layer when `config.sliding_window` is set, a partial rotary
dimension (`rope_parameters["partial_rotary_factor"]`, Phi-4-mini), and LongRoPE (`rope_type` "longrope", formerly
"su"). LongRoPE's short or long factors are chosen once from the engine's `max_positions` (session_len or
max_position_embeddings): short factors when it is <= `original_max_position_embeddings`, long ones otherwise; see
`lm_torch.layers.rotary.rope_inverse_frequencies`. transformers instead picks per forward pass by sequence length, so
with a session longer than the original length, prompts that fit the original length differ from it.
"""

from __future__ import annotations

from lm_torch.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi3ForCausalLM: `LlamaForCausalLM` loads its fused `qkv_proj` / `gate_up_proj` tensors by name, and reads
    everything else Phi-3 needs from the config; the class exists to name the family."""
